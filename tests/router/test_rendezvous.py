"""Expert-parallel rendezvous on a real Redis: arrivals fill groups rank by rank, every rank
of a group gets its rank 0's master, and an entry of another schema or size, or a rank 0
that never registers, is a clear error instead of a hang."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from dspark.router.rendezvous import counter_key, group_key, join_group


def fresh_cluster() -> str:
    return f"ep-{uuid.uuid4().hex[:8]}"


def test_arrivals_fill_groups_and_share_their_rank_zeros_master(redis_server):
    cluster = fresh_cluster()
    first = join_group(redis_server.url, cluster, 2, "10.0.0.1")  # rank 0 registers first
    with ThreadPoolExecutor(3) as pool:
        rest = list(pool.map(lambda addr: join_group(redis_server.url, cluster, 2, addr),
                             ["10.0.0.2", "10.0.0.3", "10.0.0.4"]))
    seats = [first, *rest]
    assert (first.group, first.rank, first.world_size) == ("ep0", 0, 2)
    by_group: dict[str, list] = {}
    for seat in seats:
        by_group.setdefault(seat.group, []).append(seat)
    assert sorted(by_group) == ["ep0", "ep1"]
    for members in by_group.values():
        assert sorted(s.rank for s in members) == [0, 1]
        assert len({(s.master, s.port) for s in members}) == 1  # one master per group
    assert first.master == "10.0.0.1" and first.init_method == f"tcp://10.0.0.1:{first.port}"


def test_an_entry_of_another_schema_or_size_is_refused(redis_server):
    cluster = fresh_cluster()
    client = redis.Redis.from_url(redis_server.url)
    client.set(counter_key(cluster), 1)  # the next arrival is rank 1 of group 0
    client.set(group_key(cluster, 0), json.dumps(
        {"version": 1, "master": "10.0.0.1", "port": 1234, "world_size": 4}))
    with pytest.raises(RuntimeError, match="another schema or size"):
        join_group(redis_server.url, cluster, 2, "10.0.0.2")
    client.set(counter_key(cluster), 1)
    client.set(group_key(cluster, 0), json.dumps(
        {"version": 99, "master": "10.0.0.1", "port": 1234, "world_size": 2}))
    with pytest.raises(RuntimeError, match="another schema or size"):
        join_group(redis_server.url, cluster, 2, "10.0.0.2")


def test_a_rank_zero_that_never_registers_is_an_error(redis_server):
    cluster = fresh_cluster()
    redis.Redis.from_url(redis_server.url).set(counter_key(cluster), 1)
    with pytest.raises(RuntimeError, match="rank 0 never registered"):
        join_group(redis_server.url, cluster, 2, "10.0.0.2", timeout_s=0.3, poll_s=0.05)
