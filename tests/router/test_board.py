"""The load board against a real Redis server: entries round-trip, expire, are ignored when
stale, of another schema version, out of range or hostile; a reader survives Redis going
away and coming back, an outage is logged once and counted, and a Redis that restarts empty
holds every replica's load and cost table again."""

from __future__ import annotations

import json
import logging
import time
import uuid

import pytest
import redis

from dspark.router.board import (
    BoardConfig,
    BoardPublisher,
    BoardReader,
    ReplicaLoad,
    StepCosts,
    costs_key,
    replica_key,
)
from dspark.router.redis_server import EmbeddedRedis


def config(url, **kw):
    return BoardConfig(redis_url=url, cluster=f"test-{uuid.uuid4().hex[:8]}", **kw)


def test_published_load_round_trips_and_expires(redis_server):
    cfg = config(redis_server.url, ttl_s=0.5, min_interval_s=0.0)
    pub = BoardPublisher(cfg)
    reader = BoardReader(cfg, start=False)
    assert pub.publish(ReplicaLoad("r1", running=3, queued=1, free_blocks=90, total_blocks=100,
                                   acceptance_length=2.5))
    reader.refresh()
    got = reader.fresh()["r1"]
    assert (got.running, got.queued, got.free_blocks, got.acceptance_length) == (3, 1, 90, 2.5)
    deadline = time.time() + 10
    while reader.refresh().loads:  # the key expires in Redis
        assert time.time() < deadline, "the entry never expired"
        time.sleep(0.05)
    assert reader.fresh() == {}


def test_stale_and_foreign_entries_are_ignored(redis_server):
    cfg = config(redis_server.url, ttl_s=5.0)
    client = redis.Redis.from_url(redis_server.url)
    old = ReplicaLoad("old", running=1)
    old.timestamp = time.time() - 60  # written long ago (e.g. a clock-skewed replica)
    client.hset(replica_key(cfg.cluster, "old"), mapping=old.to_redis())
    foreign = ReplicaLoad("v9", running=1, timestamp=time.time()).to_redis()
    foreign["version"] = "9"
    client.hset(replica_key(cfg.cluster, "v9"), mapping=foreign)
    reader = BoardReader(cfg, start=False)
    reader.refresh()
    assert reader.fresh() == {}
    assert reader.rejected == 1


def test_publisher_rate_limit():
    cfg = BoardConfig(redis_url="redis://127.0.0.1:1/0", min_interval_s=10.0)
    pub = BoardPublisher(cfg)
    assert not pub.publish(ReplicaLoad("x"))  # unreachable: no exception, counted
    assert pub.failures == 1


def test_reader_survives_redis_stopping_and_uses_it_again():
    server = EmbeddedRedis().start()
    cfg = config(server.url, ttl_s=5.0, min_interval_s=0.0)
    pub, reader = BoardPublisher(cfg), BoardReader(cfg, start=False)
    pub.publish(ReplicaLoad("r1", running=2))
    assert reader.refresh().ok and "r1" in reader.fresh()
    port = server.port
    server.stop()
    snap = reader.refresh()
    assert not snap.ok and reader.failures == 1
    assert not pub.publish(ReplicaLoad("r1", running=5))
    restarted = EmbeddedRedis(port=port, password=server.password).start()
    try:
        assert pub.publish(ReplicaLoad("r1", running=7))
        assert reader.refresh().ok
        assert reader.fresh()["r1"].running == 7
    finally:
        restarted.stop()


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while not (value := condition()):
        assert time.time() < deadline, f"not within {timeout_s:g} s: {what}"
        time.sleep(0.05)
    return value


def test_a_redis_that_restarts_empty_gets_every_cost_table_again():
    """Issue 15, finding 1: after Redis came back, replicas published their load again but
    never their step-cost tables (written once), so routers never ranked by the time to
    the first token again. Now the table goes with the load, every third of the TTL."""
    server = EmbeddedRedis().start()
    cfg = config(server.url, ttl_s=1.0, min_interval_s=0.0)
    pub = BoardPublisher(cfg)
    table = {"batch_sizes": [1, 8], "steps_per_second": [200.0, 150.0]}
    assert pub.publish_costs("r1", table) and pub.publish(ReplicaLoad("r1", cost_table_id="r1"))
    port, password = server.port, server.password
    server.stop()
    restarted = EmbeddedRedis(port=port, password=password).start()  # empty
    try:
        reader = BoardReader(BoardConfig(restarted.url, cluster=cfg.cluster), start=False)

        def heartbeat() -> StepCosts | None:
            pub.publish(ReplicaLoad("r1", cost_table_id="r1"), force=True)
            reader.refresh()
            return reader.costs("r1")

        costs = wait_for(heartbeat, 10, "the cost table on the restarted Redis")
        assert costs.batch_sizes == (1, 8) and costs.steps_per_second == (200.0, 150.0)
        ttl = redis.Redis.from_url(restarted.url).pttl(costs_key(cfg.cluster, "r1"))
        assert 0 < ttl <= 10_000  # NOTE: it expires when its replica stops writing it
    finally:
        restarted.stop()


def test_an_outage_is_logged_once_and_counted(caplog):
    server = EmbeddedRedis().start()
    cfg = config(server.url, ttl_s=5.0, min_interval_s=0.0)
    reader = BoardReader(cfg, start=False)
    assert reader.refresh().ok and not reader.outage.down
    port, password = server.port, server.password
    server.stop()
    with caplog.at_level(logging.WARNING, logger="dspark.router.redis_link"):
        for _ in range(3):
            assert not reader.refresh().ok
        down = [r.getMessage() for r in caplog.records]
        assert len(down) == 1 and "unreachable" in down[0], down
        assert password not in down[0] and "***" in down[0]  # NOTE: the URL, redacted
        assert reader.outage.state()["outages"] == 1 and reader.outage.down
        restarted = EmbeddedRedis(port=port, password=password).start()
        try:
            assert reader.refresh().ok and reader.refresh().ok
        finally:
            restarted.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "answers again" in messages[1], messages
    assert reader.outage.state() == {"reachable": True, "down_for_s": 0.0, "outages": 1}
    assert reader.failures == 3


def good_entry(replica_id: str, **fields) -> dict:
    return {**ReplicaLoad(replica_id, running=1, free_blocks=5, total_blocks=10,
                          acceptance_length=2.0, mean_survival=0.5, cost_table_id=replica_id,
                          timestamp=time.time()).to_redis(), **fields}


HOSTILE = {
    "nan": {"acceptance_length": "nan"},
    "inf": {"mean_survival": "inf"},
    "negative": {"running": "-5"},
    "huge": {"pending_tokens": str(10**30)},
    "survival": {"mean_survival": "7"},
    "tau": {"acceptance_length": "1e9"},
    "blocks": {"free_blocks": "50"},
    "future": {"timestamp": str(time.time() + 3600)},
    "text": {"queued": "many"},
    "long": {"ep_group": "g" * 10_000},
}


def test_malformed_or_hostile_entries_are_left_out_and_the_reader_goes_on(redis_server,
                                                                           caplog):
    """A process that can write to Redis cannot crash the reader or push a score past what
    a real replica reports: each such entry is rejected (and logged once per key)."""
    cfg = config(redis_server.url, ttl_s=30.0, refresh_s=0.02)
    client = redis.Redis.from_url(redis_server.url)
    for name, fields in HOSTILE.items():
        client.hset(replica_key(cfg.cluster, name), mapping=good_entry(name, **fields))
    # an entry that claims to be another replica (it would replace that replica's load)
    client.hset(replica_key(cfg.cluster, "liar"), mapping=good_entry("good"))
    client.hset(replica_key(cfg.cluster, "good"), mapping=good_entry("good"))
    client.hset(replica_key(cfg.cluster, "tables"), mapping=good_entry("tables"))
    client.set(costs_key(cfg.cluster, "good"), json.dumps(
        {"version": 2, "batch_sizes": [1, 8], "steps_per_second": [100.0, 80.0]}))
    client.set(costs_key(cfg.cluster, "tables"), "[" * 50_000)  # too deep (and too big)
    with caplog.at_level(logging.WARNING, logger="dspark.router.board"):
        reader = BoardReader(cfg)  # NOTE: its refresh thread runs through all of it
        try:
            wait_for(lambda: reader.costs("good") is not None and reader.rejected >= 13, 10,
                     "the good entry and table read, the others rejected")
            assert set(reader.fresh()) == {"good", "tables"}
            assert reader.fresh()["good"].running == 1
            assert reader.costs("tables") is None
            assert reader._thread.is_alive()
        finally:
            reader.close()
    logged = {r.getMessage().split(" rejected")[0] for r in caplog.records}
    assert len(logged) == len(HOSTILE) + 2, logged  # NOTE: once per key


@pytest.mark.parametrize("table", [
    {"batch_sizes": [1, 8], "steps_per_second": [0.0, 80.0]},
    {"batch_sizes": [1, 8], "steps_per_second": [float("nan"), 80.0]},
    {"batch_sizes": [0, 8], "steps_per_second": [100.0, 80.0]},
    {"batch_sizes": [8, 1], "steps_per_second": [100.0, 80.0]},
    {"batch_sizes": list(range(1, 1000)), "steps_per_second": [1.0] * 999},
    {"batch_sizes": [1], "steps_per_second": [1e12]},
])
def test_cost_tables_out_of_range_are_rejected(table):
    with pytest.raises(ValueError):
        StepCosts.from_redis(json.dumps({"version": 2, **table}))
