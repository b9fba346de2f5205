"""Faults under load on a real ``dspark serve`` (``bench/faults.py``, tiny numbers): the
embedded Redis, a replica and an expert-parallel group member SIGKILLed, clients that drop
their streams, a burst past capacity and SIGTERM. For each: no request lost, hung or
wrong (greedy text other than the same request's without faults), and the server
recovered. Two servers (one replica; one expert-parallel group of two) run side by side,
each started as a user starts it and stopped with everything it started, whatever
happens."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from dspark.bench.faults import FAULTS, FaultBenchConfig, run_server, serve_config

CFG = FaultBenchConfig(requests=8, concurrency=4, max_tokens=12, recover_timeout_s=150)
MAIN = [f for f in FAULTS if f != "ep_member"]
SHARD_FAILED = {"chunk replica_failed", "chunk expert_group_failed", "503 replica_failed",
                "503 expert_group_failed"}


@pytest.fixture(scope="module")
def servers() -> dict:
    """Each server's result, or the exception it raised. The main server starts once the
    ep server is up (two Ray clusters starting at once on two cores time out), and runs
    its faults while the ep server runs its own."""
    ep_up = threading.Event()

    def main_after_ep():
        assert ep_up.wait(timeout=CFG.start_timeout_s + 60), "the ep server never started"
        return run_server("main", serve_config(), MAIN, CFG)

    with ThreadPoolExecutor(2) as pool:
        jobs = {"ep": pool.submit(run_server, "ep", serve_config(2), ["ep_member"], CFG, ep_up),
                "main": pool.submit(main_after_ep)}
        return {name: job.exception() or job.result() for name, job in jobs.items()}


@pytest.fixture(scope="module")
def rows(servers) -> dict:
    """Each fault's row (of a server that failed: what it raised)."""
    out = {}
    for name, result in servers.items():
        if isinstance(result, BaseException):
            out.update(dict.fromkeys(["ep_member"] if name == "ep" else MAIN, result))
        else:
            out.update({r["fault"]: r for r in result["faults"]})
    return out


def row_of(rows: dict, fault: str) -> dict:
    if isinstance(rows[fault], BaseException):
        raise rows[fault]
    return rows[fault]


@pytest.mark.parametrize("fault", FAULTS)
def test_no_request_is_lost_hung_or_wrong_and_the_server_recovers(rows, fault):
    row = row_of(rows, fault)
    assert "failed" not in row, row
    assert row["lost"] == row["hung"] == row["wrong"] == 0, row
    assert row["recovered"], row
    assert row["ok"] > 0, row


def test_an_expert_parallel_group_serves_the_same_greedy_text(rows, servers):
    row_of(rows, "ep_member"), row_of(rows, "redis")
    assert servers["ep"]["baseline"] == servers["main"]["baseline"]


def test_killed_shards_fail_their_streams_clearly(rows):
    for fault in ("replica", "ep_member"):
        row = row_of(rows, fault)
        assert set(row["codes"]) <= SHARD_FAILED, row


def test_redis_comes_back_on_its_port(rows):
    """The supervisor restarts the killed Redis on its port; the router saw the outage
    (counted on /health) and its end; serving went on without the load board."""
    row = row_of(rows, "redis")
    assert row["same_port"] and row["outages_seen"] >= 1, row
    assert row["error"] == 0, row


def test_dropped_streams_free_every_kv_block(rows):
    row = row_of(rows, "drop")
    assert row["dropped"] > 0, row  # NOTE: every other client drops its stream
    free, total = row["blocks_free"].split("/")
    assert free == total, row


def test_a_burst_past_capacity_is_refused_clearly(rows):
    row = row_of(rows, "burst")
    assert row["error"] > 0 and row["sent"] == 3 * row["capacity"], row
    assert set(row["codes"]) <= {"429 overloaded", "503 overloaded"}, row
    assert row["refused_without_retry_after"] == 0, row


def test_sigterm_drains_and_leaves_nothing_running(rows):
    row = row_of(rows, "sigterm")
    assert row["exit_code"] == 0 and row["left"] == [], row
    assert "503 shutting_down" in row["codes"], row  # new requests refused while draining
    assert row["long_stream"] == "chunk shutting_down", row  # ended at the drain deadline
