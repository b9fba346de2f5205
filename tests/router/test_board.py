"""The load board against a real Redis server: entries round-trip, expire, are ignored when
stale or of another schema version, and a reader survives Redis going away and coming back."""

from __future__ import annotations

import time
import uuid

import redis

from dspark.router.board import (
    BoardConfig,
    BoardPublisher,
    BoardReader,
    ReplicaLoad,
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
    time.sleep(0.7)
    reader.refresh()
    assert reader.fresh() == {}  # the key expired in Redis


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
    restarted = EmbeddedRedis(port=port).start()
    try:
        assert pub.publish(ReplicaLoad("r1", running=7))
        assert reader.refresh().ok
        assert reader.fresh()["r1"].running == 7
    finally:
        restarted.stop()
