"""Modules that load on first use rather than at start-up.

onnx-ir imports sympy, and builds a table of sympy functions, at import time, for symbolic
shape arithmetic that ptqconv hardly ever performs; that cost 0.4 s of every run
(docs/decisions.md, lazy sympy). A deferred module is a stand-in in `sys.modules` that loads
the real module the first time one of its attributes is missing and then takes on all of
them, so onnx-ir behaves exactly as before. The stdlib's LazyLoader cannot do this on Python
3.11: the `import` statement itself reads `__spec__` and so triggers the load.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any

# (module, the package that holds it: located without importing the package)
DEFERRED: tuple[tuple[str, str | None], ...] = (
    ("sympy", None), ("onnx_ir._symbolic_shapes", "onnx_ir"))

_lock = threading.RLock()


class _Deferred(types.ModuleType):
    """Stands in for a module until one of its attributes is first used."""

    def __init__(self, spec: ModuleSpec) -> None:
        super().__init__(spec.name)
        self.__spec__ = spec  # the import statement finds it initialized, so does not load
        self.__ptqconv_loaded__ = False

    def __getattr__(self, attr: str) -> Any:  # only for attributes not (yet) present
        with _lock:
            if not self.__dict__.get("__ptqconv_loaded__"):
                self.__dict__["__ptqconv_loaded__"] = True
                real = _load(self.__spec__)
                self.__dict__.update(real.__dict__)
        try:
            return self.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}") from None


def _load(spec: ModuleSpec) -> types.ModuleType:
    """Run the real module, as the import system would, and put it in sys.modules."""
    del sys.modules[spec.name]
    try:
        if spec.parent and spec.parent != spec.name:
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(spec.name)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise


def defer(name: str, package: str | None = None) -> bool:
    """Make `import name` cheap until the module is used. False when it cannot be deferred
    (already imported, or not found): imports then work as usual."""
    if name in sys.modules:
        return False
    if package is None:
        spec = importlib.util.find_spec(name)
    else:
        parent = importlib.util.find_spec(package)
        if parent is None or not parent.submodule_search_locations:
            return False
        folder = Path(next(iter(parent.submodule_search_locations)))
        source = folder / (name.rsplit(".", 1)[-1] + ".py")
        spec = importlib.util.spec_from_file_location(name, source) if source.is_file() else None
    if spec is None or spec.loader is None:
        return False
    sys.modules[name] = _Deferred(spec)
    return True


def defer_all() -> None:
    for name, package in DEFERRED:
        defer(name, package)


defer_all()  # on import: ptqconv/__init__.py imports this module before anything else
