"""Packages whose public names load on first use (PEP 562), so that importing a package for one light name (a
registry, a constant) does not import torch, transformers or TRL for the others."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package` (its `__name__`), where `exports` maps each public name to the
    module, relative to the package, that defines it: `__getattr__, __dir__ = lazy_exports(__name__, {...})`."""

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
