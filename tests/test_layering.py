"""The layering of DESIGN.md, as a table of allowed package edges: every import of one graphprune unit
by another (at any depth, function-level imports included) must be listed here, and the ONNX-side
layers never import torch or the torch bridge, not even lazily inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "graphprune"

# The base every unit may use.
BASE = {"errors", "onnxutil"}
# unit -> the other units it may import, bottom to top.  A unit is a subpackage or a top-level module.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "onnxutil": {"errors"},
    "ops": BASE,
    "model_io": BASE | {"ops"},
    "data": BASE,
    "report": BASE,
    "runtime": BASE | {"ops", "model_io", "data"},
    "analysis": BASE | {"ops", "model_io"},
    "criteria": BASE | {"analysis", "ops", "runtime", "data"},
    "planning": BASE | {"criteria", "analysis", "ops", "runtime"},
    "surgery": BASE | {"planning", "analysis", "ops", "runtime", "model_io", "data"},
    "torch_bridge": BASE | {"criteria", "analysis", "ops", "runtime", "model_io", "data"},
    "zoo": BASE,
    "search": BASE
    | {"surgery", "planning", "criteria", "analysis", "ops", "runtime", "model_io", "data", "report"},
    "api": BASE
    | {
        "search",
        "surgery",
        "planning",
        "criteria",
        "analysis",
        "ops",
        "runtime",
        "model_io",
        "data",
        "torch_bridge",
    },
    "recipes": BASE
    | {
        "api",
        "torch_bridge",
        "surgery",
        "planning",
        "analysis",
        "ops",
        "runtime",
        "model_io",
        "data",
        "zoo",
        "report",
    },
    "cli": BASE
    | {
        "api",
        "recipes",
        "search",
        "torch_bridge",
        "surgery",
        "planning",
        "criteria",
        "analysis",
        "ops",
        "runtime",
        "model_io",
        "data",
        "zoo",
        "report",
        "__init__",  # the version (--version) has one home, graphprune.__version__
    },
    "__init__": BASE | {"api", "planning", "torch_bridge"},
}
TORCH_FREE = ("ops", "analysis", "criteria", "planning", "surgery", "runtime", "search", "report")
FORBIDDEN = ("torch", "graphprune.torch_bridge", "graphprune.recipes", "graphprune.zoo")


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of the file names, at any depth (relative imports resolved)."""
    return modules_in(path.read_text(), path.relative_to(PACKAGE.parent).parts[:-1])


def modules_in(source: str, package: tuple[str, ...]) -> set[str]:
    """Every module an import statement of `source` (a module of `package`) names, at any depth."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parent = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join((*parent, *filter(None, [node.module])))
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def unit_of(path: Path) -> str:
    """The unit a source file belongs to: its subpackage, or its own name for a top-level module."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imported_units(path: Path) -> set[str]:
    units = set()
    for name in imported_modules(path):
        parts = name.split(".")
        if parts[0] == "graphprune" and len(parts) > 1:
            units.add(parts[1])
        elif name == "graphprune":
            units.add("__init__")
    return units - {unit_of(path)}


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_unit_is_in_the_table() -> None:
    assert {unit_of(path) for path in SOURCES} == set(ALLOWED)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layering(path: Path) -> None:
    unit = unit_of(path)
    extra = imported_units(path) - ALLOWED[unit]
    assert not extra, f"{path.relative_to(PACKAGE)} ({unit}) imports {sorted(extra)}, not allowed for {unit}"


def test_the_table_has_no_cycle() -> None:
    """Allowed edges point one way: no unit can reach itself."""

    def reach(unit: str, seen: frozenset[str]) -> None:
        for other in ALLOWED[unit]:
            assert other not in seen, f"layering cycle through {other}"
            reach(other, seen | {other})

    for unit in ALLOWED:
        reach(unit, frozenset({unit}))


def test_the_checker_sees_function_level_imports() -> None:
    """An import inside a function body counts as an edge (the table would be blind otherwise)."""
    source = (
        "def f():\n    from graphprune.analysis.graph import analyze\n    from ..analysis import summary\n"
    )
    assert modules_in(source, ("graphprune", "runtime")) == {
        "graphprune.analysis.graph.analyze",
        "graphprune.analysis.summary",
    }


def torch_free_sources() -> list[Path]:
    paths = [PACKAGE / part for part in TORCH_FREE]
    paths += [PACKAGE / f"{part}.py" for part in TORCH_FREE]
    return sorted(
        p for path in paths if path.exists() for p in ([path] if path.is_file() else path.rglob("*.py"))
    )


@pytest.mark.parametrize("path", torch_free_sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_onnx_layers_do_not_import_torch(path: Path) -> None:
    offending = {
        name
        for name in imported_modules(path)
        for root in FORBIDDEN
        if name == root or name.startswith(root + ".")
    }
    assert not offending, f"{path.relative_to(PACKAGE)} imports {sorted(offending)}"
