"""What one ``engine_step`` span event costs in the OpenTelemetry SDK installed here, two
ways side by side: the SDK's own event and encoder, and the packed event the replica
writes (``cluster.tracing.StepEvent``, encoded by ``router.otlp_wire``).

    python -m dspark.bench.otel_event_cost [--spans 200] [--events 20] [--rounds 5]

Each span gets ``--events`` events of a drafted decode step with γ = 7; the spans are then
encoded into the OTLP/protobuf request the HTTP exporter posts (what the batch exporter's
thread does, holding the replica's GIL). The two ways alternate over ``--rounds``; prints
the median µs per event to add and to encode (``tests/router/test_otlp_wire.py`` checks
that both ways make the same request).
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

ROW = SimpleNamespace(req_id="r", step=1, drafted=True, gate="cost", proposed=7, verified=7,
                      accepted=3, committed=4, budget_mode="cluster", step_tokens=128,
                      external_tokens=0, prefill_tokens=0,
                      survival=(0.91, 0.82, 0.71, 0.62, 0.5, 0.41, 0.3))


def _spans(tracer, packed: bool, num_spans: int, num_events: int) -> tuple[list, float]:
    """Finished spans with their step events, and the seconds spent adding the events."""
    from dspark.cluster.tracing import StepEvents, step_event_attributes

    steps, spans, adding = StepEvents(), [], 0.0
    for _ in range(num_spans):
        span = tracer.start_span("dspark.replica")
        start = time.perf_counter()
        if packed:  # the replica's path: rows on the engine thread, events at the end
            steps.open("r", span)
            for _ in range(num_events):
                steps.on_request_step([ROW])
            steps.close("r", span)
        else:
            for _ in range(num_events):
                span.add_event("engine_step", step_event_attributes(ROW))
        adding += time.perf_counter() - start
        span.end()
        spans.append(span)
    return spans, adding


def main(argv: list[str] | None = None) -> int:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider

    from dspark.router.otlp_wire import encode_request

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=200, help="spans")
    parser.add_argument("--events", type=int, default=20, help="events per span")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    args = parser.parse_args(argv)

    tracer = TracerProvider().get_tracer("otel_event_cost")
    ways = {"SDK event + SDK encoder": (False, lambda s: encode_spans(s).SerializeToString()),
            "packed event (dspark)": (True, encode_request)}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    encoded = {}
    n = args.spans * args.events
    for _ in range(args.rounds):
        for name, (packed, encode) in ways.items():
            spans, adding = _spans(tracer, packed, args.spans, args.events)
            start = time.perf_counter()
            encoded[name] = encode(spans)
            times[name].append((1e6 * adding / n, 1e6 * (time.perf_counter() - start) / n))
    for name, rows in times.items():
        add = statistics.median(a for a, _ in rows)
        enc = statistics.median(e for _, e in rows)
        print(f"{name}: adding {add:.1f} µs per event, "
              f"encoding {enc:.1f} µs per event, {add + enc:.1f} µs in all")
    sizes = {name: len(data) for name, data in encoded.items()}
    print(f"{n} events per round, {args.rounds} rounds (each way builds the attributes "
          f"where it must: the SDK when adding, packed when encoding); request bytes: {sizes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
