"""The lint gate: ruff and mypy (strict) report nothing, so a lint or type error fails the suite.

Both run from this interpreter's environment (``sys.executable -m ...``) with the
project's own configuration (pyproject.toml), over what ``tox -e lint`` checks.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINTED = ["mesh", "patterns", "discovery", "tests", "examples", "benchmarks"]
"""What ruff checks; mypy checks its configured ``files`` (the same directories)."""


def _run_tool(module: str, *args: str, timeout: float) -> None:
    """Run ``python -m <module> <args>`` in the repository root; fail with its output unless
    it exits 0."""
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed here: pip install -e '.[test]'", pytrace=False)
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        command = " ".join([module, *args])
        pytest.fail(f"{command} exited {done.returncode}:\n{done.stdout}{done.stderr}",
                    pytrace=False)


@pytest.mark.timeout(180)
def test_ruff_finds_nothing() -> None:
    """``ruff check`` over the packages, tests, examples and benchmarks is clean."""
    _run_tool("ruff", "check", *LINTED, timeout=150)


@pytest.mark.timeout(300)
def test_mypy_strict_finds_nothing() -> None:
    """``mypy`` over its configured files (packages, tests, examples, benchmarks) is clean;
    a cold run (no .mypy_cache) can take a minute or more."""
    _run_tool("mypy", timeout=270)
