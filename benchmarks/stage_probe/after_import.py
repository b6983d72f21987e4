"""Wrap one function of a module as soon as that module is imported: the one import hook that
benchmarks/stage_probe/sitecustomize.py (timing) and tests/workflow/pause_write/sitecustomize.py
(a write stopped half-way) both use, so that the project's code knows nothing of either."""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Callable
from typing import Any


class _WrapAfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, module: str, name: str, wrap: Callable[[Any], Any]) -> None:
        self.module, self.name, self.wrap = module, name, wrap

    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201
        if name != self.module:
            return None
        sys.meta_path.remove(self)  # once: the finders after this one find the module as always
        spec = next(filter(None, (f.find_spec(name, path, target) for f in sys.meta_path
                                  if hasattr(f, "find_spec"))), None)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module) -> None:  # noqa: ANN001
            exec_module(module)
            setattr(module, self.name, self.wrap(getattr(module, self.name)))

        spec.loader.exec_module = exec_and_wrap
        return spec


def wrap_after_import(module: str, name: str, wrap: Callable[[Any], Any]) -> None:
    """Once `module` has executed, replace its attribute `name` by `wrap(name's value)`."""
    sys.meta_path.insert(0, _WrapAfterImport(module, name, wrap))
