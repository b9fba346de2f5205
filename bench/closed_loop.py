"""Closed-loop load on an in-process engine, one step at a time on the engine's own clock.

A ``ClosedLoop`` keeps ``concurrency`` requests in flight on one engine until
``num_requests`` have finished. Its clock runs only while its own code runs (its
``engine.step()`` and the admission of the next requests), so several loops can share the
machine step by step (``interleave``): each engine's time is its own, and a change in the
machine's speed during the run (on this 2-core machine the speed of a fixed matmul moves by
±12 % between half-second windows) falls on every engine alike instead of on whichever
engine happened to run at that moment. Arrival and finish times of requests are read on
the same clock, so per-user speed is each engine's own too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from dspark.models.generation import SamplingParams
from dspark.workers.engine import Engine
from dspark.workers.stats import StepStats


class ClosedLoop:
    """One engine's closed loop, advanced by ``tick()`` (one engine step)."""

    def __init__(self, engine: Engine, prompts: Sequence[list[int]], stop_ids: Sequence[int],
                 concurrency: int, num_requests: int,
                 params_for: Callable[[int], SamplingParams]) -> None:
        self.engine, self.prompts, self.stop_ids = engine, prompts, stop_ids
        self.num_requests, self.params_for = num_requests, params_for
        self.clock = 0.0
        """Seconds this loop's own code has run."""
        self.arrival: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        self.per_user: list[float] = []
        self.ttft: list[float] = []
        """Seconds from each request's arrival to its first token, on the loop's clock."""
        self.stats: list[StepStats] = []
        self.issued = 0
        start = time.perf_counter()
        for _ in range(min(concurrency, num_requests)):
            self._issue(self.clock + time.perf_counter() - start)
        self.clock += time.perf_counter() - start

    def _issue(self, now: float) -> None:
        i = self.issued
        req_id = self.engine.add_request(self.prompts[i % len(self.prompts)],
                                         self.params_for(i), self.stop_ids)
        self.arrival[req_id], self.tokens[req_id] = now, 0
        self.issued += 1

    @property
    def done(self) -> bool:
        return not self.engine.has_unfinished()

    def tick(self) -> StepStats | None:
        """One engine step; finished requests are replaced by new ones. Returns the step's
        stats (None: nothing was scheduled)."""
        start = time.perf_counter()
        result = self.engine.step()
        now = self.clock + time.perf_counter() - start
        if result.stats is not None:
            self.stats.append(result.stats)
        for out in result.outputs:
            if not self.tokens[out.req_id] and out.new_token_ids:
                self.ttft.append(now - self.arrival[out.req_id])
            self.tokens[out.req_id] += len(out.new_token_ids)
            if out.finished:
                self.per_user.append(self.tokens[out.req_id]
                                     / max(now - self.arrival[out.req_id], 1e-9))
                if self.issued < self.num_requests:
                    self._issue(self.clock + time.perf_counter() - start)
        self.clock += time.perf_counter() - start
        return result.stats

    def abort(self) -> None:
        """Cancel the requests still in flight (a loop stopped after a number of steps)."""
        for req_id in self.arrival:
            self.engine.abort(req_id)  # NOTE: a finished request's id is unknown: a no-op

    def result(self) -> tuple[list[float], int, float, list[StepStats]]:
        """(per-user tokens/s, output tokens, seconds on the loop's clock, step stats)."""
        return self.per_user, sum(self.tokens.values()), self.clock, self.stats


def interleave(loops: Sequence[ClosedLoop]) -> None:
    """Run the loops to completion, one step of each in turn."""
    while True:
        live = [loop for loop in loops if not loop.done]
        if not live:
            return
        for loop in live:
            loop.tick()


def turn_order(items: Sequence, shift: int) -> list:
    """``items`` rotated left by ``shift``: round r runs the systems in
    ``turn_order(systems, r)`` (the HTTP benchmark: ``r + j`` at concurrency index j), so
    that over rounds each goes first in turn."""
    if not items:
        return []
    k = shift % len(items)
    return [*items[k:], *items[:k]]


def step_order(items: Sequence, rnd: int) -> list:
    """The engine benchmark's order of turns in round ``rnd``: ``turn_order``, reversed in
    odd rounds. ``interleave`` steps the loops in a cycle, and a rotation keeps which one
    steps right after which; reversed, each follows its other neighbour, so over rounds no
    system always steps after the same one (a step pays for what the step before it left
    in the caches: after a drafting engine's, the drafter's weights)."""
    order = turn_order(items, rnd)
    return order[::-1] if rnd % 2 else order


def run_cell(engine: Engine, prompts: Sequence[list[int]], stop_ids: Sequence[int],
             concurrency: int, num_requests: int,
             params_for: Callable[[int], SamplingParams],
             ) -> tuple[list[float], int, float, list[StepStats]]:
    """One engine's closed loop, alone: keep ``concurrency`` requests in flight until
    ``num_requests`` finish."""
    loop = ClosedLoop(engine, prompts, stop_ids, concurrency, num_requests, params_for)
    interleave([loop])
    return loop.result()
