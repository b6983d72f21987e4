"""Every way of learning a new task on the deployed backbone, behind one registry.

| method | file | trainables | BN |
|---|---|---|---|
| `finetune_shared` | finetune_shared.py | every weight (4-bit QAT), activation clips, head; starts from the previous shared task | trained |
| `finetune_separate` | finetune_separate.py | the same, from the backbone: one copy per task | trained |
| `piggyback` | piggyback.py | element-wise binary mask on every mapped layer, head | frozen (backbone) |
| `xbm` | xbm.py | column binary mask (shift_levels = 0), head | per task |
| `xma` | xma.py | column shift mask, head | per task |
| `xma2` | xma2.py | spare PEs' weights (4-bit QAT from the backbone's levels), column shift masks on every other PE, head | per task |
| `head_only` | head_only.py | the head only: the comparison's reference row, not listed in params.yaml | train.bn |

`registry.py` says what a method object holds; `layers.py` is the task model
(CrossbarLayer), `recipe.py` the training recipe they share, `presets.py` the named recipes, `task.py` build /
export / rebuild of task.pt. To add a method: one file here that subclasses
`Method` and calls `register`, plus its import below (or, outside xbar, a module
named in params.yaml's `plugins:`).

Validating params.yaml asks the registry for the method names, so importing this
package imports no torch: the method files need none at import time, and the
task-model functions below load their module on first use.
"""

from importlib import import_module

# built-in methods register themselves on import, in the order of the paper's tables
from xbar.methods import finetune_shared, finetune_separate, piggyback, xbm, xma, xma2  # noqa: F401
from xbar.methods import head_only  # noqa: F401 (the comparison's reference row, not listed)
from xbar.methods.registry import Method, get, known, names, register, unregister

_LAZY = {
    "layers": ("HEAD_BITS", "CrossbarLayer", "TaskModel", "backbone_net", "crossbar_spec", "deploy_cells", "new_head",
               "quantized_net"),
    "recipe": ("init_head", "optimizers", "parameter_groups", "recalibrate_bn", "ridge_head", "set_trainable",
               "train_task", "trainable_names"),
    "task": ("build_task_model", "check_spec", "chip_view", "export_task", "layer_mask_levels", "load_task_model",
             "mask_report", "stored_bytes"),
}
_HOME = {name: module for module, exported in _LAZY.items() for name in exported}

__all__ = ["Method", "get", "known", "names", "register", "unregister", *_HOME]


def __getattr__(name: str):  # noqa: ANN202 (PEP 562: the task-model API, imported on first use)
    if name in _HOME:
        return getattr(import_module(f"xbar.methods.{_HOME[name]}"), name)
    raise AttributeError(f"module 'xbar.methods' has no attribute {name!r}")
