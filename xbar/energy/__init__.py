"""Analytic, NeuroSim-style energy model of the crossbar accelerator.

* `presets`: the energy constants of a technology, each with its source; `energy_preset(params)` books
  the ADC at crossbar.adc_bits and applies `energy.overrides` from params.yaml.
* `layer_io`: what the model needs to know about the network (output positions, feature-map sizes).
* `inference`: one image's inference energy per crossbar, PE and layer, for a learned task's masks.
* `reprogramming`: the energy of moving cells between levels (the chip's writes, xbar.chip).
* `typical`: all five methods on an architecture alone, from documented typical cell changes.
* `scenarios`: how `typical` counts each method's writes (steady, first-task, paper), each assumption with
  what it rests on.
* `named`: `xbar energy`'s entry point (an architecture by name).
"""
