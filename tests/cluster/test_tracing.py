"""Traces as an operator receives them: a served app with tracing on exports OTLP over HTTP
to a real receiver on loopback. One streamed request is one trace, ingress → router →
replica, under the client's ``traceparent``, with the GenAI attributes and one engine-step
event per step, whose numbers add up to the request's ``metrics.speculative_decoding``."""

from __future__ import annotations

import json
import secrets
import time

import httpx
import pytest

from dspark.bench.ttft_path import SpanReceiver

GENAI = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
         "gen_ai.request.max_tokens", "gen_ai.request.temperature", "gen_ai.request.top_p",
         "gen_ai.request.seed", "gen_ai.request.stream", "gen_ai.response.id",
         "gen_ai.response.finish_reasons", "gen_ai.usage.input_tokens",
         "gen_ai.usage.output_tokens", "server.address", "server.port")
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def receiver():
    r = SpanReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def traced_app(ray_cluster, served_app, receiver):
    from ray import serve

    from dspark.cluster.config import ServeConfig
    from dspark.cluster.serve import start

    # NOTE: a fixed budget drafts every step (no cost gate, whose choices follow this
    # machine's timings), so the drafted events checked below always exist
    cfg = ServeConfig(model_name="traced", max_num_seqs=4, num_blocks=128, threads=1,
                      replica_cpus=0.25, redis_url=served_app.redis_url, cluster="traced",
                      otlp_traces_endpoint=receiver.url, budget="fixed")
    start(cfg, app_name="traced", route_prefix="/traced")
    # NOTE: the router ranks by the board once the replica has published on it (before
    # that it falls back, and its span says so instead of naming a choice)
    from dspark.router.board import BoardConfig, BoardReader

    reader = BoardReader(BoardConfig(served_app.redis_url, cluster="traced"), start=False)
    deadline = time.monotonic() + 30
    while reader.refresh() is None or not reader.fresh():
        assert time.monotonic() < deadline, "the traced replica never published its load"
        time.sleep(0.1)
    yield f"http://{served_app.host}:{served_app.port}/traced"
    serve.delete("traced")


def wait_for_spans(receiver, trace_id, names, timeout_s=30.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        spans = {s["name"]: s for s in receiver.trace(trace_id)}
        if set(names) <= set(spans):
            return spans
        if time.monotonic() > deadline:
            raise AssertionError(f"spans of trace {trace_id} after {timeout_s} s: "
                                 f"{sorted(spans)}; wanted {sorted(names)}")
        time.sleep(0.2)


def traced_chat(url: str, receiver, trace_id: str) -> tuple[list[dict], dict[str, dict]]:
    """One streamed chat under the client's ``traceparent``: its SSE events and its spans."""
    body = {"model": "traced", "messages": [{"role": "user", "content": "What is 12 * 7?"}],
            "max_tokens": 24, "temperature": 0.7, "top_p": 0.9, "seed": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120,
                      headers={"traceparent": f"00-{trace_id}-{PARENT_ID}-01"})
    assert resp.status_code == 200, resp.text
    events = [json.loads(line[6:]) for line in resp.text.splitlines()
              if line.startswith("data: {")]
    return events, wait_for_spans(receiver, trace_id,
                                  ["chat traced", "dspark.route", "dspark.replica"])


def test_one_streamed_request_is_one_trace_from_ingress_to_replica(traced_app, receiver):
    # NOTE: on a loaded machine the replica's heartbeat can miss the board's TTL, and the
    # router then falls back (its span says why, and names no choice); such a request is a
    # correct trace of a fallback, so another is sent until one is routed by the board
    deadline, fallbacks = time.monotonic() + 90, []
    while True:
        trace_id = secrets.token_hex(16)
        events, spans = traced_chat(traced_app, receiver, trace_id)
        route = spans["dspark.route"]["attributes"]
        if "dspark.route.chosen" in route:
            break
        fallbacks.append(route.get("dspark.route.fallback_reason"))
        assert fallbacks[-1] == "board_stale", route  # an error would be a defect
        assert time.monotonic() < deadline, f"never routed by the board: {fallbacks}"
    spec = events[-1]["metrics"]["speculative_decoding"]
    usage = events[-1]["usage"]
    ingress, route, replica = spans["chat traced"], spans["dspark.route"], spans["dspark.replica"]
    assert ingress["trace_id"] == trace_id
    assert ingress["parent"] == PARENT_ID  # the client's span is the parent
    assert route["parent"] == replica["parent"] == ingress["span_id"]

    attrs = ingress["attributes"]
    assert set(GENAI) <= set(attrs), set(GENAI) - set(attrs)
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "traced"
    assert (attrs["gen_ai.request.max_tokens"], attrs["gen_ai.request.seed"]) == (24, 3)
    assert attrs["gen_ai.request.stream"] is True
    assert attrs["gen_ai.response.id"] == events[0]["id"]
    assert attrs["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert attrs["dspark.time_to_first_token_s"] > 0

    assert route["attributes"]["dspark.route.chosen"] in route["attributes"][
        "dspark.route.candidates"]
    assert len(route["attributes"]["dspark.route.scores"]) == len(
        route["attributes"]["dspark.route.candidates"])

    steps = [a for name, a in replica["events"] if name == "engine_step"]
    assert steps and steps[0]["dspark.spec.gate"] == "prefill"
    chunks = [a["dspark.step.prefill_tokens"] for a in steps if a["dspark.spec.gate"] == "prefill"]
    assert 0 < sum(chunks) <= usage["prompt_tokens"]
    drafted = [a for a in steps if a["dspark.spec.gate"] in ("cost", "arm", "probe", "always")]
    assert len(drafted) == spec["num_spec_steps"] > 0
    assert sum(a["dspark.spec.verified"] for a in drafted) == spec["num_draft_tokens"]
    assert sum(a["dspark.spec.accepted"] for a in drafted) == spec["num_accepted_draft_tokens"]
    assert sum(a["dspark.spec.committed"] for a in steps) == usage["completion_tokens"]
    for a in drafted:
        survival = [float(p) for p in a.get("dspark.spec.survival", "").split()]
        assert len(survival) == a["dspark.spec.verified"] <= a["dspark.spec.proposed"]
        assert survival == sorted(survival, reverse=True)  # a prefix survival only falls
        assert a["dspark.spec.budget_mode"] and a["dspark.step.verified_tokens"] > 0
    for a in steps:
        if a not in drafted:  # a gated-off step carries nothing of a draft
            assert "dspark.spec.verified" not in a and "dspark.spec.survival" not in a
    assert replica["events"][-1][0] == "finish"


def test_a_refused_request_is_traced_with_its_error_type(traced_app, receiver):
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    resp = httpx.post(f"{traced_app}/v1/chat/completions", timeout=60,
                      headers={"traceparent": f"00-{trace_id}-{PARENT_ID}-01"},
                      json={"model": "traced", "max_tokens": 100000,
                            "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 400
    span = wait_for_spans(receiver, trace_id, ["chat"])["chat"]  # no model named: not parsed
    assert span["attributes"]["error.type"] == "APIError"
    assert span["attributes"]["http.response.status_code"] == 400


def test_a_span_keeps_every_step_event_of_a_long_request():
    from dspark.router.tracing import make_tracer

    tracer = make_tracer("http://127.0.0.1:9/v1/traces")
    span = tracer.start_span("dspark.replica")
    for step in range(300):  # the SDK's default keeps 128
        span.add_event("engine_step", {"dspark.step": step})
    assert [e.attributes["dspark.step"] for e in span.events] == list(range(300))


def test_ttft_path_cuts_each_first_token_into_its_parts(traced_app, receiver):
    import asyncio

    from dspark.bench.ttft_path import PARTS, collect, summary, traced_loop

    sent = asyncio.run(traced_loop(traced_app, "traced", ["What is 6 * 7?", "Name a colour."],
                                   2, 4, 8))
    assert len(sent) == 4 and len({t for t, _, _ in sent}) == 4
    parts = collect(receiver, sent, timeout_s=60)
    assert len(parts) == 4, "every request's trace arrives whole"
    for p, (_, sent_ns, first_ns) in zip(parts, sent):
        assert list(p) == list(PARTS)
        # NOTE: the parts follow one another on one clock (every process is on this host)
        assert all(ms >= 0 for ms in p.values()), p
        assert p["engine"] > 0
        assert abs(sum(p.values()) - (first_ns - sent_ns) / 1e6) < 1e-3
    rows = summary(parts)
    assert set(rows) == {*PARTS, "TTFT"} and all(med <= p90 for med, p90 in rows.values())
