"""One module per DVC stage: `python -m stages.<name>`. Each reads params and
inputs, calls the xbar library, and writes its outputs and metrics."""
