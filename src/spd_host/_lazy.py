"""Lazy re-exports for package ``__init__`` modules.

A package lists ``name -> defining module`` and gets module-level ``__getattr__``/``__dir__``
that import the defining module on first access (PEP 562). This keeps ``import spd_host`` (and
its subpackages) free of torch and plugins until a name that needs them is touched.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any


def lazy_exports(
    package: str,
    table: Mapping[str, str],
    public: Sequence[str],
    namespace: MutableMapping[str, Any],
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``; resolved names are cached in ``namespace``."""

    def module_getattr(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def module_dir() -> list[str]:
        return list(public)

    return module_getattr, module_dir
