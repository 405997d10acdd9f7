"""Package boundaries: cas imports neither mirror nor client, and they not each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "relman"

FORBIDDEN = {
    "cas": ("relman.mirror", "relman.client", "relman.demo", "relman.cli"),
    "mirror": ("relman.client", "relman.demo", "relman.cli"),
    "client": ("relman.mirror", "relman.demo", "relman.cli"),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_allowed(package: str) -> None:
    files = sorted((PACKAGE / package).glob("*.py"))
    assert files
    for path in files:
        for name in imported_modules(path):
            for prefix in FORBIDDEN[package]:
                assert not (name == prefix or name.startswith(prefix + ".")), (
                    f"{path.name} imports {name}"
                )
