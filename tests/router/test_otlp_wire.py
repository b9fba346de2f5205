"""Packed span events (``router.otlp_wire``): the bytes written for them are the OTLP
message the SDK's own encoder makes, and the exporter posts that message."""

from __future__ import annotations

import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from dspark.cluster.tracing import StepEvent, StepEvents, extract
from dspark.router.otlp_wire import encode_request, int_pair, packed_exporter, pair, varint


def row(step: int, gate: str, **kw) -> SimpleNamespace:
    fields = dict(req_id="r", step=step, gate=gate, drafted=gate in ("cost", "arm", "probe", "always"),
                  proposed=0, verified=0, accepted=0, committed=1, budget_mode="cluster",
                  step_tokens=40, external_tokens=0, prefill_tokens=0, survival=())
    return SimpleNamespace(**{**fields, **kw})


ROWS = [row(0, "prefill", prefill_tokens=37, committed=1),
        row(1, "cost", proposed=7, verified=5, accepted=3, committed=4, step_tokens=300,
            external_tokens=2 ** 40, survival=(0.97, 0.9, 0.5, 0.25, 0.125)),
        row(2, "gated_off", budget_mode="local"),
        row(3, "probe", proposed=1, verified=1, accepted=0, survival=[0.0]),
        row(10 ** 6, "cost", proposed=2, verified=2, accepted=2, committed=3, step_tokens=5000)]


class Finished(SpanProcessor):
    def __init__(self) -> None:
        self.spans = []

    def on_end(self, span) -> None:
        self.spans.append(span)


def finished_spans() -> list:
    """Spans of two scopes: plain ones, and replica spans with plain and packed events."""
    finished = Finished()
    provider = TracerProvider(resource=Resource.create({"service.name": "test"}))
    provider.add_span_processor(finished)
    parent = extract({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                      "tracestate": "k=v,w=1"})
    plain = provider.get_tracer("a", "1.2", schema_url="https://example.test/s").start_span(
        "ingress", context=parent, kind=SpanKind.SERVER, attributes={"n": 3, "x": 0.5})
    plain.add_event("first_token", {"ok": True, "ids": [1, -2, 300], "s": "é", "b": b"\x00"})
    plain.add_event("same_key", {"ok": 1})  # NOTE: True == 1, but not on the wire
    plain.set_status(Status(StatusCode.ERROR, "boom"))
    plain.end()
    steps = StepEvents()
    for n in range(4):
        span = provider.get_tracer("b").start_span("dspark.replica")
        span.add_event("queued")
        steps.open("r", span)
        for i, r in enumerate(ROWS[: n + 2]):
            steps.on_request_step([r, row(i, "cost", req_id="other")])
        steps.close("r", span)
        span.add_event("finish", {"finish_reason": "stop", "neg": -1, "big": 2 ** 62})
        span.end()
    return finished.spans


def test_packed_events_encode_to_the_message_the_sdk_encoder_makes():
    spans = finished_spans()
    assert sum(isinstance(e, StepEvent) for s in spans for e in s.events) == 2 + 3 + 4 + 5
    mine = ExportTraceServiceRequest.FromString(encode_request(spans))
    assert mine == encode_spans(spans)
    replica = mine.resource_spans[0].scope_spans[1].spans[2]
    assert [e.name for e in replica.events] == ["queued"] + ["engine_step"] * 4 + ["finish"]


def test_a_batch_with_links_is_left_to_the_sdk_encoder():
    spans = finished_spans()
    provider = TracerProvider()
    finished = Finished()
    provider.add_span_processor(finished)
    provider.get_tracer("c").start_span(
        "linked", links=[Link(spans[0].get_span_context(), {"why": "retry"})]).end()
    spans += finished.spans
    assert ExportTraceServiceRequest.FromString(encode_request(spans)) == encode_spans(spans)


def test_an_int_pair_is_the_pair_of_any_int():
    for value in (-(2 ** 63), -5, -1, 0, 127, 4095, 4096, 10 ** 6, 2 ** 40, 2 ** 63 - 1):
        assert int_pair("dspark.step", value) == pair("dspark.step", value), value


def test_varint_matches_protobuf_for_edge_values():
    from google.protobuf.internal.encoder import _VarintBytes

    for n in (0, 1, 127, 128, 300, 2 ** 31, 2 ** 63 - 1, -1, -(2 ** 63)):
        assert varint(n) == _VarintBytes(n if n >= 0 else n + (1 << 64))


@pytest.fixture
def collector():
    """A loopback OTLP/HTTP endpoint that queues each posted body."""
    bodies: queue.Queue = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the http.server API)
            bodies.put(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", bodies
    server.shutdown()


def test_the_exporter_posts_the_sdk_message(collector):
    url, bodies = collector
    spans = finished_spans()
    exporter = packed_exporter(url)
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    posted = ExportTraceServiceRequest.FromString(bodies.get(timeout=30))
    assert posted == encode_spans(spans)
    exporter.shutdown()
