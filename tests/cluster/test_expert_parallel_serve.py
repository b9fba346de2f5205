"""Two TargetShard replicas forming one expert-parallel group (ep_size=2, gloo all-to-all)
serve concurrent HTTP requests; greedy outputs equal plain (ep_size=1) decoding."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

PROMPTS = ["What is 17 times 3?", "Write a Python function that reverses a list.",
           "Name three colours.", "What is 144 divided by 12?", "Say hello.",
           "Explain what a variable is."]


@pytest.fixture(scope="module")
def ep_app(ray_cluster, served_app):
    from ray import serve

    from dspark.cluster.config import ServeConfig
    from dspark.cluster.serve import start

    cfg = ServeConfig(model_name="ep", replicas=2, ep_size=2, drafter="dspark", budget="cluster",
                      max_num_seqs=4, num_blocks=128, threads=1, replica_cpus=0.5,
                      redis_url=served_app.redis_url, cluster="ep-test")
    start(cfg, app_name="ep", route_prefix="/ep")
    yield f"http://{served_app.host}:{served_app.port}/ep", cfg
    serve.delete("ep")


def test_ep_group_serves_exact_greedy_outputs(ep_app, demo_target_dir, redis_server):
    from dspark.models.generation import SamplingParams, generate_text, load_for_generation
    from dspark.router.board import BoardConfig, BoardReader

    base, cfg = ep_app
    model, tok = load_for_generation(demo_target_dir)
    expected = [generate_text(model, tok, p, SamplingParams(max_tokens=24)) for p in PROMPTS]

    def call(prompt):
        resp = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": "ep", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 24, "temperature": 0})
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]["message"]["content"], resp.headers["x-dspark-replica"]

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, PROMPTS))
    assert [text for text, _ in results] == expected
    reader = BoardReader(BoardConfig(redis_server.url, cluster="ep-test"), start=False)
    deadline = time.time() + 10
    while time.time() < deadline and len(reader.fresh()) < 2:
        reader.refresh()
        time.sleep(0.2)
    groups = {load.ep_group for load in reader.fresh().values()}
    assert len(reader.fresh()) == 2 and len(groups) == 1  # both ranks of one group


def _member_names(app: str) -> dict[str, str]:
    """The app's TargetShard replica actors: replica id -> actor name (namespace serve)."""
    import ray

    names = ray.util.list_named_actors(all_namespaces=True)
    prefix = f"SERVE_REPLICA::{app}#TargetShard#"
    return {a["name"].rsplit("#", 1)[1]: a["name"] for a in names
            if a["name"].startswith(prefix)}


def test_a_dead_member_fails_its_groups_requests_clearly_and_the_gang_serves_again(
        ep_app, demo_target_dir):
    import ray

    from dspark.models.generation import SamplingParams, generate_text, load_for_generation

    base, cfg = ep_app
    model, tok = load_for_generation(demo_target_dir)
    expected = generate_text(model, tok, PROMPTS[0], SamplingParams(max_tokens=24))
    before = _member_names("ep")
    assert len(before) == 2
    body = {"model": "ep", "messages": [{"role": "user", "content": "Count to one thousand."}],
            "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        serving = resp.headers["x-dspark-replica"]
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        # NOTE: the member that does not serve this request dies: its peer is cut off
        victim = next(rid for rid in before if rid != serving)
        ray.kill(ray.get_actor(before[victim], namespace="serve"), no_restart=True)
        killed = time.monotonic()
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][6:])["error"]
    assert error["code"] in ("expert_group_failed", "replica_failed"), error
    assert "retry" in error["message"]

    def serves() -> bool:
        resp = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": "ep", "messages": [{"role": "user", "content": PROMPTS[0]}],
            "max_tokens": 24, "temperature": 0})
        if resp.status_code != 200:
            return False
        assert resp.json()["choices"][0]["message"]["content"] == expected
        return True

    deadline = killed + 240
    while not serves():
        assert time.monotonic() < deadline, "the gang did not serve again within 240 s"
        time.sleep(0.5)
    recovered = time.monotonic() - killed
    after = _member_names("ep")
    assert len(after) == 2 and not set(after) & set(before)  # the whole gang restarted
    print(f"\nep_size=2 gang: serving again {recovered:.1f} s after a member was killed")
