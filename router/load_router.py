"""The global router: a Ray Serve ``RequestRouter`` that ranks replicas by the time a new
request would take to finish on each, read from the load board (its wait for the first
token plus its decoding at the expected service rate), with prefix affinity as the
tie-breaker, and falls back to queue length when the board is stale or Redis is down.

Vocabulary:
- *expected service rate* of replica r for a new request of length L (its ``max_tokens``):
  ``tau / (1 + n_r)`` tokens per request-step, where ``tau`` is the fleet's mean acceptance
  length (a new request's own acceptance is not the replica's) and ``n_r`` the number of
  requests it will share steps with: ``min(count_r, (pending_r / tau_r) / (L / tau))``, the
  steps of work the replica owes (at its own acceptance length ``tau_r``) over the new
  request's steps. ``count_r`` is the handle's own in-flight count (exact; the board lags by
  as much as a short request lives) plus the requests this router chose r for and has not
  sent yet; in ``pending_r`` the requests this router sent to r after r's board entry was
  written owe their whole ``max_tokens``, the others the board's mean. A long request
  already running counts fully against a new request, while a nearly finished one barely
  counts; queue length alone cannot tell them apart. A replica without free KV blocks
  ranks last;
- *prefills ahead* on r: requests that will be prefilled before the new request's first
  token: the board's queued requests plus those this router sent to r after the board's
  entry was written (the board cannot know them yet);
- *first-token wait* on r (seconds, from r's step-cost table): half of the step now running
  (its decoding requests' verify tokens; none on an idle replica) plus the step that runs
  those tokens, the prefills ahead and the new request's own prompt;
- *expected finish* on r (seconds): ``ttft_weight * wait_r + (L / rate_r) * step_r``, where
  ``step_r`` is r's step time for one decoding request (the fleet's verify tokens per
  request), so the service-rate objective counts in the same unit as the wait. The router
  ranks by ``L / finish_r``, the new request's tokens per second over its whole life with
  its wait for the first token included. ``ttft_weight`` is ``TTFT_WEIGHT`` (3) unless
  the router config says otherwise; with 0 this is the service-rate ranking alone.
  Without a cost table for every candidate the router ranks by service rate (the tables
  are read once per replica from the board);
- *prefix affinity*: among replicas within ``affinity_slack`` of the best score, the one a
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
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence

import redis
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from dspark.router.board import BoardConfig, BoardReader, ReplicaLoad, StepCosts
from dspark.router.redis_link import redis_client
from dspark.router.tracing import extract, make_tracer


def router_key(cluster: str, router_id: str) -> str:
    return f"dspark:{cluster}:router:{router_id}"

logger = logging.getLogger(__name__)


_decisions = None
ROUTERS: weakref.WeakSet = weakref.WeakSet()
"""The load-board routers of this process (the ingress's ``/health`` reads them)."""


def router_decision(outcome: str) -> None:
    """Count one decision of the load-board router: ``board`` (ranked from the board),
    ``fallback_stale`` (board stale or unreachable), ``fallback_error`` (ranking failed).
    Never raises: routing does not depend on its metrics."""
    global _decisions
    try:
        if _decisions is None:
            from ray.util.metrics import Counter

            _decisions = Counter("dspark_router_decisions",
                                 description="Routing decisions of the load-board router.",
                                 tag_keys=("outcome",))
        _decisions.inc(1, tags={"outcome": outcome})
    except Exception:  # NOTE: e.g. outside a Ray worker
        logger.debug("router metric not recorded", exc_info=True)


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
CHARS_PER_TOKEN = 4
"""Prompt characters per token, to size a prompt the router sees only as text (the demo
tokenizer: 3.4 to 4.3 on the held-out math, code and chat prompts)."""
TEMPLATE_TOKENS = 8
"""Tokens the chat template adds to a message (the demo tokenizer: 8)."""
TTFT_WEIGHT = 3.0
"""How many seconds of decoding one second of waiting for the first token is worth to the
ranking. NOTE: 3 because the step-cost table times forward passes only: on the 2-core CPU
machine a prefill ahead delayed the first token by 10 to 15 ms on the client's clock (a
least-squares fit over 128 requests of the skewed workload per router), where the table
counts 3 to 5 ms for its tokens (docs/serving.md)."""
MAX_DECODE_TOKENS = 8
"""Most verify tokens a decoding request schedules in one step (its anchor and up to 7
draft tokens): the cap on the estimate from a replica's last step."""


def request_length(pending: PendingRequest | None) -> int:
    """The shard request's ``max_tokens`` (a default when it has none)."""
    return int(getattr(shard_request(pending), "max_tokens", None) or DEFAULT_LENGTH)


def prompt_tokens(pending: PendingRequest | None) -> int:
    """The shard request's prompt length in tokens: exact for token ids, estimated from the
    characters of a text prompt or of its messages."""
    request = shard_request(pending)
    prompt_ids = getattr(request, "prompt_ids", None)
    if prompt_ids is not None:
        return max(1, len(prompt_ids))
    messages = getattr(request, "messages", None)
    if messages is not None:
        chars = sum(len(_text(getattr(m, "content", None))) for m in messages)
        return chars // CHARS_PER_TOKEN + TEMPLATE_TOKENS * len(messages)
    return max(1, len(_text(getattr(request, "prompt", None))) // CHARS_PER_TOKEN)


def service_rate(load: ReplicaLoad, in_flight: int | None, length: int = DEFAULT_LENGTH,
                 fleet_tau: float | None = None, recent: tuple[int, int] = (0, 0)) -> float:
    """Expected tokens per request-step for a new request of ``length`` tokens here.

    ``recent``: (requests, their max_tokens summed) sent here after the board's entry was
    written: they owe their whole length, the others the board's mean."""
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
    num_recent = min(count, recent[0])
    pending = (count - num_recent) * per_request + (
        recent[1] * num_recent / recent[0] if num_recent else 0.0)
    # owed work in steps (this replica commits tau tokens per request-step) against the new
    # request's own steps (at the fleet's acceptance length: its tau is not this replica's)
    sharing = min(count, (pending / tau) / (max(length, 1) / fleet))
    return fleet / (1 + sharing)


def decode_tokens(load: ReplicaLoad) -> float:
    """Verify tokens a running request scheduled in the replica's last step (1 when none
    ran). NOTE: a last step that also ran a prefill overstates it, hence the cap."""
    if load.running <= 0:
        return 1.0
    return min(max(1.0, load.tokens_scheduled / load.running), MAX_DECODE_TOKENS)


def first_token_wait(load: ReplicaLoad, costs: StepCosts, in_flight: int, prefills_ahead: int,
                     prompt: int) -> float:
    """Seconds before a new request's first token here: half of the step now running, then
    the step that runs the decoding requests, the prefills ahead and the new prompt.

    NOTE: the prompts ahead are taken as long as this one (the router sees only this one)."""
    decoding = max(0, in_flight - prefills_ahead)
    batch = decoding * decode_tokens(load)
    residual = 0.5 * costs.step_time(batch) if decoding else 0.0
    return residual + costs.step_time(batch + (prefills_ahead + 1) * max(1, prompt))


def expected_finish(load: ReplicaLoad, costs: StepCosts, in_flight: int,
                    recent: tuple[int, int], length: int, prompt: int, fleet_tau: float,
                    fleet_decode: float, ttft_weight: float = TTFT_WEIGHT) -> float:
    """Seconds until a new request would finish here: ``ttft_weight`` times its first-token
    wait plus its ``length / service_rate`` request-steps, each as long as this replica's
    step for one request of ``fleet_decode`` verify tokens (infinite without free KV).
    ``recent`` as in ``service_rate``; the prefills ahead are the board's queued requests
    and the recent ones."""
    rate = service_rate(load, in_flight, length, fleet_tau, recent)
    if rate <= 0:
        return math.inf
    decoding = max(length, 1) / rate * costs.step_time(fleet_decode)
    ahead = min(in_flight, load.queued + recent[0])
    return ttft_weight * first_token_wait(load, costs, in_flight, ahead, prompt) + decoding


def rank(
    replica_ids: Sequence[str],
    board: dict[str, ReplicaLoad],
    in_flight: Callable[[str], int | None],
    prefix: str | None,
    affinity_slack: float = 0.1,
    length: int = DEFAULT_LENGTH,
    costs: Mapping[str, StepCosts] | None = None,
    recent: Callable[[str], tuple[int, int]] = lambda rid: (0, 0),
    prompt: int = 1,
    ttft_weight: float = TTFT_WEIGHT,
    scores: dict[str, float] | None = None,
) -> list[list[str]] | None:
    """Tiers of replica ids, best first; None when any candidate lacks a board entry.

    ``costs``: each replica's step-cost table; without one for every candidate the score is
    the service rate alone, with them the tokens per second of the expected finish.
    ``recent``: per replica, (requests, their max_tokens summed) sent after its board
    entry was written. ``scores``, when given, gets each candidate's score."""
    if not replica_ids or any(rid not in board for rid in replica_ids):
        return None
    loads = [board[rid] for rid in replica_ids]
    fleet = sum(max(1.0, load.acceptance_length) for load in loads) / len(loads)
    counts = {rid: _count(board[rid], in_flight(rid)) for rid in replica_ids}
    if costs is not None and all(rid in costs for rid in replica_ids):
        busy = [decode_tokens(load) for load in loads if load.running > 0]
        fleet_decode = sum(busy) / len(busy) if busy else 1.0

        def score(rid: str) -> float:
            finish = expected_finish(board[rid], costs[rid], counts[rid], recent(rid),
                                     length, prompt, fleet, fleet_decode, ttft_weight)
            return max(length, 1) / finish
    else:
        def score(rid: str) -> float:
            return service_rate(board[rid], counts[rid], length, fleet, recent(rid))
    scored = sorted(((score(rid), rid) for rid in replica_ids), key=lambda x: (-x[0], x[1]))
    if scores is not None:
        scores.update((rid, value) for value, rid in scored)
    best = scored[0][0]
    near = [rid for rate, rid in scored if rate >= best * (1 - affinity_slack) and rate > 0]
    if prefix and len(near) > 1:
        pick = prefix_hash(prefix) % len(near)
        first = sorted(near)[pick]
    else:
        first = scored[0][1]
    return [[first]] + [[rid] for _, rid in scored if rid != first]


def _count(load: ReplicaLoad, in_flight: int | None) -> int:
    """Live requests on a replica: the handle's count, or the board's when it has none."""
    return load.running + load.queued if in_flight is None else max(0, in_flight)


def board_state() -> dict | None:
    """The board as this process's routers see it (None without one): Redis reachable by
    all, the longest outage now and the most outages, the replicas on it, and the routing
    decisions summed."""
    states = [router.board_state() for router in list(ROUTERS)]
    if not states:
        return None
    return {"reachable": all(s["reachable"] for s in states),
            "down_for_s": max(s["down_for_s"] for s in states),
            "outages": max(s["outages"] for s in states),
            "replicas": max(s["replicas"] for s in states),
            "board_decisions": sum(s["board_decisions"] for s in states),
            "fallbacks": sum(s["fallbacks"] for s in states)}


class LoadBoardRouter(FIFOMixin, RequestRouter):
    """Request router for ``TargetShard`` handles (``request_router_config``).

    It remembers its own recent choices per replica (``_chosen``: times and lengths) and
    those not sent yet (``_unsent``), because Serve's in-flight count moves only when a
    request is sent, after the choice: without them a burst of requests chosen before the
    first is sent would all see the same counts and all go to the same replica. And the
    board cannot know a request sent after its entry was written: the choices since then
    are the prefills ahead that it does not show, and they owe their whole length."""

    def initialize_state(self, redis_url: str, cluster: str = "default", ttl_s: float = 2.0,
                         affinity_slack: float = 0.1, refresh_s: float = 0.1,
                         ttft_weight: float = TTFT_WEIGHT,
                         otlp_traces_endpoint: str | None = None,
                         trace_sample_ratio: float = 1.0, redis_password: str | None = None,
                         **_: object) -> None:
        self.reader = BoardReader(BoardConfig(redis_url, cluster=cluster, ttl_s=ttl_s,
                                              refresh_s=refresh_s, password=redis_password))
        self.tracer = make_tracer(otlp_traces_endpoint, trace_sample_ratio, "router")
        self.affinity_slack = affinity_slack
        self.ttft_weight = ttft_weight
        self.ttl_s = ttl_s
        self._chosen: dict[str, deque[tuple[float, int]]] = {}
        self._unsent: dict[str, deque[float]] = {}
        self.board_decisions = 0
        self.fallbacks = 0
        self._was_fallback = False
        self._logged_error = False
        # the counters are metrics: written next to the board (with a TTL) by a thread, so
        # that an unreachable Redis never stalls routing
        self._key = router_key(cluster, f"{os.getpid()}-{id(self):x}")
        self._stop = threading.Event()
        threading.Thread(target=self._export, args=(redis_client(redis_url, redis_password),
                                                    ttl_s),
                         daemon=True, name="dspark-router-metrics").start()
        # NOTE: through the imported module: Serve ships this class to the process by value
        # (cloudpickle), and the globals its methods see are a copy of the module's
        from dspark.router import load_router

        load_router.ROUTERS.add(self)

    def board_state(self) -> dict:
        """What the ingress's ``/health`` shows of the board: Redis reachable or not (and
        for how long not, and how many outages), replicas on it, routing decisions."""
        return {**self.reader.outage.state(), "replicas": len(self.reader.fresh()),
                "board_decisions": self.board_decisions, "fallbacks": self.fallbacks}

    def _export(self, client: redis.Redis, ttl_s: float) -> None:
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
        scores: dict[str, float] = {}
        self._started_ns = time.time_ns()
        try:
            tiers = self._rank(candidate_replicas, pending_request, scores)
        except Exception:  # NOTE: never raise here: Serve would leave the request waiting
            if not self._logged_error:
                logger.exception("routing failed: this request is routed by queue length "
                                 "(logged once; later failures are counted in fallbacks)")
                self._logged_error = True
            self.fallbacks += 1
            return self._fallback(candidate_replicas, pending_request, "error")
        if tiers is None:
            if not self._was_fallback:
                logger.warning("load board stale or unreachable: routing by queue length")
            self._was_fallback = True
            self.fallbacks += 1
            return self._fallback(candidate_replicas, pending_request, "board_stale")
        self.board_decisions += 1
        router_decision("board")
        if self._was_fallback:
            logger.warning("load board fresh again: routing by it")
        self._was_fallback = False
        self._remember(tiers[0][0].replica_id.unique_id, request_length(pending_request))
        self._trace(pending_request, candidate_replicas, scores,
                    tiers[0][0].replica_id.unique_id, None)
        return tiers

    def _fallback(self, candidates, pending_request, reason: str):
        router_decision(f"fallback_{reason}")
        self._trace(pending_request, candidates, {}, None, reason)
        return [candidates]

    def _trace(self, pending_request, candidates, scores: dict[str, float],
               chosen: str | None, fallback: str | None) -> None:
        """The ``dspark.route`` span of a traced request (under its ingress span)."""
        carrier = getattr(shard_request(pending_request), "trace_context", None)
        if self.tracer is None or not carrier:
            return
        try:
            ids = [r.replica_id.unique_id for r in candidates]
            span = self.tracer.start_span("dspark.route", context=extract(carrier),
                                          start_time=self._started_ns)
            span.set_attributes({
                "dspark.route.candidates": ids,
                "dspark.route.scores": [float(scores.get(rid, float("nan"))) for rid in ids],
                "dspark.route.board_age_s": (time.time() - self.reader.ok_at
                                             if self.reader.ok_at else -1.0),
            })
            if chosen is not None:
                span.set_attribute("dspark.route.chosen", chosen)
            if fallback is not None:
                span.set_attribute("dspark.route.fallback_reason", fallback)
            span.end()
        except Exception:  # NOTE: tracing never fails routing
            logger.debug("route span not recorded", exc_info=True)

    def on_send_request(self, replica_id) -> None:
        """Serve counts the request in flight now: it is no longer unsent."""
        super().on_send_request(replica_id)
        unsent = self._unsent.get(replica_id.unique_id)
        if unsent:
            unsent.popleft()

    def _remember(self, rid: str, length: int) -> None:
        """A choice of ``rid`` for a request of ``length`` tokens, forgotten after the
        board's TTL (and as unsent after 1 s: Serve sent it elsewhere, or not at all)."""
        now = time.time()
        chosen = self._chosen.setdefault(rid, deque())
        unsent = self._unsent.setdefault(rid, deque())
        while chosen and now - chosen[0][0] > self.ttl_s:
            chosen.popleft()
        while unsent and now - unsent[0] > 1.0:
            unsent.popleft()
        chosen.append((now, length))
        unsent.append(now)

    def _rank(self, candidate_replicas: list[RunningReplica],
              pending_request: PendingRequest | None,
              scores: dict[str, float] | None = None) -> list[list[RunningReplica]] | None:
        """Tiers of candidates from the board; None when it cannot rank them all."""
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        board = self.reader.fresh() if self.reader.reachable else {}
        now = time.time()

        def in_flight(rid: str) -> int | None:
            count = self.replica_queue_len_cache.get(by_id[rid].replica_id)
            if count is None and rid in board:
                count = board[rid].running + board[rid].queued
            unsent = sum(1 for t in self._unsent.get(rid, ()) if now - t <= 1.0)
            return None if count is None else count + unsent

        def recent(rid: str) -> tuple[int, int]:
            # NOTE: the board's timestamp and the choice times are both wall clocks of
            # this machine (a cluster's nodes keep theirs in step with NTP)
            lengths = [n for t, n in self._chosen.get(rid, ()) if t > board[rid].timestamp]
            return len(lengths), sum(lengths)

        costs = {rid: c for rid in by_id if rid in board
                 and (c := self.reader.costs(board[rid].cost_table_id)) is not None}
        tiers = rank(list(by_id), board, in_flight, prefix_key(pending_request),
                     self.affinity_slack, request_length(pending_request), costs,
                     recent, prompt_tokens(pending_request), self.ttft_weight, scores)
        if tiers is None:
            return None
        return [[by_id[rid] for rid in tier] for tier in tiers]
