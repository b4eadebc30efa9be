"""The import rules: clients know only the API, serving never imports export."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"clients": ("genserve.serving", "genserve.export"), "serving": ("genserve.export",)}


def imported_modules(path: Path) -> set[str]:
    """Absolute names of what `path` imports, relative imports resolved (folder X is genserve.X)."""
    package = ["genserve", *path.relative_to(ROOT).parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            names.add(".".join([*base, node.module] if node.module else base))
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_nothing_it_must_not(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.startswith(FORBIDDEN[package]))
        for path in (ROOT / package).rglob("*.py") if "proto" not in path.parts
    }
    assert {k: v for k, v in offenders.items() if v} == {}
