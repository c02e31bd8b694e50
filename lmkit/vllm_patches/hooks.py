"""Run a callback right after a module is imported, without importing it ourselves.

vLLM loads general plugins in every process, but the modules patched here exist only in some of
them (the model runner lives in the engine, the input processor in the API server). Importing
them eagerly would cost each process seconds and hundreds of modules it never uses, so the patch
waits for the process's own import instead.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

Callback = Callable[[ModuleType], None]


class _AfterImport(importlib.abc.MetaPathFinder):
    """A one-shot finder: for `name` only, let the normal finders locate it, then wrap its loader."""

    def __init__(self, name: str, callback: Callback) -> None:
        self.name = name
        self.callback = callback

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader, callback = spec.loader, self.callback
        load = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            load(module)
            callback(module)

        # The file finder made this loader for this module alone, so an instance attribute is local
        # to it, and module.__loader__ stays the real loader (inspect and importlib.resources work).
        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def when_imported(name: str, callback: Callback) -> None:
    """Call `callback(module)` once module `name` has been executed (at once if already imported)."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))
