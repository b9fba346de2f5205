"""Where a streamed request's time to first token goes on its way through a running server,
from the traces the server exports (docs/observability.md, "Traces").

    dspark serve --otlp-traces-endpoint http://127.0.0.1:4319/v1/traces [...] &
    python -m dspark.bench.ttft_path --url http://127.0.0.1:8000 [--receiver-port 4319]
        [--concurrency 1,4] [--requests 32]

This script is the traces' receiver (OTLP/HTTP on ``--receiver-port``) and the clients:
at each concurrency, closed-loop streaming clients send ``dspark bench serve``'s prompts,
each under its own ``traceparent``, and note (wall clock) when they sent it and when its
first token arrived. Every process of the server is on this host, so the spans' times
share the clients' clock. Each request's TTFT is cut into consecutive parts:

- ``to ingress``: sent -> the ingress span opens (the HTTP proxy and its hop to the
  ingress);
- ``ingress``: -> the router's span opens (reading and validating the request, the
  handle's call to its router; the prompt is tokenized on the replica);
- ``route``: the router's span (choosing a replica);
- ``to replica``: -> the replica's ``queued`` event (the hop to the replica);
- ``engine``: -> the end of the first engine step that committed a token for it (the step
  under way when it arrived, then its prefill);
- ``to ingress (back)``: -> the ingress's ``first_token`` event;
- ``to client``: -> the first token at the client (the ingress's event, the proxy, HTTP).

Prints the median and the 90th percentile of each part per concurrency, in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PARTS = ("to ingress", "ingress", "route", "to replica", "engine", "to ingress (back)",
         "to client")


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def _attributes(items) -> dict:
    return {kv.key: _value(kv.value) for kv in items}


class SpanReceiver:
    """An OTLP/HTTP trace receiver on loopback: every exported span, decoded, with its
    start and end and its events' times (ns since the epoch)."""

    def __init__(self, port: int = 0) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the http.server API)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                spans = [{
                    "name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                    "parent": s.parent_span_id.hex(), "attributes": _attributes(s.attributes),
                    "start_ns": s.start_time_unix_nano, "end_ns": s.end_time_unix_nano,
                    "events": [(e.name, _attributes(e.attributes)) for e in s.events],
                    "event_ns": [e.time_unix_nano for e in s.events],
                } for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
                with receiver.lock:
                    receiver.spans += spans
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def trace(self, trace_id: str) -> list[dict]:
        """The spans received so far of one trace."""
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def close(self) -> None:
        self.server.shutdown()


def event_ns(span: dict, name: str, committed: bool = False) -> int | None:
    """The time of the span's first event called ``name`` (with ``committed``: the first
    ``engine_step`` that committed a token for the request)."""
    for (event, attrs), stamp in zip(span["events"], span["event_ns"]):
        if event == name and (not committed or attrs.get("dspark.spec.committed", 0) > 0):
            return stamp
    return None


def ttft_parts(spans: list[dict], sent_ns: int, first_ns: int) -> dict[str, float] | None:
    """One request's TTFT in ``PARTS`` (ms), from its trace's spans and the client's send and
    first-token times; None when a span or an event is missing (not exported yet)."""
    by_name = {s["name"]: s for s in spans}
    ingress = next((s for s in spans if s["name"].startswith(("chat ", "text_completion "))),
                   None)
    route, replica = by_name.get("dspark.route"), by_name.get("dspark.replica")
    if ingress is None or route is None or replica is None:
        return None
    marks = [sent_ns, ingress["start_ns"], route["start_ns"], route["end_ns"],
             event_ns(replica, "queued"), event_ns(replica, "engine_step", committed=True),
             event_ns(ingress, "first_token"), first_ns]
    if any(m is None for m in marks):
        return None
    return {part: (b - a) / 1e6 for part, a, b in zip(PARTS, marks, marks[1:])}


async def traced_loop(url: str, model: str, prompts: list[str], concurrency: int,
                      num_requests: int, max_tokens: int) -> list[tuple[str, int, int]]:
    """Closed-loop streaming clients, every request under a fresh ``traceparent``: (trace
    id, sent ns, first-token ns) per request."""
    import httpx

    from dspark.bench.serve_bench import stream_one

    done: list[tuple[str, int, int]] = []
    issued = iter(range(num_requests))

    async def worker(client):
        for i in issued:
            trace_id = secrets.token_hex(16)
            body = {"model": model, "stream": True, "max_tokens": max_tokens,
                    "temperature": 0.0, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}
            headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
            sent = time.time_ns()
            result = await stream_one(client, url, body, headers)
            done.append((trace_id, sent, sent + int(result.ttft * 1e9)))

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return done


def collect(receiver: SpanReceiver, sent: list[tuple[str, int, int]], timeout_s: float
            ) -> list[dict[str, float]]:
    """Every request's parts once its spans have arrived (the server's exporters post every
    few seconds); requests still incomplete after ``timeout_s`` are left out."""
    deadline = time.monotonic() + timeout_s
    while True:
        parts = [ttft_parts(receiver.trace(t), s, f) for t, s, f in sent]
        if all(p is not None for p in parts) or time.monotonic() > deadline:
            return [p for p in parts if p is not None]
        time.sleep(0.5)


def summary(parts: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """(median, 90th percentile) ms of each part and of their sum, the TTFT."""
    out = {}
    for name in (*PARTS, "TTFT"):
        values = sorted(sum(p.values()) if name == "TTFT" else p[name] for p in parts)
        out[name] = (statistics.median(values), values[min(len(values) - 1,
                                                           int(0.9 * len(values)))])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the server's base URL")
    parser.add_argument("--model", default="dspark-demo", help="the served model's name")
    parser.add_argument("--receiver-port", type=int, default=4319,
                        help="port of this script's OTLP/HTTP receiver on 127.0.0.1")
    parser.add_argument("--concurrency", default="1,4", help="comma-separated")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--target", default="checkpoints/target",
                        help="the target checkpoint whose tokenizer sizes the prompts")
    parser.add_argument("--span-timeout", type=float, default=30.0,
                        help="seconds to wait for the last spans after the load")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if args.requests < 1 or any(c < 1 for c in concurrencies):
        raise SystemExit("--requests and every --concurrency must be >= 1")
    from pathlib import Path

    from dspark.bench.serve_bench import serve_prompts
    from dspark.models.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(Path(args.target) / "tokenizer.json")
    prompts = serve_prompts(tokenizer, args.max_tokens, 8)
    receiver = SpanReceiver(args.receiver_port)
    try:
        print(f"receiving spans at {receiver.url}; ms per part, median / p90")
        print("| C | requests | " + " | ".join(PARTS) + " | TTFT |")
        print("|---:|---:|" + "---:|" * (len(PARTS) + 1))
        for c in concurrencies:
            sent = asyncio.run(traced_loop(args.url.rstrip("/"), args.model, prompts, c,
                                           max(args.requests, 2 * c), args.max_tokens))
            rows = summary(collect(receiver, sent, args.span_timeout)) if sent else {}
            cells = " | ".join(f"{rows[p][0]:.1f} / {rows[p][1]:.1f}" for p in
                               (*PARTS, "TTFT")) if rows else "no complete trace"
            print(f"| {c} | {len(sent)} | {cells} |", flush=True)
    finally:
        receiver.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
