"""The method registry: one `Method` object per way of learning a new task, looked up by name.

A method is one file in this package that subclasses `Method` and calls
`register(...)`. Everything outside the package (params, the per-task step,
the chip's deployment, energy, memory, the gate, the comparison, the CLI)
asks the registry what a method does, never compares its name:

| field | meaning |
|---|---|
| `trains` | what it trains (documentation, `xbar report`) |
| `bn_rules` | the BN rules it can learn with (`train.bn`: `frozen` keeps the backbone's BN, `per_task` trains its own) |
| `trains_all` | trains every weight (fine-tuning: the backbone PEs are rewritten) |
| `column_masks` / `element_masks` | a column mask per column of the frozen PEs / a binary mask per weight |
| `spare_pes` | re-programs the top-P% ranked PEs as spare PEs (tier 1); one comparison configuration per P |
| `continues_previous` | starts from the previous task's network when that task used this method too |
| `gated` | the no-forgetting gate applies (every earlier task must predict exactly as when learned) |

Hooks with a default here: `attach` (its trainables on a fresh task model),
`mask_lr`, `export_masks` (task.pt's mask entries), `chip_view` (which
weights a learned task runs on once later tasks exist), `backbone_image`
(what the backbone PEs must hold to run a task: the chip programs it), and
`mask_shift_levels`, and `from_chip` (a task decoded from the cells its
image put on the chip: what the no-forgetting gate evaluates). A task's spare PEs and column masks reach the chip from
its task.pt alone (xbar.chip.image), whatever the method.

Plugins: a module named in params.yaml's `plugins:` list is imported before
the parameters are validated, so a method defined outside this package (a
lab's own, or a test's) registers itself and is used like a built-in one.
"""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING, ClassVar

from xbar.errors import UserError

if TYPE_CHECKING:
    from xbar.methods.layers import TaskModel
    from xbar.params import TaskSpec, TrainParams

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class Method:
    """What a method trains and how its task image is built; subclasses set the class fields."""

    name: ClassVar[str]
    trains: ClassVar[str]
    bn_rules: ClassVar[tuple[str, ...]] = ("frozen", "per_task")
    trains_all: ClassVar[bool] = False
    column_masks: ClassVar[bool] = False
    element_masks: ClassVar[bool] = False
    spare_pes: ClassVar[bool] = False
    continues_previous: ClassVar[bool] = False
    gated: ClassVar[bool] = True
    listed: ClassVar[bool] = True  # in `names()` (params.yaml's methods); False: a reference the comparison adds

    @property
    def keeps_backbone(self) -> bool:
        """The backbone PEs' cells never change (outside the task's spare PEs)."""
        return not self.trains_all

    def bn_rule(self, asked: str | None, default: str) -> str:
        """The BN rule of a task that asks for `asked` (None: the default, train.bn, where this method
        can use it; else the method's own). Raises ValueError for a rule the method cannot use."""
        if asked is None:
            return default if default in self.bn_rules else self.bn_rules[0]
        if asked not in self.bn_rules:
            raise ValueError(f"{self.name} cannot learn with BN {asked!r} (it can with: {', '.join(self.bn_rules)})")
        return asked

    def mask_shift_levels(self, shift_levels: int) -> int | None:
        """The column mask's shift levels N for a task that asks for `shift_levels` (None: no column mask)."""
        return shift_levels if self.column_masks else None

    def attach(self, model: TaskModel, spec: TaskSpec, train: TrainParams) -> None:
        """Put the method's trainables on a freshly built task model (its mapped layers are CrossbarLayers)."""
        raise NotImplementedError(f"method {self.name}: attach")

    def mask_lr(self, train: TrainParams) -> float | None:
        """A fixed Adam lr on the real-valued masks (train.mask_lr); None: the recipe's reach rule."""
        return train.mask_lr

    def mask_distance(self) -> float:
        """How far a mask's real value starts from its threshold (the recipe's reach rule sets the lr by it)."""
        raise NotImplementedError(f"method {self.name}: mask_distance")

    def export_masks(self, model: TaskModel, task: dict) -> None:
        """Fill task.pt's mask entries (column_masks, mask_values, element_masks) from the trained model."""

    def chip_view(self, tasks: dict[str, dict], name: str) -> dict:
        """Task `name` as the chip runs it once every task of `tasks` (in learning order) is learned."""
        return tasks[name]

    def backbone_image(self, name: str, tasks: dict[str, dict], backbone: dict) -> tuple[str, dict] | None:
        """(image key, weight levels by layer) the backbone PEs must hold to run task `name` once every
        task of `tasks` is learned; None: the backbone's own levels (`backbone`), never rewritten.
        Two tasks with the same key share the image: switching between them writes nothing."""
        return None if self.keeps_backbone else (name, tasks[name]["levels"])

    def from_chip(self, task: dict, read: dict, backbone: dict) -> dict:
        """Task.pt `task` with what the chip holds for it: `read` (weight levels by layer decoded from its
        cells, xbar.chip.readback) in place of what `backbone_image` and its spare PEs put there."""
        return task | {"levels": read}

    def __repr__(self) -> str:
        return f"<method {self.name}>"


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method; its name must be new and a simple identifier (it appears in paths and MLflow keys)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", getattr(method, "name", "") or ""):
        raise ValueError(f"method name {getattr(method, 'name', None)!r} is not a simple identifier")
    if method.name in _REGISTRY and type(_REGISTRY[method.name]) is not type(method):
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests that register a toy method clean up with this)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """Every listed method, built-ins first in the order of the paper's tables."""
    return tuple(n for n, m in _REGISTRY.items() if m.listed)


def known(name: str) -> bool:
    """Whether `name` is a registered method, listed or not (e.g. head_only, the comparison's reference)."""
    return name in _REGISTRY


def get(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"method: {name!r} is unknown (one of {', '.join(names())})") from None


def load_plugins(modules: list[str] | tuple[str, ...]) -> None:
    """Import the modules of params.yaml's `plugins:` list (each registers its methods or backbones,
    xbar.backbones; a module imported for the first time that registers neither is refused)."""
    import sys

    from xbar.backbones.registry import count as backbones

    for module in modules:
        if not isinstance(module, str) or not _MODULE.match(module):
            raise UserError(f"plugins: {module!r} is not a Python module name (e.g. my_lab.methods)")
        fresh, before = module not in sys.modules, len(_REGISTRY) + backbones()
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UserError(f"plugins: cannot import {module!r} ({err})") from None
        except Exception as err:  # the module's own code failed: one line, not its traceback
            raise UserError(f"plugins: importing {module!r} failed ({type(err).__name__}: {err})") from None
        if fresh and len(_REGISTRY) + backbones() == before:
            raise UserError(f"plugins: {module!r} registers no method and no backbone "
                            "(call xbar.methods.register or xbar.backbones.register in it)")
