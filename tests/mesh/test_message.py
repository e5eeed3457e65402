"""`Message` is a plain value type: introspectable, encodable and equal to its copy.

A received work or durable message carries where `ack()` goes, but outside its
fields, so none of this depends on how the message arrived.
"""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import msgspec
import pytest

import mesh
from mesh import Message
from tests.helpers import aeventually

from .conftest import MakeNode


def test_type_hints_of_message_resolve_in_a_fresh_interpreter() -> None:
    """The check the issue names, exactly as a user would type it."""
    code = "import mesh, typing; print(sorted(typing.get_type_hints(mesh.Message)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert "topic" in out
    assert "_receipt" not in out


@pytest.mark.parametrize("name", [n for n in mesh.__all__ if isinstance(getattr(mesh, n), type)])
def test_every_public_class_has_resolvable_type_hints(name: str) -> None:
    """Rewriting ``__module__`` to ``mesh`` must not break annotation lookup."""
    typing.get_type_hints(getattr(mesh, name))


def test_message_converts_and_has_a_json_schema() -> None:
    msg = msgspec.convert({"topic": "a.b", "data": "aGk=", "source": "n", "source_id": "x",
                           "seq": 1, "timestamp": 2.0}, Message, strict=False)
    assert msg.data == b"hi"
    schema = msgspec.json.schema(Message)
    assert "_receipt" not in str(schema)


async def test_a_pulled_message_equals_its_copy_and_encodes(make_node: MakeNode,
                                                             tmp_path: Path) -> None:
    """A work message with a receipt attached compares and encodes by its fields alone."""
    pusher = await make_node("pusher", data_dir=str(tmp_path / "p"))
    worker = await make_node("worker")
    work = await worker.pull("jobs")
    await pusher.wait_for_workers("jobs", timeout=10)
    await pusher.push("jobs", b"payload", reliable=True)
    first = await work.next(timeout=10)
    copy = msgspec.convert(msgspec.to_builtins(first), Message)
    assert copy == first
    assert msgspec.json.decode(msgspec.json.encode(first))["data"] == "cGF5bG9hZA=="
    first.nack()  # the receipt still works: the message comes again
    again = await work.next(timeout=10)
    assert again == first
    again.ack()
    await aeventually(lambda: pusher.stats["acked"] == 1, timeout=5)
