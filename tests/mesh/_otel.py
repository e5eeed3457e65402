"""OpenTelemetry for child processes: a ``sitecustomize`` that configures an SDK which writes
each finished span as one JSON line to ``$MESH_TEST_SPANS`` (as ``opentelemetry-instrument``
configures one from the ``OTEL_*`` environment, before the program runs), and its reader."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SITECUSTOMIZE = '''
import json, os
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult


class _Lines(SpanExporter):
    def __init__(self, path):
        self._path = path

    def export(self, spans):
        with open(self._path, "a") as out:
            for s in spans:
                out.write(json.dumps({
                    "name": s.name, "kind": s.kind.name,
                    "trace_id": format(s.context.trace_id, "032x"),
                    "span_id": format(s.context.span_id, "016x"),
                    "parent_id": format(s.parent.span_id, "016x") if s.parent else None,
                    "attributes": dict(s.attributes or {})}) + "\\n")
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass


_path = os.environ.get("MESH_TEST_SPANS")
if _path:
    _provider = TracerProvider()
    _provider.add_span_processor(SimpleSpanProcessor(_Lines(_path)))
    trace.set_tracer_provider(_provider)
'''


def traced_env(tmp: Path, spans: Path) -> dict[str, str]:
    """Environment entries that make a child Python configure the SDK writing to `spans`."""
    site = tmp / "otel-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "MESH_TEST_SPANS": str(spans)}


def read_spans(path: Path) -> list[dict[str, Any]]:
    """The spans written so far (none when the file is not there yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
