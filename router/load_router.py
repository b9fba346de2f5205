"""The global router: a Ray Serve ``RequestRouter`` that ranks replicas by the expected
service rate the load board reports, with prefix affinity as the tie-breaker, and falls back
to queue length when the board is stale or Redis is down.

Vocabulary:
- *expected service rate* of replica r for a new request of length L (its ``max_tokens``):
  ``tau / (1 + n_r)`` tokens per step, where ``tau`` is the fleet's mean acceptance length
  (a new request's own acceptance is not the replica's) and ``n_r`` the number of requests
  it will share steps with: ``min(count_r, (pending_r / tau_r) / (L / tau))``, the steps
  of work the replica owes (at its own acceptance length ``tau_r``) over the new request's
  steps. ``count_r`` is the handle's own in-flight count (exact; the board lags by as much
  as a short request lives) and ``pending_r`` is that count times the board's mean owed
  tokens per live request. A long request already running counts fully against a new
  request, while a nearly finished one barely counts; queue length alone cannot tell them
  apart. A replica without free KV blocks ranks last;
- *prefix affinity*: among replicas within ``affinity_slack`` of the best rate, the one a
  hash of the prompt's first characters picks, so that repeated prefixes meet their
  cached KV blocks.

NOTE: with no fresh board entry for a candidate (stale, missing, or Redis unreachable), or
when ranking fails for any reason, the router returns all candidates as one tier, and Serve
picks the shortest local queue: the default behaviour, never an error. ``fallbacks`` counts
those decisions. (An exception raised by ``choose_replicas`` is never answered: Serve's
request would wait for a replica forever.)
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from dspark.router.board import BoardConfig, BoardReader, ReplicaLoad


def router_key(cluster: str, router_id: str) -> str:
    return f"dspark:{cluster}:router:{router_id}"

logger = logging.getLogger(__name__)


@dataclass
class Ranked:
    replica_id: str
    rate: float
    has_board: bool


def shard_request(pending: PendingRequest | None) -> object | None:
    """The shard request a call to ``TargetShard.generate`` carries (its first argument).

    NOTE: read by its fields (``max_tokens``, ``messages``, ``prompt_ids``, ``prompt``: a
    ``dspark.cluster.payloads.ShardRequest``), never imported: the router imports only
    redis and ray.serve."""
    if pending is None or not pending.args:
        return None
    return pending.args[0]


def prefix_key(pending: PendingRequest | None, chars: int = 256) -> str | None:
    """The routing prefix of a shard request: its messages' text, its prompt token ids or
    its prompt (None when the request has none)."""
    request = shard_request(pending)
    messages = getattr(request, "messages", None)
    prompt_ids = getattr(request, "prompt_ids", None)
    if messages is not None:
        text = "".join(_text(getattr(m, "content", None)) for m in messages)
    elif prompt_ids is not None:
        text = ",".join(str(t) for t in list(prompt_ids)[:chars])
    else:
        text = _text(getattr(request, "prompt", None))
    return text[:chars] or None


def _text(content: object) -> str:
    return content if isinstance(content, str) else ""


def prefix_hash(prefix: str) -> int:
    """A stable hash of a routing prefix, defined for every ``str``.

    NOTE: "surrogatepass": a lone surrogate ("\\ud800", which JSON allows) has no UTF-8
    encoding, and a strict ``encode()`` raises on it."""
    return int(hashlib.sha1(prefix.encode("utf-8", "surrogatepass")).hexdigest(), 16)


DEFAULT_LENGTH = 128
"""Assumed length of a request that does not say its max_tokens."""


def request_length(pending: PendingRequest | None) -> int:
    """The shard request's ``max_tokens`` (a default when it has none)."""
    return int(getattr(shard_request(pending), "max_tokens", None) or DEFAULT_LENGTH)


def service_rate(load: ReplicaLoad, in_flight: int | None, length: int = DEFAULT_LENGTH,
                 fleet_tau: float | None = None) -> float:
    """Expected tokens per step for a new request of ``length`` tokens on this replica."""
    if load.total_blocks and load.free_blocks <= 0:
        return 0.0
    tau = max(1.0, load.acceptance_length)
    fleet = max(1.0, fleet_tau or tau)
    listed = load.running + load.queued
    # NOTE: the count comes from the handle's own in-flight cache (exact, updated on every
    # send and completion; the board lags by 100-200 ms, as long as a short request lives);
    # the board contributes what the cache cannot know: how much work each request owes
    # (the cache forgets a replica after 10 s without traffic: then the board's count)
    count = listed if in_flight is None else max(0, in_flight)
    per_request = load.pending_tokens / listed if listed else length
    pending = count * per_request
    # owed work in steps (this replica commits tau tokens per request-step) against the new
    # request's own steps (at the fleet's acceptance length: its tau is not this replica's)
    sharing = min(count, (pending / tau) / (max(length, 1) / fleet))
    return fleet / (1 + sharing)


def rank(
    replica_ids: Sequence[str],
    board: dict[str, ReplicaLoad],
    in_flight: Callable[[str], int | None],
    prefix: str | None,
    affinity_slack: float = 0.1,
    length: int = DEFAULT_LENGTH,
) -> list[list[str]] | None:
    """Tiers of replica ids, best first; None when any candidate lacks a board entry."""
    if not replica_ids or any(rid not in board for rid in replica_ids):
        return None
    fleet = sum(max(1.0, board[rid].acceptance_length) for rid in replica_ids) / len(replica_ids)
    scored = sorted(
        ((service_rate(board[rid], in_flight(rid), length, fleet), rid) for rid in replica_ids),
        key=lambda x: (-x[0], x[1]),
    )
    best = scored[0][0]
    near = [rid for rate, rid in scored if rate >= best * (1 - affinity_slack) and rate > 0]
    if prefix and len(near) > 1:
        pick = prefix_hash(prefix) % len(near)
        first = sorted(near)[pick]
    else:
        first = scored[0][1]
    return [[first]] + [[rid] for _, rid in scored if rid != first]


class LoadBoardRouter(FIFOMixin, RequestRouter):
    """Request router for ``TargetShard`` handles (``request_router_config``)."""

    def initialize_state(self, redis_url: str, cluster: str = "default", ttl_s: float = 2.0,
                         affinity_slack: float = 0.1, refresh_s: float = 0.1,
                         **_: object) -> None:
        self.reader = BoardReader(BoardConfig(redis_url, cluster=cluster, ttl_s=ttl_s,
                                              refresh_s=refresh_s))
        self.affinity_slack = affinity_slack
        self.board_decisions = 0
        self.fallbacks = 0
        self._was_fallback = False
        self._logged_error = False
        # the counters are metrics: written next to the board (with a TTL) by a thread, so
        # that an unreachable Redis never stalls routing
        self._key = router_key(cluster, f"{os.getpid()}-{id(self):x}")
        self._stop = threading.Event()
        threading.Thread(target=self._export, args=(redis_url, ttl_s), daemon=True,
                         name="dspark-router-metrics").start()

    def _export(self, redis_url: str, ttl_s: float) -> None:
        client = redis.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        while not self._stop.wait(0.25):
            try:
                pipe = client.pipeline()
                pipe.hset(self._key, mapping={"board_decisions": self.board_decisions,
                                              "fallbacks": self.fallbacks})
                pipe.pexpire(self._key, int(max(ttl_s, 1.0) * 5000))
                pipe.execute()
            except redis.RedisError:
                continue

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        try:
            tiers = self._rank(candidate_replicas, pending_request)
        except Exception:  # NOTE: never raise here: Serve would leave the request waiting
            if not self._logged_error:
                logger.exception("routing failed: this request is routed by queue length "
                                 "(logged once; later failures are counted in fallbacks)")
                self._logged_error = True
            self.fallbacks += 1
            return [candidate_replicas]
        if tiers is None:
            if not self._was_fallback:
                logger.warning("load board stale or unreachable: routing by queue length")
            self._was_fallback = True
            self.fallbacks += 1
            return [candidate_replicas]
        self.board_decisions += 1
        self._was_fallback = False
        return tiers

    def _rank(self, candidate_replicas: list[RunningReplica],
              pending_request: PendingRequest | None) -> list[list[RunningReplica]] | None:
        """Tiers of candidates from the board; None when it cannot rank them all."""
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        board = self.reader.fresh() if self.reader.reachable else {}

        def in_flight(rid: str) -> int | None:
            return self.replica_queue_len_cache.get(by_id[rid].replica_id)

        tiers = rank(list(by_id), board, in_flight, prefix_key(pending_request),
                     self.affinity_slack, request_length(pending_request))
        if tiers is None:
            return None
        return [[by_id[rid] for rid in tier] for tier in tiers]
