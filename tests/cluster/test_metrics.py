"""Metrics as an operator scrapes them: a real Prometheus scrapes Ray's metrics agent while
the served app takes load over HTTP. Every dashboard query returns a series; the exported
speculation counters equal the replica's own count, which equals the sum of the requests'
``metrics.speculative_decoding``; the committed dashboards are what the code generates."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from dspark.cluster import dashboards

PROMETHEUS = shutil.which("prometheus")
ROOT = Path(__file__).resolve().parents[2]
# long enough to fill whole KV blocks: repeating it hits the prefix cache
PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
          "clips in May. How many clips did Natalia sell altogether in April and May?")


def test_committed_dashboards_are_the_generated_ones(tmp_path):
    for path in dashboards.write(tmp_path):
        committed = ROOT / "k8s" / "dashboards" / path.name
        assert json.loads(committed.read_text()) == json.loads(path.read_text()), (
            f"{committed} is stale: run `dspark dashboards`")


def wait_for(check, timeout_s: float, what: str, interval_s: float = 0.5):
    """Poll ``check`` until it returns a truthy value (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@pytest.fixture
def prometheus(ray_cluster, tmp_path):
    """A real Prometheus on loopback, scraping this Ray node's metrics agent every second."""
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (scripts/setup.sh --dev installs it with apt)")
    from dspark.router.redis_server import free_port

    node = next(n for n in ray_cluster.nodes() if n["Alive"])
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "ray", "static_configs": [
            {"targets": [f"127.0.0.1:{node['MetricsExportPort']}"]}]}],
    }))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready():
        try:
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None  # exited: reported below

    wait_for(ready, 30, "Prometheus to start")
    assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def promql(url: str, query: str) -> list:
    resp = httpx.get(f"{url}/api/v1/query", params={"query": query}, timeout=10)
    assert resp.status_code == 200, (query, resp.text)
    return resp.json()["data"]["result"]


async def load(served_url: str, model: str) -> list[dict]:
    """16 chat requests, 6 at a time, streamed and not, greedy and sampled, the same prompt
    again and again (prefix-cache hits), and one bad request; the speculative-decoding
    metrics of each answered request."""
    sem = asyncio.Semaphore(6)

    async def one(client, i):
        stream = i % 2 == 0
        body = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": 24, "temperature": 0.0 if i % 3 else 1.0, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        async with sem:
            resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        if not stream:
            return resp.json()["metrics"]["speculative_decoding"]
        events = [json.loads(line[6:]) for line in resp.text.splitlines()
                  if line.startswith("data: {")]
        return events[-1]["metrics"]["speculative_decoding"]

    async with httpx.AsyncClient(base_url=served_url, timeout=120) as client:
        bad = await client.post("/v1/chat/completions", json={"model": model, "max_tokens": 4,
                                                              "messages": "not a list"})
        assert bad.status_code == 400
        return await asyncio.gather(*(one(client, i) for i in range(16)))


def expected_totals(specs: list[dict]) -> dict:
    width = len(specs[0]["acceptance_histogram"]) - 1
    per_pos = [sum(sum(s["acceptance_histogram"][k:]) for s in specs)
               for k in range(1, width + 1)]
    return {"num_drafts": sum(s["num_spec_steps"] for s in specs),
            "num_draft_tokens": sum(s["num_draft_tokens"] for s in specs),
            "num_accepted_tokens": sum(s["num_accepted_draft_tokens"] for s in specs),
            "accepted_per_position": per_pos}


def replica_totals(served_url: str) -> dict:
    load = httpx.get(f"{served_url}/v1/load", timeout=30).json()
    totals = load["spec_decode_totals"]
    totals.pop("num_gated_off")
    return {**totals, "replica": load["replica_id"]}


def test_prometheus_scrapes_every_dashboard_series_and_the_counts_add_up(
        served_url, served_app, prometheus):
    before = replica_totals(served_url)
    specs: list[dict] = []

    def drafted_and_accepted():
        specs.extend(asyncio.run(load(served_url, served_app.model_name)))
        totals = expected_totals(specs)
        return totals if totals["num_drafts"] and totals["num_accepted_tokens"] else None

    # NOTE: the gate drafts only in steps where drafting pays, so on a loaded 2-core machine
    # one batch can draft little and accept nothing: batches are added until both counted
    want = wait_for(drafted_and_accepted, 300, "the load to draft and accept some tokens")

    def delta():
        now = replica_totals(served_url)
        assert now["replica"] == before["replica"]  # the suite's app has one replica
        got = {k: now[k] - before[k] for k in ("num_drafts", "num_draft_tokens",
                                               "num_accepted_tokens")}
        got["accepted_per_position"] = [a - b for a, b in zip(now["accepted_per_position"],
                                                              before["accepted_per_position"])]
        return now if got == want else None

    # NOTE: a request's last chunk can reach the client a moment before the engine thread
    # counts its step
    totals = wait_for(delta, 30, "the replica's counters to add up to the requests' metrics")

    # NOTE: other apps of the suite have replicas (and series) of their own
    only = f'{{replica="{totals["replica"]}"}}'

    def exported():
        rows = promql(prometheus, "sum by (position) "
                      f"(ray_dspark_spec_decode_num_accepted_tokens_per_pos_total{only})")
        got = {int(r["metric"]["position"]): float(r["value"][1]) for r in rows}
        want_pos = {k + 1: float(n) for k, n in enumerate(totals["accepted_per_position"]) if n}
        drafts = promql(prometheus, f"sum (ray_dspark_spec_decode_num_drafts_total{only})")
        return got == want_pos and drafts and float(drafts[0]["value"][1]) == totals["num_drafts"]

    wait_for(exported, 90, "Prometheus to scrape the replica's counters", interval_s=1.0)

    def empty():
        return [(board, panel, q) for board, panel, q in dashboards.queries()
                if not promql(prometheus, q)]

    missing = []

    def all_answer():
        missing[:] = empty()
        return not missing

    try:
        wait_for(all_answer, 60, "every dashboard query to return a series", interval_s=2.0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; empty: {missing}") from None
