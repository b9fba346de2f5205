"""Faults under load on a real ``dspark serve`` (``bench/faults.py``, tiny numbers): the
embedded Redis and the replica SIGKILLed, clients that drop their streams, a burst past
capacity and SIGTERM, on one server started as a user starts it and stopped with
everything it started, whatever happens. For each: no request lost, hung or wrong
(greedy text other than the same request's without faults), and the server recovered.

The fault table's ep_member row (a member of an expert-parallel group killed) has its
small version in tests/cluster/test_expert_parallel_serve.py
(``test_a_dead_member_fails_its_groups_requests_clearly_and_the_gang_serves_again``):
a second server here would double this file's time on two cores."""

from __future__ import annotations

import pytest

from dspark.bench.faults import FAULTS, FaultBenchConfig, run_server, serve_config

CFG = FaultBenchConfig(requests=8, concurrency=4, max_tokens=12, recover_timeout_s=150)
MAIN = [f for f in FAULTS if f != "ep_member"]


@pytest.fixture(scope="module")
def rows() -> dict:
    """Each fault's row (or, for every fault, what the server raised)."""
    try:
        result = run_server("main", serve_config(), MAIN, CFG)
    except Exception as exc:  # NOTE: each test then raises it
        return dict.fromkeys(MAIN, exc)
    return {r["fault"]: r for r in result["faults"]}


def row_of(rows: dict, fault: str) -> dict:
    if isinstance(rows[fault], BaseException):
        raise rows[fault]
    return rows[fault]


@pytest.mark.parametrize("fault", MAIN)
def test_no_request_is_lost_hung_or_wrong_and_the_server_recovers(rows, fault):
    row = row_of(rows, fault)
    assert "failed" not in row, row
    assert row["lost"] == row["hung"] == row["wrong"] == 0, row
    assert row["recovered"], row
    assert row["ok"] > 0, row


def test_a_killed_replica_fails_its_streams_clearly(rows):
    row = row_of(rows, "replica")
    assert set(row["codes"]) <= {"chunk replica_failed", "503 replica_failed"}, row


def test_redis_comes_back_on_its_port(rows):
    """The supervisor restarts the killed Redis on its port, and serving went on without
    the load board. (Whether /health counted the outage depends on the router's reader
    refreshing while Redis was down, which a busy machine may skip: the outage's report
    is tested with a longer outage in tests/router.)"""
    row = row_of(rows, "redis")
    assert row["same_port"], row
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
