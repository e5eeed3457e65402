"""One trace across hosts: `zeromesh pub` on h1, `zeromesh sub` on h2, each a real process
in its own network namespace with an OpenTelemetry SDK configured at its start (writing its
spans to a file of its own): the subscriber's CONSUMER span is a child of the publisher's
PRODUCER span, in the same trace."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests import netns
from tests.mesh._otel import read_spans, traced_env
from tests.system._meshproc import host_env, mesh_argv, unique

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]


def test_a_message_is_one_trace_from_host_to_host(lan: netns.Lan, tmp_path: Path) -> None:
    h1, h2 = lan[1], lan[2]
    mesh = unique("trace")
    pub_spans, sub_spans = tmp_path / "h1.jsonl", tmp_path / "h2.jsonl"
    sub = h2.popen(mesh_argv("sub", h2, mesh, "traced.>", "--count", "1", "--timeout", "40",
                             "--json"),
                   env={**host_env(h2), **traced_env(tmp_path, sub_spans)},
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pub = h1.run(mesh_argv("pub", h1, mesh, "traced.x", "over the wire",
                           "--wait-subscribers", "1", "--timeout", "30"),
                 timeout=45, env={**host_env(h1), **traced_env(tmp_path, pub_spans)})
    assert pub.returncode == 0, pub.stderr
    out, err = sub.communicate(timeout=45)
    assert sub.returncode == 0, err
    assert "over the wire" in out
    (producer,) = [s for s in read_spans(pub_spans) if s["kind"] == "PRODUCER"]
    assert producer["name"] == "publish traced.x"
    (consumer,) = [s for s in read_spans(sub_spans) if s["kind"] == "CONSUMER"]
    assert consumer["trace_id"] == producer["trace_id"]
    assert consumer["parent_id"] == producer["span_id"]
    assert consumer["attributes"]["messaging.destination.name"] == "traced.x"
