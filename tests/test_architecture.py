"""DESIGN's one-way arrows: mesh -> patterns, mesh -> discovery, and nothing back.

Inside `mesh` the same holds between its parts: every module, subpackages
included, sits in a layer and imports only from its own layer or below, and
no import cycle exists between modules (type-checking-only imports count:
a cycle there is still a design cycle).
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Final

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


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(_module_name(p) for pkg in ("mesh", "patterns", "discovery")
                 for p in (ROOT / pkg).rglob("*.py") if p.name != "__main__.py")


_OURS: Final = frozenset({"mesh", "patterns", "discovery", "tests"})
_IMPORTER: Final = r"""
import importlib, json, os, sys, traceback
for name in sys.argv[1:]:  # the libraries our modules use, none of ours
    try:
        importlib.import_module(name)
    except Exception:
        pass  # an optional extra not installed: the module that needs it says so
print("ready", flush=True)
for line in sys.stdin:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a child that has imported nothing of ours
        os.close(read)
        try:
            importlib.import_module(line.strip())
            out = ""
        except BaseException:
            out = traceback.format_exc()
        os.write(write, out.encode() or b"ok")
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    print(json.dumps(b"".join(chunks).decode() or "the child died"), flush=True)
"""


def _libraries() -> list[str]:
    """Every top-level module our packages import that is not one of ours."""
    return sorted({name.partition(".")[0] for pkg in ("mesh", "patterns", "discovery")
                   for path in (ROOT / pkg).rglob("*.py") for name in _imports(path)}
                  - _OURS)


@pytest.fixture(scope="module")
def importer() -> Iterator[subprocess.Popen[str]]:
    """One interpreter with the libraries loaded that forks a fresh child per module: the
    same check as a new interpreter per module (nothing of ours is loaded before it), at
    a fork's cost instead of an interpreter start and the libraries' import each."""
    with subprocess.Popen([sys.executable, "-c", _IMPORTER, *_libraries()], cwd=ROOT,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
            yield proc
        finally:
            proc.kill()  # (the with closes its pipes and waits for it)


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports_on_its_own(module: str,
                                         importer: subprocess.Popen[str]) -> None:
    """No circular import hides behind a lucky import order."""
    assert importer.stdin is not None
    assert importer.stdout is not None
    importer.stdin.write(module + "\n")
    importer.stdin.flush()
    assert json.loads(importer.stdout.readline()) == "ok"


LAYERS: list[tuple[str, ...]] = [
    ("mesh.errors", "mesh._support", "mesh._spool", "mesh._loop"),
    ("mesh._wire", "mesh._codec", "mesh._message", "mesh._names", "mesh._config", "mesh._ttl",
     "mesh._trace"),
    ("mesh._membership", "mesh._parts"),
    ("mesh._reliable", "mesh._pubsub", "mesh._services", "mesh._work"),
    ("mesh._memory", "mesh._figures"),
    ("mesh._core", "mesh._node_p2p", "mesh._node"),
    ("mesh._sync", "mesh._sync_streams", "mesh"),
    ("mesh._uplink",),
    ("mesh._agent", "mesh._bench", "mesh.cli", "mesh.__main__"),
]
"""The layers of `mesh`, lowest first: a module imports from its own layer or below."""


def _layer(module: str) -> int:
    best, found = -1, -1
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), rank
    assert found >= 0, f"{module} is in no layer: add it to LAYERS"
    return found


def _mesh_imports(path: pathlib.Path) -> set[str]:
    """The `mesh` modules `path` imports, relative imports resolved, `from x import m`
    counted as the module ``x.m`` when it is one."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("mesh"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MESH_MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mesh"))
    found.discard(module)
    return found


MESH_FILES = {_module_name(p): p for p in (ROOT / "mesh").rglob("*.py")}
MESH_MODULES = set(MESH_FILES)


def test_every_mesh_module_imports_only_its_layer_or_below() -> None:
    """The folder's layers hold: no part reaches up into the node, the CLI or the agent."""
    against = [f"{module} -> {target}"
               for module, path in sorted(MESH_FILES.items())
               for target in sorted(_mesh_imports(path))
               if target in MESH_MODULES and _layer(target) > _layer(module)]
    assert against == []


def test_no_import_cycle_between_mesh_modules() -> None:
    """Tarjan's strongly connected components over the module graph: all of size one."""
    graph = {m: {t for t in _mesh_imports(p) if t in MESH_MODULES and t != "mesh"}
             for m, p in MESH_FILES.items() if m != "mesh"}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert cycles == []
