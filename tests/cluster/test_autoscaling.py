"""Autoscaling from the replicas' own demand and capacity: the policy's arithmetic, its
delays and its whole expert-parallel groups; then a real Serve app that scales up under a
burst and back down when idle."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from dspark.cluster.autoscaling import CAPACITY, DEMAND, BoardAutoscaler, replica_stats


def ctx(demand, capacity, current, now, state=None, lo=1, hi=8):
    """An ``AutoscalingContext`` as Serve builds it: per-replica aggregated metrics."""
    replicas = [f"r{i}" for i in range(len(demand))]
    return SimpleNamespace(
        aggregated_metrics={DEMAND: dict(zip(replicas, demand)),
                            CAPACITY: dict(zip(replicas, capacity))},
        current_num_replicas=current, target_num_replicas=current,
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi, policy_state=state or {}, current_time=now)


def test_replica_stats_price_the_work_owed_against_the_best_batch():
    stats = replica_stats({"pending_tokens": 640, "acceptance_length": 2.0},
                          (1, 4, 16), (100.0, 80.0, 40.0), max_num_seqs=8, horizon_s=10.0)
    assert stats[DEMAND] == 64.0
    assert stats[CAPACITY] == 8 * 2.0 * 40.0  # B=16 capped at 8 requests, tau 2


def test_the_target_follows_demand_in_whole_groups_within_bounds():
    policy = BoardAutoscaler(group_size=2, target_utilization=0.5)
    # 2 replicas of 100 tok/s at 50 %: 50 tok/s each; 260 tok/s owed -> 6 replicas (3 groups)
    assert policy(ctx([130, 130], [100, 100], 2, now=0.0))[0] == 6
    assert policy(ctx([130, 130], [100, 100], 2, now=0.0, hi=4))[0] == 4
    # a lull shrinks to one group, never below the minimum
    assert policy(ctx([1] * 6, [100] * 6, 6, now=1.0))[0] == 2
    assert policy(ctx([1] * 6, [100] * 6, 6, now=1.0, lo=4))[0] == 4


def test_without_reports_the_standing_decision_holds():
    """Serve asks again while an added replica starts (one runs, two are decided) or before
    any report: the answer is the decision, not the running count; Serve's own decision
    counters in the policy state are handed back untouched."""
    policy = BoardAutoscaler()
    starting = ctx([], [], 1, now=0.0, state={"__decision_counters": 3})
    starting.target_num_replicas = 2
    target, state = policy(starting)
    assert target == 2 and state == {"__decision_counters": 3}


@pytest.fixture(scope="module")
def scaling_app(ray_cluster, served_app):
    from ray import serve

    from dspark.cluster.config import ServeConfig
    from dspark.cluster.serve import start

    cfg = ServeConfig(model_name="scaling", drafter="none", budget="fixed", max_num_seqs=2,
                      num_blocks=128, threads=1, replica_cpus=0.25, cluster="scaling",
                      redis_url=served_app.redis_url, autoscaling="board", replicas=1,
                      min_replicas=1, max_replicas=2, upscale_delay_s=1.0,
                      downscale_delay_s=2.0, autoscaling_horizon_s=2.0)
    start(cfg, app_name="scaling", route_prefix="/scaling")
    yield f"http://{served_app.host}:{served_app.port}/scaling"
    serve.delete("scaling")


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get("scaling")
    if app is None:
        return 0
    return sum(n for state, n in app.deployments["TargetShard"].replica_states.items()
               if str(state).endswith("RUNNING"))


def wait_for(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s: {what}"
        time.sleep(0.2)


def test_a_burst_adds_a_replica_and_idleness_removes_it(scaling_app):
    assert running_replicas() == 1
    stop = threading.Event()

    def client():
        while not stop.is_set():
            httpx.post(f"{scaling_app}/v1/completions", timeout=120, json={
                "model": "scaling", "prompt": "Once upon a time", "max_tokens": 200,
                "ignore_eos": True, "temperature": 0})

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: running_replicas() == 2, 90, "a second replica under the burst")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    wait_for(lambda: running_replicas() == 1, 90, "back to one replica when idle")
