"""Finding a broker's program for the uplink tests: skipped when it is missing, unless CI
says the brokers are required.

`require_binary` is what every broker helper calls before it starts a broker (the NATS
one in `_nats_server`, the mosquitto one). Without the program the test is skipped with
the package to install — a developer without nats-server can still run the rest. In CI
(`.ci/run` installs the brokers and exports ``ZEROMESH_REQUIRE_BROKERS=1``) a missing
program fails the test instead, so the uplink tests cannot go quietly unrun there.
"""

from __future__ import annotations

import os
import shutil
from typing import Final

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
    reason = f"{name} not installed (apt-get install {apt_package})"
    if os.environ.get(REQUIRE_BROKERS_ENV) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_BROKERS_ENV}=1 requires it", pytrace=False)
    pytest.skip(reason)
