"""Rendezvous of expert-parallel groups through Redis: which group and rank a replica is, and
where its group's ``torch.distributed`` master listens. No torch here (the router's
process stays light); ``dspark.cluster.expert_group`` joins the process group itself.

Keys (ARCHITECTURE.md; one cluster = one key prefix):
- ``dspark:{cluster}:ep:counter``: arrivals so far; the n-th replica to arrive is rank
  ``n % world_size`` of group ``n // world_size``;
- ``dspark:{cluster}:ep:{group}``: the group's entry, written by its rank 0 (JSON: schema
  version, master address and port, world size).

A group that is a Ray Serve gang (``join_gang``) already knows its rank and size from Serve;
it only needs its master: ``dspark:{cluster}:ep:gang:{gang}``, written by rank 0, where
``gang`` names this incarnation of the gang (Serve's gang id and its members' replica ids),
so a restarted gang never reads the entry of the gang it replaces. Gang entries expire.

NOTE: a reader rejects an entry of another schema version or world size rather than join a
group it would deadlock.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from dspark.router.redis_link import redis_client
from dspark.router.redis_server import free_port

RENDEZVOUS_VERSION = 1


def counter_key(cluster: str) -> str:
    return f"dspark:{cluster}:ep:counter"


def group_key(cluster: str, group_index: int) -> str:
    return f"dspark:{cluster}:ep:{group_index}"


@dataclass(frozen=True)
class GroupSeat:
    """One replica's place in its expert-parallel group."""

    group: str
    """The group's name (``ep{index}``), as the load board's ``ep_group``."""
    rank: int
    world_size: int
    master: str
    """Address of rank 0's ``torch.distributed`` store."""
    port: int

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master}:{self.port}"


def join_group(redis_url: str, cluster: str, world_size: int, address: str,
               timeout_s: float = 300.0, poll_s: float = 0.1,
               password: str | None = None) -> GroupSeat:
    """Take the next seat of the cluster's expert-parallel groups; rank 0 publishes
    ``address`` and a free port as its group's master, the other ranks wait for that entry
    (RuntimeError after ``timeout_s``, or on an entry of another schema or size)."""
    client = redis_client(redis_url, password, timeout_s=5)
    index = int(client.incr(counter_key(cluster))) - 1
    group_index, rank = divmod(index, world_size)
    return _meet(client, group_key(cluster, group_index), f"ep{group_index}", rank, world_size,
                 address, None, timeout_s, poll_s)


GANG_ENTRY_TTL_S = 24 * 3600


def gang_key(cluster: str, gang: str) -> str:
    return f"dspark:{cluster}:ep:gang:{gang}"


def join_gang(redis_url: str, cluster: str, gang: str, rank: int, world_size: int,
              address: str, timeout_s: float = 300.0, poll_s: float = 0.1,
              password: str | None = None) -> GroupSeat:
    """The seat of rank ``rank`` in the Serve gang ``gang``: rank 0 publishes ``address``
    and a free port as the master, the others wait for it (RuntimeError after
    ``timeout_s``, or on an entry of another schema or size)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    client = redis_client(redis_url, password, timeout_s=5)
    return _meet(client, gang_key(cluster, gang), f"gang-{gang[:8]}", rank, world_size,
                 address, GANG_ENTRY_TTL_S, timeout_s, poll_s)


def _meet(client: redis.Redis, key: str, group: str, rank: int, world_size: int,
          address: str, ttl_s: int | None, timeout_s: float, poll_s: float) -> GroupSeat:
    """Rank 0 publishes ``address`` and a free port under ``key``; every rank reads that
    entry back and checks its schema and size."""
    if rank == 0:
        client.set(key, json.dumps({"version": RENDEZVOUS_VERSION, "master": address,
                                    "port": free_port(), "world_size": world_size}),
                   ex=ttl_s)
    info = _wait_for(client, key, timeout_s, poll_s)
    if not isinstance(info, dict) or info.get("version") != RENDEZVOUS_VERSION or (
            info.get("world_size") != world_size):
        raise RuntimeError(f"{key}: rendezvous entry of another schema or size: {info}")
    return GroupSeat(group, rank, world_size, info["master"], int(info["port"]))


def _wait_for(client: redis.Redis, key: str, timeout_s: float, poll_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        raw = client.get(key)
        if raw is not None:
            return json.loads(raw)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{key}: the group's rank 0 never registered "
                               f"(waited {timeout_s:g} s)")
        time.sleep(poll_s)
