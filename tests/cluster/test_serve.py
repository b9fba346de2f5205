"""The served app over real HTTP on a real local Ray cluster, with a real Redis: OpenAI
clients stream from it, outputs equal plain decoding, bad input gets OpenAI-shaped 4xx,
a disconnecting client frees its KV, and replicas publish their load to the board."""

from __future__ import annotations

import json
import time

import httpx
import pytest

PROMPT = "What is 17 times 3?"


@pytest.fixture(scope="module")
def url(served_url):
    return served_url


@pytest.fixture(scope="module")
def plain(demo_model):
    from dspark.models.generation import SamplingParams, generate_text

    model, tok = demo_model
    return lambda prompt, n: generate_text(model, tok, prompt, SamplingParams(max_tokens=n))


def test_streaming_chat_with_the_openai_client_equals_plain_decoding(url, served_app, plain):
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    chunks = list(client.chat.completions.create(
        model=served_app.model_name, messages=[{"role": "user", "content": PROMPT}],
        max_tokens=32, temperature=0, stream=True, stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain(PROMPT, 32)
    assert len({c.id for c in chunks}) == 1
    for c in chunks:
        assert c.object == "chat.completion.chunk" and c.model == served_app.model_name
        assert c.created > 0 and all(choice.index == 0 for choice in c.choices)
    final = chunks[-1]
    assert final.choices == [] and final.usage.completion_tokens > 0
    spec = final.model_extra["metrics"]["speculative_decoding"]
    # NOTE: whether the cost gate drafts follows this replica's measured step costs (a
    # fixed-budget app checks drafted steps: test_tracing.py); the metrics add up either way
    assert sum(spec["acceptance_histogram"]) == spec["num_spec_steps"]
    assert len(spec["acceptance_histogram"]) == spec["num_spec_tokens"] + 1


def test_non_streaming_completion_reports_usage_and_spec_metrics(url, served_app):
    body = {"model": served_app.model_name, "prompt": "def add(a, b):", "max_tokens": 16,
            "temperature": 0, "ignore_eos": True}
    resp = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["object"] == "text_completion" and out["choices"][0]["index"] == 0
    assert out["usage"]["completion_tokens"] == 16
    assert out["choices"][0]["finish_reason"] == "length"
    spec = out["metrics"]["speculative_decoding"]
    assert 0.0 <= spec["draft_acceptance_rate"] <= 1.0
    assert spec["mean_acceptance_length"] >= 1.0


def test_max_completion_tokens_and_stop_strings(url, served_app, plain):
    reference = plain(PROMPT, 40)
    stop = reference[10:14]
    body = {"model": served_app.model_name, "messages": [{"role": "user", "content": PROMPT}],
            "max_completion_tokens": 40, "temperature": 0, "stop": [stop]}
    out = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    text = out["choices"][0]["message"]["content"]
    assert text == reference[: reference.find(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"


def test_models_health_and_openapi(url, served_app):
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["board"]["reachable"], health
    models = httpx.get(f"{url}/v1/models").json()
    assert models["data"][0]["id"] == served_app.model_name
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(paths)


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ({"model": "dspark-demo", "prompt": "hi", "max_tokens": 100000}, 400, None),
    ({"model": "dspark-demo", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": "dspark-demo", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "dspark-demo", "prompt": []}, 400, "prompt"),
])
def test_bad_input_gets_openai_shaped_errors(url, served_app, body, status, param):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(f"{url}/v1/completions", content=data,
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param
    if body != b"{not json" and status == 400 and param is None:
        assert "max_tokens" in err["message"] and "[1, " in err["message"]


def wait_idle(url, timeout=30.0):
    deadline = time.time() + timeout
    load = None
    while time.time() < deadline:
        load = httpx.get(f"{url}/v1/load", timeout=10).json()
        if load["running"] == 0 and load["queued"] == 0 and load["free_blocks"] == load["total_blocks"]:
            return load
        time.sleep(0.2)
    raise AssertionError(f"replica did not go idle: {load}")


def test_client_disconnect_cancels_and_frees_kv(url, served_app):
    wait_idle(url)
    body = {"model": served_app.model_name, "prompt": "Once upon a time", "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        busy = httpx.get(f"{url}/v1/load", timeout=10).json()
        assert busy["running"] == 1
    # the connection is closed mid-stream: the request is cancelled, its blocks come back
    wait_idle(url)


def test_replica_publishes_its_load_to_the_board(served_app, redis_server):
    from dspark.router.board import BoardConfig, BoardReader

    reader = BoardReader(BoardConfig(redis_server.url, cluster="suite", ttl_s=5.0), start=False)
    deadline = time.time() + 10
    while time.time() < deadline:
        reader.refresh()
        if reader.fresh():
            break
        time.sleep(0.2)
    loads = list(reader.fresh().values())
    assert len(loads) == 1 and loads[0].total_blocks == 256


def test_python_clients_sync_async_and_errors(url, served_app, plain):
    import asyncio

    from dspark.cluster.client import AsyncClient, Client, DsparkError

    client = Client(url, model=served_app.model_name)
    assert "".join(client.chat_stream(PROMPT, max_tokens=24)) == plain(PROMPT, 24)
    reply = client.chat(PROMPT, max_tokens=24)
    assert reply.text == plain(PROMPT, 24) and reply.usage["completion_tokens"] > 0
    assert reply.spec["num_spec_steps"] == sum(reply.spec["acceptance_histogram"])
    with pytest.raises(DsparkError, match="HTTP 404"):
        Client(url, model="nope").chat(PROMPT)

    async def run():
        aclient = AsyncClient(url, model=served_app.model_name)
        pieces = [p async for p in aclient.chat_stream(PROMPT, max_tokens=24)]
        full = await aclient.chat(PROMPT, max_tokens=24)
        await aclient.aclose()
        return "".join(pieces), full.text

    streamed, full = asyncio.run(run())
    assert streamed == full == plain(PROMPT, 24)


def test_direct_deployment_handle_calls(served_app, plain):
    """Python callers inside the Ray cluster can skip HTTP and stream typed chunks from the
    shard; the engine's check refuses bad input before the first chunk."""
    import asyncio

    from ray import serve

    from dspark.cluster.payloads import Message, ShardChunk, ShardRequest

    handle = serve.get_deployment_handle("TargetShard", app_name="dspark")
    request = ShardRequest(messages=(Message("user", PROMPT),), max_tokens=24, temperature=0.0,
                           stop=("no such stop string",))

    async def collect(req):
        return [chunk async for chunk in handle.options(stream=True).generate.remote(req)]

    chunks = asyncio.run(collect(request))
    assert all(isinstance(c, ShardChunk) for c in chunks)
    assert "".join(c.text for c in chunks) == plain(PROMPT, 24)
    assert chunks[-1].finish_reason in ("stop", "length")
    assert chunks[-1].completion_tokens <= 24 and chunks[-1].prompt_tokens > 0
    with pytest.raises(ValueError, match="outside"):
        asyncio.run(collect(ShardRequest(prompt_ids=(1, 10**6), max_tokens=4)))
    with pytest.raises(ValueError, match="prompt is empty"):
        asyncio.run(collect(ShardRequest(prompt="", max_tokens=4)))
