"""OpenTelemetry traces: PRODUCER spans for sends, CONSUMER spans for receipts.

Off unless the application configured an OpenTelemetry SDK: opentelemetry-api
must already be imported (an SDK set up by the app, or by
``opentelemetry-instrument`` from the ``OTEL_*`` environment, imports it) and
its global tracer provider must be a real one, not the API's default proxy or
no-op. `refresh` decides that at each node start — one ``sys.modules`` look-up
when the API was never imported, so a node without tracing imports nothing —
and the hooks in the hot paths test the module-level `ON` and nothing else.
Configure the SDK before starting nodes; one configured later is seen by the
next node start.

Spans (attributes: ``messaging.system`` = ``zeromesh``,
``messaging.destination.name``, ``messaging.operation``, and on receipts
``messaging.message.id``):

- a send (``publish``, ``push``, ``request``) is a PRODUCER span, a child of the
  ``traceparent`` the app put in the message's headers, else of the current
  context; the headers sent carry the PRODUCER span's own ``traceparent`` (and
  ``tracestate``) in its place. A reliable or retained `publish_many` is one
  span for the batch, whose context all its messages carry. A request's span
  lasts until the reply.
- a receipt is a CONSUMER span, a child of the context in the message's
  headers (a root span when it has none): around a subscription callback, a
  worker's handler or a service handler (``process``, current while it runs,
  so the app's own spans nest under it); when a message enters a
  subscription's queue, or when a worker takes one from its queue by
  iteration, ``next`` or ``take`` (``receive``, a point in time: an app
  iterating continues the trace from ``msg.headers`` itself, with
  ``opentelemetry.propagate.extract``). A worker's handler has both: the
  take, then its ``process`` span. The blocking `Node`'s subscriptions are
  fed by a callback on the loop: their ``process`` span is the hand-over to
  the node's thread, not the application's work.
- the agent adds a CONSUMER span per message it forwards: around a webhook's
  delivery (its retries included), whose context each POST's ``traceparent``
  carries, and when an SSE stream has written it.

Only what the application sends and receives is traced: the mesh's own
traffic (hellos, credit, acknowledgements, retained and history queries) is not.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ._message import Message, sent_headers

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import Span, Tracer

ON: bool = False
"""A real tracer provider is configured: the hooks make spans."""

SYSTEM: Final[str] = "zeromesh"
_TRACE_CONTEXT: Final = frozenset(("traceparent", "tracestate"))
_tracer: Tracer | None = None
_propagator: TextMapPropagator | None = None

R = TypeVar("R")


def refresh() -> bool:
    """Decide `ON` (at every node start): is a real tracer provider configured?"""
    global ON, _tracer, _propagator
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:  # never imported: nothing configured it (and we import nothing)
        ON, _tracer = False, None
        return ON
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        ON, _tracer = False, None
        return ON
    from opentelemetry import propagate  # only once tracing is on

    _tracer = provider.get_tracer("zeromesh")
    _propagator = propagate.get_global_textmap()  # W3C trace context unless OTEL_PROPAGATORS
    ON = True
    return ON


def _attrs(operation: str, name: str, destination: str) -> dict[str, Any]:
    kind = "send" if operation == "publish" else operation
    return {"messaging.system": SYSTEM, "messaging.destination.name": destination,
            "messaging.operation": operation, "messaging.operation.type": kind,
            "messaging.operation.name": name}


def _context_of(headers: Mapping[str, str] | None, base: Context | None) -> Context | None:
    """The context a message's headers carry (based on `base`; None: the current one)."""
    assert _propagator is not None
    if not headers:
        return base
    if base is None:
        from opentelemetry import context
        base = context.get_current()
    return _propagator.extract(_carrier(headers), context=base)


def _carrier(headers: Mapping[str, str]) -> dict[str, str]:
    """`headers` with the propagator's names (``traceparent``...) in lower case, as it reads
    and writes them: an app's ``Traceparent`` is a parent too, and is replaced rather than
    sent beside the producer's own (the lower-case spelling wins when both are there)."""
    assert _propagator is not None
    fields = _propagator.fields
    out: dict[str, str] = {}
    for key, value in headers.items():
        low = key.lower()
        if low == key or low not in fields:
            out[key] = value
        elif low not in headers:
            out[low] = value
    return out


@contextlib.contextmanager
def producing(name: str, destination: str, headers: Mapping[str, str] | None,
              count: int = 1) -> Iterator[dict[str, str]]:
    """A PRODUCER span over a send; yields the headers to send, carrying it.

    Its parent is the ``traceparent`` in `headers` when the app set one, else
    the current context.
    """
    from opentelemetry import trace
    assert _tracer is not None
    assert _propagator is not None
    # checked first, so bad headers fail as an untraced send's do (TypeError, ConfigError),
    # not inside the propagator (AttributeError...)
    headers = sent_headers(headers)
    attrs = _attrs("publish", name, destination)
    if count != 1:
        attrs["messaging.batch.message_count"] = count
    span = _tracer.start_span(f"{name} {destination}", _context_of(headers, None),
                              kind=trace.SpanKind.PRODUCER, attributes=attrs)
    out = _carrier(headers) if headers else {}
    if _propagator.fields >= _TRACE_CONTEXT:
        # the span carries a valid parent's tracestate; one beside an unreadable
        # traceparent is no trace's of ours (W3C: discarded with it)
        for key in _TRACE_CONTEXT:
            out.pop(key, None)
    _propagator.inject(out, context=trace.set_span_in_context(span))
    try:
        yield out
    except Exception as exc:
        _failed(span, exc)
        raise
    finally:
        span.end()


def _failed(span: Span, exc: Exception) -> None:
    from opentelemetry.trace import Status, StatusCode
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def _consumer(operation: str, name: str, msg: Message, destination: str | None,
              subscription: str | None) -> tuple[str, Context | None, dict[str, Any]]:
    from opentelemetry.context import Context
    attrs = _attrs(operation, name, destination or msg.topic)
    attrs["messaging.message.id"] = msg.id
    if subscription is not None:
        attrs["messaging.destination.subscription.name"] = subscription
    return (f"{operation} {destination or msg.topic}", _context_of(msg.headers, Context()),
            attrs)


def received(msgs: Iterable[Message], name: str, *, subscription: str | None = None,
             destination: str | None = None, operation: str = "receive") -> None:
    """A CONSUMER span, started and ended now, for each of `msgs` (a point in time)."""
    from opentelemetry.trace import SpanKind
    assert _tracer is not None
    for msg in msgs:
        span_name, ctx, attrs = _consumer(operation, name, msg, destination, subscription)
        _tracer.start_span(span_name, ctx, kind=SpanKind.CONSUMER, attributes=attrs).end()


@contextlib.contextmanager
def processing(msg: Message, name: str, *, destination: str | None = None,
               subscription: str | None = None) -> Iterator[Span]:
    """A CONSUMER span around processing `msg`, current meanwhile."""
    from opentelemetry.trace import SpanKind
    assert _tracer is not None
    span_name, ctx, attrs = _consumer("process", name, msg, destination, subscription)
    with _tracer.start_as_current_span(span_name, ctx, kind=SpanKind.CONSUMER,
                                       attributes=attrs) as span:
        yield span


@contextlib.contextmanager
def continuing(headers: Mapping[str, str]) -> Iterator[None]:
    """The trace context in `headers` (an HTTP request's) current meanwhile: the parent of
    the sends it causes that carry no ``traceparent`` of their own."""
    from opentelemetry import context
    assert _propagator is not None
    token = context.attach(_propagator.extract(headers))
    try:
        yield
    finally:
        context.detach(token)


def inject(headers: dict[str, str]) -> None:
    """Put the current context (a CONSUMER span forwarding a message) into `headers`."""
    assert _propagator is not None
    _propagator.inject(headers)


def traced(handler: Callable[[Message], R], name: str, *, destination: str | None = None,
           subscription: str | None = None) -> Callable[[Message], R]:
    """`handler` (sync or async, the same kind back) inside a ``process`` span per call.

    A sync handler's span ends when it returns (an awaitable it returns runs after)."""
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)):  # noqa: B004 - a callable object's method
        async_handler: Callable[[Message], Awaitable[Any]] = handler  # type: ignore[assignment]

        async def traced_async(msg: Message) -> Any:
            with processing(msg, name, destination=destination, subscription=subscription):
                return await async_handler(msg)

        return traced_async  # type: ignore[return-value]

    def traced_sync(msg: Message) -> R:
        with processing(msg, name, destination=destination, subscription=subscription):
            return handler(msg)

    return traced_sync
