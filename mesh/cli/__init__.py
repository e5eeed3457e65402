"""The `zeromesh` command line (entry point `mesh.cli:main`)."""

from ._main import main

__all__ = ["main"]
