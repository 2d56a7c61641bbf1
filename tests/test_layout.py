"""The package's layering: data flows one way, so no module imports one above it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ptqconv"
# Bottom to top; a module may import its own layer and the ones below.
LAYERS = [
    ["lazy", "errors", "values", "qparams", "target", "plain_data"],
    ["files", "arguments", "config", "encodings", "graph", "calibrate.statistics",
     "calibrate.observers", "calibrate.images", "weights", "calibrate.moments",
     "piecewise_parse"],
    ["runtime", "modelio"],
    ["calibrate.ranges", "calibrate.dataset", "calibrate.exposure", "calibrate.collector"],
    ["passes"],
    ["evaluate", "debug", "imported"],
    ["report", "settings"],
    ["post_training", "weight_only", "dynamic_quant"],
    ["accuracy_target"],
    ["conversion"],
    ["__init__", "cli"],
]


def _layer(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            if module == prefix or module.startswith(prefix + "."):
                return index
    raise AssertionError(f"ptqconv.{module} is in no layer of tests/test_layout.py")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)
        found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ptqconv"):
            base = node.module.removeprefix("ptqconv").lstrip(".")
            for alias in node.names:
                full = f"{base}.{alias.name}" if base else alias.name
                names.add(full if full in _modules() else base)
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("ptqconv.") for a in node.names
                      if a.name.startswith("ptqconv.")}
    return {n for n in names if n}


def test_no_module_imports_one_above_it():
    upward = []
    for module, path in sorted(_modules().items()):
        for imported in sorted(_imports(path)):
            if _layer(imported) > _layer(module):
                upward.append(f"{module} (layer {_layer(module)}) imports {imported} "
                              f"(layer {_layer(imported)})")
    assert upward == []


def test_only_the_cli_knows_click():
    users = [m for m, path in _modules().items()
             if "import click" in path.read_text() and m != "cli"]
    assert users == []
