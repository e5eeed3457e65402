"""Finding a broker's program (or a client library) for the tests that need one: skipped when
it is missing, unless CI says the brokers are required.

`require_binary` is what every broker helper calls before it starts a broker (the NATS
one in `_nats_server`, the mosquitto one). Without the program the test is skipped with
the package to install — a developer without nats-server can still run the rest. In CI
(`.ci/run` installs the brokers and exports ``ZEROMESH_REQUIRE_BROKERS=1``) a missing
program fails the test instead, so the uplink tests cannot go quietly unrun there.
`require_module` does the same for a Python client library (zenoh-python for
``benchmarks/peers.py``, from the ``bench`` extra).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Final, NoReturn

import pytest

REQUIRE_BROKERS_ENV: Final[str] = "ZEROMESH_REQUIRE_BROKERS"
"""Set to ``1`` (CI): a missing broker program fails the test instead of skipping it."""

_SBIN_DIRS: Final[tuple[str, ...]] = ("/usr/local/sbin", "/usr/sbin", "/sbin")
"""Debian installs nats-server and mosquitto in /usr/sbin, which a non-root PATH lacks."""


def find_binary(name: str) -> str | None:
    """The absolute path of program `name` on PATH or in the sbin directories, or None."""
    path = os.environ.get("PATH", os.defpath)
    return shutil.which(name, path=os.pathsep.join([path, *_SBIN_DIRS]))


def require_binary(name: str, apt_package: str) -> str:
    """The absolute path of program `name`; if it is not installed, skips the calling test
    (or fails it when ``ZEROMESH_REQUIRE_BROKERS=1``) with the apt package to install."""
    found = find_binary(name)
    if found is not None:
        return found
    _missing(f"{name} not installed (apt-get install {apt_package})")


def require_module(name: str, install: str) -> None:
    """Skips the calling test if Python module `name` cannot be imported here (or fails it
    when ``ZEROMESH_REQUIRE_BROKERS=1``), with `install`, the command that installs it."""
    if importlib.util.find_spec(name) is None:
        _missing(f"{name} not installed ({install})")


def _missing(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_BROKERS_ENV) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_BROKERS_ENV}=1 requires it", pytrace=False)
    pytest.skip(reason)
