"""Prometheus metrics of the served app, exported the way Ray exports its own: through
``ray.util.metrics`` to each node's metrics agent, which Prometheus scrapes (Ray adds the
``ray_`` prefix: ``dspark_spec_decode_num_drafts`` is scraped as
``ray_dspark_spec_decode_num_drafts_total``). docs/observability.md lists every series.

- ``ShardMetrics`` (one per ``TargetShard`` replica): the engine's steps, speculation in
  vLLM's names and meaning under ``dspark_``, the KV cache and the prefix cache, the step
  time split, the budget mode, the load board's staleness, and the confidence head's
  calibration. Every series carries ``replica``, ``ep_group`` and ``model``. The engine
  thread only adds to counters here (``on_step``); a daemon thread hands the sums to Ray
  every ``interval_s``, so a step pays microseconds for its metrics.
- ``IngressMetrics`` (the HTTP ingress): requests by route and status, time to first
  token, inter-token latency, end-to-end latency, prompt and generated tokens.
- The load-board router counts its decisions and fallbacks itself
  (``dspark.router.load_router.router_decision``; it runs in the ingress's process, inside
  the deployment handle).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # NOTE: the ingress imports this module and must not import torch
    from dspark.workers.stats import StepStats

logger = logging.getLogger(__name__)

PHASES = ("schedule", "draft", "budget", "verify", "sample", "update")
STEP_SECONDS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
LATENCY_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
SHARD_TAGS = ("replica", "ep_group", "model")


class _Sums:
    """What the engine thread adds between two flushes."""

    def __init__(self, gamma: int) -> None:
        self.counts: dict[str, float] = {}
        self.per_position = [0] * gamma
        self.lengths = [0] * (gamma + 1)
        self.phases = dict.fromkeys(PHASES, 0.0)
        self.step_times: list[float] = []

    def add(self, name: str, value: float) -> None:
        self.counts[name] = self.counts.get(name, 0) + value


class ShardMetrics:
    """The metrics of one replica's engine (module docstring)."""

    def __init__(self, replica: str, ep_group: str, model: str, gamma: int, budget_mode: str,
                 board_age: Callable[[], float | None] | None = None,
                 calibration: Callable[[], dict | None] | None = None,
                 interval_s: float = 1.0) -> None:
        self.tags = {"replica": replica, "ep_group": ep_group, "model": model}
        self.gamma, self.budget_mode = max(gamma, 1), budget_mode
        self.board_age, self.calibration = board_age, calibration
        self._lock = threading.Lock()
        self._sums = _Sums(self.gamma)
        self._totals = _Sums(self.gamma)
        """Everything since start, kept here too (``totals``: what Prometheus should see)."""
        self._last: StepStats | None = None

        self._define()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval_s,),
                                        name="dspark-metrics", daemon=True)
        self._thread.start()

    def _define(self) -> None:
        """The Ray metrics this replica writes."""
        from ray.util.metrics import Counter, Gauge, Histogram

        def counter(name, doc, extra=()):
            return Counter(name, description=doc, tag_keys=SHARD_TAGS + tuple(extra))

        def gauge(name, doc, extra=()):
            return Gauge(name, description=doc, tag_keys=SHARD_TAGS + tuple(extra))

        self.counters = {
            "steps": counter("dspark_engine_steps", "Engine steps run."),
            "drafts": counter("dspark_spec_decode_num_drafts",
                              "Drafting rounds: one per request per step it drafted in."),
            "draft_tokens": counter("dspark_spec_decode_num_draft_tokens",
                                    "Draft tokens verified (the budget's l_r, summed)."),
            "proposed_tokens": counter("dspark_spec_decode_num_proposed_tokens",
                                       "Draft tokens proposed, before the budget."),
            "accepted_tokens": counter("dspark_spec_decode_num_accepted_tokens",
                                       "Draft tokens accepted."),
            "gated_off": counter("dspark_spec_decode_num_gated_off",
                                 "Decoding request-steps the gate did not draft for."),
            "gated_off_steps": counter("dspark_spec_decode_num_gated_off_steps",
                                       "Steps with decoding requests and no drafting."),
            "output_tokens": counter("dspark_generation_tokens", "Tokens committed."),
            "prefill_tokens": counter("dspark_prefill_tokens", "Prompt rows computed."),
            "admitted_tokens": counter("dspark_prefix_cache_queries",
                                       "Known tokens of admitted requests (prefix-cache "
                                       "lookups, in tokens)."),
            "cached_tokens": counter("dspark_prefix_cache_hits",
                                     "Of the looked-up tokens, those found in the cache."),
            "preempted": counter("dspark_num_preemptions", "Requests preempted."),
            "finished": counter("dspark_engine_requests_finished", "Requests finished."),
        }
        self.per_position = counter(
            "dspark_spec_decode_num_accepted_tokens_per_pos",
            "Drafts accepted at each position (1-based), vLLM's per-position counter.",
            ("position",))
        self.lengths = counter("dspark_spec_decode_verified_length",
                               "Drafting rounds by verified length l_r.", ("length",))
        self.phases = counter("dspark_step_phase_seconds",
                              "Seconds spent in each phase of the engine step.", ("phase",))
        self.step_time = Histogram("dspark_step_duration_seconds",
                                   description="Whole engine step.",
                                   boundaries=list(STEP_SECONDS), tag_keys=SHARD_TAGS)
        self._define_gauges(gauge)

    def _define_gauges(self, gauge) -> None:
        self.gauges = {
            "running": gauge("dspark_num_requests_running", "Requests holding KV."),
            "waiting": gauge("dspark_num_requests_waiting", "Requests waiting for admission."),
            "blocks_used": gauge("dspark_kv_blocks_used", "KV blocks in use."),
            "blocks_free": gauge("dspark_kv_blocks_free", "KV blocks free."),
            "verify_tokens": gauge("dspark_step_verify_tokens",
                                   "Rows of the last step's target forward."),
            "board_age": gauge("dspark_board_age_seconds",
                               "Age of the expert-parallel group's load read from the board "
                               "(-1: none read yet)."),
        }
        self.mode = gauge("dspark_budget_mode", "1 for the budget mode this replica runs.",
                          ("mode",))
        self.cal = {
            "ece": gauge("dspark_calibration_ece", "Online ECE of the confidence head."),
            "drifted": gauge("dspark_calibration_drifted", "1 while the head has drifted."),
            "samples": gauge("dspark_calibration_samples", "Observations in the windows."),
            "refits": gauge("dspark_calibration_refits", "Temperature refits so far."),
            "predicted": gauge("dspark_calibration_predicted_survival",
                               "Mean predicted survival per position.", ("position",)),
            "observed": gauge("dspark_calibration_observed_survival",
                              "Mean observed survival per position.", ("position",)),
            "temperature": gauge("dspark_calibration_temperature",
                                 "STS temperature per position.", ("position",)),
        }


    # ------------------------------------------------------------------ engine thread
    def on_step(self, stats: StepStats) -> None:
        """A step listener: adds the step to the sums (no Ray call)."""
        with self._lock:
            for s in (self._sums, self._totals):
                self._add(s, stats)
            self._sums.step_times.append(stats.step_time)
            self._last = stats

    def _add(self, s: _Sums, stats: StepStats) -> None:
        s.add("steps", 1)
        s.add("drafts", stats.num_drafts)
        s.add("draft_tokens", stats.verify_budget)
        s.add("proposed_tokens", stats.num_draft_tokens)
        s.add("accepted_tokens", stats.num_accepted_tokens)
        s.add("gated_off", stats.num_decode_requests - stats.num_drafts)
        s.add("gated_off_steps", int(stats.num_decode_requests > 0 and not stats.num_drafts))
        s.add("output_tokens", stats.num_output_tokens)
        s.add("prefill_tokens", stats.num_prefill_tokens)
        s.add("admitted_tokens", stats.num_admitted_tokens)
        s.add("cached_tokens", stats.num_cached_tokens)
        s.add("preempted", stats.num_preempted)
        s.add("finished", stats.num_finished)
        for k, n in enumerate(stats.accepted_per_position[: self.gamma]):
            s.per_position[k] += n
        for k, n in enumerate(stats.ell_histogram[: self.gamma + 1]):
            s.lengths[k] += n
        for phase in PHASES:
            s.phases[phase] += getattr(stats, f"time_{phase}")

    def totals(self) -> dict:
        """The speculation and step counters since start, in-process (the replica's own
        count of what the exported counters say once Ray has exported them): what
        ``GET /v1/load`` reports, and ``dspark bench serve`` reads around each cell."""
        with self._lock:
            t = self._totals
            return {"num_drafts": int(t.counts.get("drafts", 0)),
                    "num_draft_tokens": int(t.counts.get("draft_tokens", 0)),
                    "num_accepted_tokens": int(t.counts.get("accepted_tokens", 0)),
                    "accepted_per_position": list(t.per_position),
                    "num_gated_off": int(t.counts.get("gated_off", 0)),
                    "num_steps": int(t.counts.get("steps", 0)),
                    "num_gated_off_steps": int(t.counts.get("gated_off_steps", 0)),
                    "num_output_tokens": int(t.counts.get("output_tokens", 0)),
                    "num_prefill_tokens": int(t.counts.get("prefill_tokens", 0)),
                    "phase_seconds": dict(t.phases)}

    # ------------------------------------------------------------------ flush thread
    def flush(self) -> None:
        """Hand the sums since the last flush, and the gauges, to Ray's metrics."""
        with self._lock:
            sums, self._sums = self._sums, _Sums(self.gamma)
            last = self._last
        tags = self.tags
        for name, value in sums.counts.items():
            if value:
                self.counters[name].inc(value, tags=tags)
        for k, n in enumerate(sums.per_position):
            if n:
                self.per_position.inc(n, tags={**tags, "position": str(k + 1)})
        for k, n in enumerate(sums.lengths):
            if n:
                self.lengths.inc(n, tags={**tags, "length": str(k)})
        for phase, seconds in sums.phases.items():
            if seconds:
                self.phases.inc(seconds, tags={**tags, "phase": phase})
        for seconds in sums.step_times:
            self.step_time.observe(seconds, tags=tags)
        if last is not None:
            used = last.total_blocks - last.free_blocks
            for name, value in (("running", last.num_running), ("waiting", last.num_waiting),
                                ("blocks_used", used), ("blocks_free", last.free_blocks),
                                ("verify_tokens", last.num_verify_tokens)):
                self.gauges[name].set(value, tags=tags)
        self.mode.set(1, tags={**tags, "mode": self.budget_mode})
        age = self.board_age() if self.board_age is not None else None
        self.gauges["board_age"].set(-1.0 if age is None else age, tags=tags)

    def flush_calibration(self) -> None:
        snap = self.calibration() if self.calibration is not None else None
        if snap is None:
            return
        tags = self.tags
        if snap["ece"] is not None:
            self.cal["ece"].set(snap["ece"], tags=tags)
        self.cal["drifted"].set(int(snap["drifted"]), tags=tags)
        self.cal["samples"].set(snap["total_samples"], tags=tags)
        self.cal["refits"].set(snap["num_refits"], tags=tags)
        for k, temp in enumerate(snap["temperatures"]):
            ptags = {**tags, "position": str(k + 1)}
            self.cal["temperature"].set(temp, tags=ptags)
            for name, key in (("predicted", "mean_predicted"), ("observed", "mean_observed")):
                value = snap[key][k]
                if value is not None:
                    self.cal[name].set(value, tags=ptags)

    def close(self) -> None:
        self._stop.set()

    def _loop(self, interval_s: float) -> None:
        ticks = 0
        while not self._stop.wait(interval_s):
            try:
                self.flush()
                # NOTE: a calibration snapshot scores every window (about 12 ms): every 15th flush
                # (15 s at the default interval, Prometheus's default scrape interval)
                if ticks % 15 == 0:
                    self.flush_calibration()
            except Exception:  # NOTE: metrics never stop serving
                logger.exception("metrics flush failed")
            ticks += 1


def _never_raises(method):
    """A metrics call that fails logs and returns: metrics never fail a request (and a
    disabled ``IngressMetrics`` records nothing)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not self.enabled:
            return
        try:
            method(self, *args, **kwargs)
        except Exception:
            logger.exception("metrics not recorded")
    return wrapper


class IngressMetrics:
    """The HTTP side: what a user sees (module docstring). No method raises."""

    def __init__(self, model: str, enabled: bool = True) -> None:
        self.model, self.enabled = model, enabled
        if enabled:
            self._define()

    def _define(self) -> None:
        from ray.util.metrics import Counter, Histogram

        self.requests = Counter("dspark_http_requests", description="HTTP requests answered.",
                                tag_keys=("model", "route", "status"))
        self.finished = Counter("dspark_request_finished",
                                description="Completion choices by finish reason.",
                                tag_keys=("model", "finish_reason"))
        self.prompt_tokens = Counter("dspark_prompt_tokens", description="Prompt tokens.",
                                     tag_keys=("model",))
        self.output_tokens = Counter("dspark_completion_tokens",
                                     description="Completion tokens delivered.",
                                     tag_keys=("model",))

        def histogram(name, doc, bounds):
            return Histogram(name, description=doc, boundaries=list(bounds),
                             tag_keys=("model",))

        self.ttft = histogram("dspark_time_to_first_token_seconds",
                              "From receiving the request to its first token.",
                              LATENCY_SECONDS)
        self.itl = histogram("dspark_inter_token_latency_seconds",
                             "Between consecutive tokens of a choice: once per streamed "
                             "chunk, its interval / its n tokens.", TOKEN_SECONDS)
        self.e2e = histogram("dspark_request_duration_seconds",
                             "From receiving the request to its last byte.", LATENCY_SECONDS)

    @_never_raises
    def request(self, route: str, status: int, seconds: float | None) -> None:
        tags = {"model": self.model}
        self.requests.inc(1, tags={**tags, "route": route, "status": str(status)})
        if seconds is not None:
            self.e2e.observe(seconds, tags=tags)

    @_never_raises
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds, tags={"model": self.model})

    @_never_raises
    def tokens(self, gap_s: float, num: int) -> None:
        # NOTE: one observation per chunk, not per token: a speculative step streams several
        # tokens at once, and their gaps are one interval split evenly (as vLLM observes
        # once per engine iteration)
        if num > 0:
            self.itl.observe(gap_s / num, tags={"model": self.model})

    @_never_raises
    def choice_done(self, finish_reason: str | None, prompt: int, completion: int) -> None:
        tags = {"model": self.model}
        self.finished.inc(1, tags={**tags, "finish_reason": finish_reason or "none"})
        for counter, value in ((self.prompt_tokens, prompt), (self.output_tokens, completion)):
            if value > 0:  # NOTE: Ray's counters refuse 0
                counter.inc(value, tags=tags)
