"""The layering of docs/DESIGN.md: the ONNX-side layers never import torch or the torch bridge, not even
lazily inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "graphprune"
TORCH_FREE = ("criteria", "analysis", "planning.py", "surgery", "runtime")
FORBIDDEN = ("torch", "graphprune.torch_bridge")


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of the file names, at any depth (relative imports resolved)."""
    package = path.relative_to(PACKAGE.parent).parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parent = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join((*parent, *filter(None, [node.module])))
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def torch_free_sources() -> list[Path]:
    paths = [PACKAGE / part for part in TORCH_FREE]
    return sorted(p for path in paths for p in ([path] if path.is_file() else path.rglob("*.py")))


@pytest.mark.parametrize("path", torch_free_sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_onnx_layers_do_not_import_torch(path: Path) -> None:
    offending = {
        name
        for name in imported_modules(path)
        for root in FORBIDDEN
        if name == root or name.startswith(root + ".")
    }
    assert not offending, f"{path.relative_to(PACKAGE)} imports {sorted(offending)}"
