"""What one ``engine_step`` span event costs in the OpenTelemetry SDK installed here: adding
it to a span, and encoding it for OTLP (what the batch exporter's thread does).

    python -m dspark.bench.otel_event_cost [--spans 200] [--events 20]

Each span gets ``--events`` events with the attributes a decode step's event carries
(``cluster.tracing.step_event_attributes`` of a drafted step with γ = 7); spans are encoded
with the OTLP/protobuf encoder the HTTP exporter uses. Prints µs per event for each part.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace


def main(argv: list[str] | None = None) -> int:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    from dspark.cluster.tracing import step_event_attributes

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=200, help="spans")
    parser.add_argument("--events", type=int, default=20, help="events per span")
    args = parser.parse_args(argv)

    class Encoding(SpanExporter):
        seconds = 0.0

        def export(self, spans):
            start = time.perf_counter()
            encode_spans(spans).SerializeToString()
            Encoding.seconds += time.perf_counter() - start
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Encoding()))
    tracer = provider.get_tracer("otel_event_cost")
    row = SimpleNamespace(step=1, phase="decode", drafted=True, gate="cost", proposed=7,
                          verified=7, accepted=3, committed=4, budget_mode="cluster",
                          step_tokens=128, external_tokens=0, prefill_tokens=0,
                          survival=(0.91, 0.82, 0.71, 0.62, 0.5, 0.41, 0.3))
    adding = 0.0
    for _ in range(args.spans):
        span = tracer.start_span("dspark.replica")
        start = time.perf_counter()
        for _ in range(args.events):
            span.add_event("engine_step", step_event_attributes(row))
        adding += time.perf_counter() - start
        span.end()  # NOTE: the simple processor encodes here, timed by the exporter
    n = args.spans * args.events
    print(f"{n} events: adding {1e6 * adding / n:.1f} µs per event (attributes built "
          f"included), encoding {1e6 * Encoding.seconds / n:.1f} µs per event")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
