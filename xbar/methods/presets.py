"""Training recipes by name (`train.recipe`): `default`, one recipe for every method, and `paper`, each
method as its paper or its authors' code runs it. A row of the comparison names its recipe (`Recipe.label`).

Rule: a value a paper states is used as stated; where it is silent the value is the default recipe's, named
as ours (docs/decisions.md, "Recipes"). Importing this module imports no torch (params validation uses it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RECIPES = ("default", "paper")


@dataclass(frozen=True)
class Recipe:
    """How one method trains under one named recipe (xbar.methods.recipe reads it)."""

    name: str  # the preset: default | paper
    source: str  # where its values come from (the table's recipe column)
    batch_size: int | None = None  # None: train.batch_size
    schedule: Literal["warmup_cosine", "step"] = "warmup_cosine"  # step: x STEP_FACTOR at the run's middle
    # ridge_sgd: the closed-form ridge head, then SGD at train.lr with the rest; random_adam: a fresh head
    # (PyTorch's default init) trained by its own Adam at head_lr (Piggyback's code)
    head: Literal["ridge_sgd", "random_adam"] = "ridge_sgd"
    head_lr: float | None = None
    mask_lr: float | None = None  # a fixed Adam lr on the masks; None: the reach rule (recipe.mask_lr)
    bn: Literal["frozen", "per_task"] | None = None  # a BN rule the recipe imposes; None: params.yaml's
    published_epochs: int | None = None  # the published run's epochs: a task with fewer ran a scaled schedule

    def label(self, epochs: int) -> str:
        """e.g. "paper (Piggyback's code; 3 of 30 epochs, scaled)" or "default"."""
        scaled = (f"; {epochs} of {self.published_epochs} epochs, scaled"
                  if self.published_epochs and epochs != self.published_epochs else "")
        return self.name if self.name == "default" else f"{self.name} ({self.source}{scaled})"

    @property
    def head_procedure(self) -> str:
        return "ridge head, then SGD" if self.head == "ridge_sgd" else f"random head, Adam {self.head_lr:g}"


DEFAULT = Recipe("default", "ours")
STEP_AT, STEP_FACTOR = 0.5, 0.1  # Piggyback's code: lr x0.1 after epoch 15 of 30

# The XMA / XMA2 / XBM papers state the mask (levels, Gumbel-sigmoid, hard 0.5 threshold, straight-through),
# the spare ratio and the one-batch ranking; they state no optimizer, lr, temperature, init or epochs: those
# are the default recipe's (ours). Fine-tuning: the paper's row is fp32 (finetune_fp32), the 4-bit copy ours.
_PAPER_SILENT = "the paper's stated values; optimizer, lr, epochs: ours"
PAPER: dict[str, Recipe] = {
    # arunmallya/piggyback, src/main.py and src/scripts/run_piggyback_training.sh: mask init 1e-2, threshold
    # 5e-3 (xbar.masks.ElementBinaryMask), Adam 1e-4 on the masks and a second Adam 1e-4 on the classifier,
    # batch 32, 30 epochs, both lrs x0.1 after epoch 15, train_bn off
    "piggyback": Recipe("paper", "Piggyback's code", batch_size=32, schedule="step", head="random_adam",
                        head_lr=1e-4, mask_lr=1e-4, bn="frozen", published_epochs=30),
    "xma": Recipe("paper", _PAPER_SILENT),
    "xma2": Recipe("paper", _PAPER_SILENT),
    "xbm": Recipe("paper", _PAPER_SILENT),
    "finetune_separate": Recipe("paper", "4-bit fine-tune; the paper's row is finetune_fp32; recipe ours"),
    "finetune_fp32": Recipe("paper", "the paper's fp32 fine-tune row; recipe ours"),
    "head_only": Recipe("paper", "the deployed head alone"),
}


def covered(recipe: str) -> tuple[str, ...] | None:
    """The methods a preset covers (None: every method)."""
    return None if recipe == "default" else tuple(PAPER)


def check_recipe(recipe: str, methods: list[str] | tuple[str, ...], field: str = "train.recipe") -> None:
    """Bad input, one line (ValueError, worded for `field`): an unknown recipe, or a preset for a method it
    does not cover."""
    if recipe not in RECIPES:
        raise ValueError(f"{field}: {recipe!r} is unknown (one of {', '.join(RECIPES)})")
    cover = covered(recipe)
    missing = [m for m in methods if cover is not None and m not in cover]
    if missing:
        raise ValueError(f"{field}: the {recipe!r} preset does not cover method {missing[0]!r} (it covers "
                         f"{', '.join(cover)})")


def recipe_for(recipe: str, method: str) -> Recipe:
    check_recipe(recipe, [method])
    return DEFAULT if recipe == "default" else PAPER[method]
