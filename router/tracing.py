"""The tracer and W3C context helpers the load-board router shares with the cluster
(``dspark.cluster.tracing`` explains the traces). Only the OpenTelemetry SDK and its OTLP
exporter: the router runs in the ingress process and stays light.

Each process makes its own provider (never the global one, which Ray may own).
"""

from __future__ import annotations

from collections.abc import Mapping


def make_tracer(endpoint: str | None, sample_ratio: float = 1.0, component: str = "dspark"):
    """A tracer exporting to ``endpoint`` (None: tracing off, returns None)."""
    if not endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": "dspark", "service.namespace": "dspark",
                                  "dspark.component": component}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint),
                                                   schedule_delay_millis=500))
    return provider.get_tracer("dspark")


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
