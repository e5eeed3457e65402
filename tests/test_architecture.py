"""DESIGN's one-way arrows: mesh -> patterns, mesh -> discovery, and nothing back."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("package", "forbidden"), [
    ("patterns", {"mesh", "discovery"}),
    ("discovery", {"mesh", "patterns"}),
])
def test_lower_packages_do_not_import_upward_or_sideways(package: str, forbidden: set[str]) -> None:
    """Importing a lower package in a fresh interpreter loads neither of the others."""
    code = f"import sys, {package}; print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(forbidden)!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60, cwd=ROOT).stdout.strip()
    assert out == "[]"


def _imports(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
    return names


@pytest.mark.parametrize("package", ["mesh", "patterns", "discovery"])
def test_cross_package_imports_use_the_package_root_only(package: str) -> None:
    """No module reaches into another package's private modules."""
    others = {"mesh", "patterns", "discovery"} - {package}
    for path in (ROOT / package).rglob("*.py"):
        for name in _imports(path):
            top, _, rest = name.partition(".")
            assert not (top in others and rest), f"{path.name} imports {name}"


@pytest.mark.parametrize("module", [
    p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
    for pkg in ("mesh", "patterns", "discovery") for p in sorted((ROOT / pkg).glob("*.py"))
    if p.name != "__main__.py"
])
def test_every_module_imports_on_its_own(module: str) -> None:
    """No circular import hides behind a lucky import order."""
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, timeout=60, cwd=ROOT)
