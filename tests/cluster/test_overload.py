"""Overload answers 429 or 503 with Retry-After, and the requests that were admitted still
complete."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest


@pytest.fixture(scope="module")
def tiny_app(ray_cluster, served_app):
    from ray import serve

    from dspark.cluster.config import ServeConfig
    from dspark.cluster.serve import start

    cfg = ServeConfig(model_name="tiny", drafter="none", budget="fixed", max_num_seqs=1,
                      max_waiting_per_replica=1, max_ongoing_requests=2,
                      max_queued_requests=1, num_blocks=64, threads=1, replica_cpus=0.25,
                      redis_url=served_app.redis_url, cluster="tiny", router="pow2")
    start(cfg, app_name="tiny", route_prefix="/tiny")
    yield f"http://{served_app.host}:{served_app.port}/tiny"
    serve.delete("tiny")


def test_overload_gets_429_or_503_with_retry_after(tiny_app):
    def call(i):
        return httpx.post(f"{tiny_app}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": f"story {i}", "max_tokens": 120, "temperature": 0,
            "ignore_eos": True})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(8)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes, codes
    refused = [r for r in responses if r.status_code in (429, 503)]
    assert refused, codes
    assert set(codes) <= {200, 429, 503}
    for r in refused:
        assert r.headers.get("retry-after") == "1"
        assert r.json()["error"]["code"] == "overloaded"
    for r in responses:
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == 120
