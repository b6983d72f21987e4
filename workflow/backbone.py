"""The workspace's backbone files read as one `xbar.step.Backbone` (a module of its own: the stages that
never need the per-task step import workflow.io without it)."""

from __future__ import annotations

from pathlib import Path

from workflow.io import BACKBONE, load_torch
from xbar.step import Backbone


def load_backbone(root: Path = Path("."), fp32: bool = False) -> Backbone:
    """quant.pt and levels.pt; with `fp32`, fp32.pt too when it is there (the fp32 ceiling's start; None
    otherwise)."""
    folder = Path(root) / BACKBONE
    full = folder / "fp32.pt"
    return Backbone(load_torch(folder / "quant.pt"), load_torch(folder / "levels.pt"),
                    load_torch(full) if fp32 and full.exists() else None)
