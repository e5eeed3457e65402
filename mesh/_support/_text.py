"""Names as error messages show them: plainly quoted, each unprintable character as ``?``.

Python's repr escaped quotes and backslashes (``'w"q\\\\z'`` for ``w"q\\z``), which JSON
escapes again in the agent's ``{"error": ...}``; a name from a URL or the network may
hold escape sequences, which must not drive a terminal.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """`text` with each character that is not printable as ``?``."""
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def quoted(text: str) -> str:
    """`text` in single quotes for an error message, as the user wrote it (`printable`)."""
    return f"'{printable(text)}'"
