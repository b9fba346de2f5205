"""The tracer and W3C context helpers the load-board router shares with the cluster
(``dspark.cluster.tracing`` explains the traces). Only the OpenTelemetry SDK and its OTLP
exporter: the router runs in the ingress process and stays light.

Each process makes its own provider (never the global one, which Ray may own).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping

MAX_SPAN_EVENTS = 1 << 16
"""Events one span keeps (the SDK's default, 128, would cut a long request's step events)."""


_PROVIDERS: dict[tuple[str, float], object] = {}
"""This process's tracer providers by (endpoint, sample ratio): the ingress and the router
share one, so one batch exporter thread posts for both."""
_PROVIDERS_LOCK = threading.Lock()


def make_tracer(endpoint: str | None, sample_ratio: float = 1.0, component: str = "dspark"):
    """A tracer exporting to ``endpoint`` (None: tracing off, returns None), with
    instrumentation scope ``dspark.<component>``."""
    if not endpoint:
        return None
    with _PROVIDERS_LOCK:
        provider = _PROVIDERS.get((endpoint, sample_ratio))
        if provider is None:
            provider = _PROVIDERS[(endpoint, sample_ratio)] = _provider(endpoint, sample_ratio)
    return provider.get_tracer(f"dspark.{component}")


def shutdown_tracing() -> None:
    """Export what is pending and stop this process's providers (the next ``make_tracer``
    makes new ones)."""
    with _PROVIDERS_LOCK:
        providers = list(_PROVIDERS.values())
        _PROVIDERS.clear()
    for provider in providers:
        provider.shutdown()


def _provider(endpoint: str, sample_ratio: float):
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from dspark.router.otlp_wire import packed_exporter

    provider = TracerProvider(
        resource=Resource.create({"service.name": "dspark", "service.namespace": "dspark"}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        span_limits=SpanLimits(max_events=None if os.environ.get("OTEL_SPAN_EVENT_COUNT_LIMIT")
                               else MAX_SPAN_EVENTS))
    # NOTE: the SDK's default export delay (5 s, or OTEL_BSP_SCHEDULE_DELAY): one POST per
    # process every few seconds, not several a second
    provider.add_span_processor(BatchSpanProcessor(packed_exporter(endpoint)))
    return provider


def extract(carrier: Mapping[str, str] | None):
    """The OpenTelemetry context of a W3C carrier (headers, or a ``trace_context``)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(dict(carrier or {}))


def inject(span) -> dict[str, str] | None:
    """A W3C carrier of ``span``'s context (None when the span is not recording)."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if span is None or not span.is_recording():
        return None
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, trace.set_span_in_context(span))
    return carrier
