"""The engine behind an asyncio front: one background thread runs the step loop; callers
get an async stream of outputs per request.

Vocabulary:
- *submission*: a request handed to the loop thread (the engine is only ever touched by
  that thread, so no lock is held while a step runs);
- *stream*: the per-request ``asyncio.Queue`` the loop thread feeds through the caller's
  event loop (``call_soon_threadsafe``);
- *step listeners*: callables given every ``StepStats`` (load board, metrics); they run on
  the loop thread after the step, never inside it;
- *queued*: requests the engine has not admitted yet (waiting in its scheduler, or handed
  over but not yet taken by the loop thread); beyond ``max_waiting`` a new request is
  refused with ``OverloadedError``.

NOTE: cancelling a stream (client disconnect) aborts the request at the next step
boundary, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass

from dspark.models.generation import SamplingParams
from dspark.workers.engine import Engine, EngineLoad, RequestOutput
from dspark.workers.expert_parallel import any_rank_busy
from dspark.workers.stats import StepStats

logger = logging.getLogger(__name__)


class OverloadedError(RuntimeError):
    """The engine's queue is full (the HTTP ingress answers 429; it matches this error by
    name, as it never imports the engine's side)."""


class ExpertGroupFailed(RuntimeError):
    """A collective of the replica's expert-parallel group failed (a peer died or hung): the
    group cannot step again, so its requests end with this error and the engine loop stops
    (the replica's health check then fails and Serve restarts the gang). The ingress knows
    it by name."""


class EngineLoopDied(RuntimeError):
    """The engine loop thread ended on an error of its own (a bug): the requests it held
    end with this error, new ones are refused with it, and the replica's health check
    fails so that Serve replaces the replica. The ingress knows it by name."""


class EngineStepFailed(RuntimeError):
    """The engine failed the step this request was in (``Engine._fail``, which sets the
    output's ``error``). The ingress knows it by name and names only the type."""


@dataclass
class _Submission:
    req_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: tuple[int, ...]
    loop: asyncio.AbstractEventLoop
    stream: asyncio.Queue


class AsyncEngine:
    """Runs ``engine`` on a daemon thread; ``generate`` is safe to call from any event loop."""

    def __init__(self, engine: Engine, idle_wait_s: float = 0.05, group=None,
                 max_waiting: int | None = None) -> None:
        """``group``: the expert-parallel process group this engine is a rank of (the loop
        then steps in lock-step with the other ranks), or None. ``max_waiting``: most
        queued requests (None: no limit)."""
        self.engine = engine
        self.max_waiting = max_waiting
        self.group = group
        if engine.lockstep != (group is not None):
            raise ValueError("an engine of an expert-parallel group must be built with "
                             "lockstep=True, and only then")
        self.idle_wait_s = idle_wait_s
        self.listeners: list[Callable[[StepStats], None]] = []
        self.last_stats: StepStats | None = None
        self.acceptance_ewma: float | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._num_handed = 0  # "add"s in the inbox; guarded by _handed_lock
        self._handed_lock = threading.Lock()
        self._streams: dict[str, _Submission] = {}
        self._deferred_aborts: list[str] = []
        engine.intake = lambda: self._drain_inbox(adds_only=True)
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.failure: ExpertGroupFailed | EngineLoopDied | None = None
        """Why the loop stopped on its own (its expert-parallel group failed, or an error
        ended the loop), else None."""
        self._thread = threading.Thread(target=self._run, name="dspark-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side
    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """The checks ``add_request`` makes, without queueing anything (so a caller can
        answer 400 before streaming starts)."""
        self.engine.check_request(prompt_ids, params)

    async def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        stop_ids: Iterable[int] = (),
        req_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as steps commit them; the last one has
        ``finished=True``. Cancelling the iteration aborts the request. Bad input raises
        ValueError and a full queue ``OverloadedError``, both before anything is queued."""
        self.validate(prompt_ids, params)
        if self.failure is not None:
            raise self.failure
        if not self._thread.is_alive():
            raise EngineLoopDied("the engine is stopped; retry the request")
        if self.max_waiting is not None and self._queued() >= self.max_waiting:
            raise OverloadedError(f"{self.max_waiting} requests are waiting")
        req_id = req_id or f"async-{next(self._ids)}"
        stream: asyncio.Queue = asyncio.Queue()
        sub = _Submission(req_id, list(prompt_ids), params, tuple(stop_ids),
                          asyncio.get_running_loop(), stream)
        with self._handed_lock:
            self._num_handed += 1
        self._inbox.put(("add", sub))
        self._wake.set()
        if self.failure is not None and not self._thread.is_alive():
            raise self.failure  # NOTE: the loop ended after the check above: nobody reads
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(req_id)

    def abort(self, req_id: str) -> None:
        self._inbox.put(("abort", req_id))
        self._wake.set()

    def is_alive(self) -> bool:
        """Whether the loop thread runs (it exits only on ``shutdown``, or when its
        expert-parallel group fails: ``failure``)."""
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ loop thread
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # NOTE: a bug; without this its requests would wait
            logger.exception("the engine loop died")
            self.failure = EngineLoopDied(f"the engine loop stopped ({type(exc).__name__}); "
                                          "the replica restarts, retry the request")
            self._fail_all(self.failure)
            try:
                self._drain_inbox()  # NOTE: what arrived meanwhile fails too
            finally:
                self._fail_all(self.failure)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            busy = self.engine.has_unfinished()
            if self.group is not None:
                try:
                    busy = any_rank_busy(busy, self.group)  # one all-reduce per step
                except Exception as exc:
                    logger.error("expert-parallel all-reduce failed: %s", exc)
                    return self._group_failed(type(exc).__name__)
            if not busy:
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()
                continue
            try:
                result = self.engine.step()
            except Exception as exc:  # the engine already fails requests; this is a bug
                if self.group is not None:  # NOTE: or a collective: the ranks are out of step
                    return self._group_failed(type(exc).__name__)
                logger.exception("engine step raised")
                self._fail_all(exc)
                continue
            failed = next((out.error for out in result.outputs if out.error), None)
            if failed is not None and self.group is not None:
                # NOTE: a failed step in a group: a collective failed or the ranks are out
                # of step; neither can go on
                return self._group_failed(failed)
            self._publish(result)

    def _group_failed(self, kind: str) -> None:
        """Fail every request with ``ExpertGroupFailed`` (``kind``: the exception's type)
        and let the loop end."""
        logger.error("expert-parallel group failed (%s); stopping the engine loop", kind)
        self.failure = ExpertGroupFailed(
            f"this request's expert-parallel group lost a member ({kind}); the group "
            "restarts as a whole, retry the request")
        self._fail_all(self.failure)
        self._drain_inbox()  # NOTE: what arrived meanwhile fails too, never waits
        self._fail_all(self.failure)

    def _fail_all(self, exc: Exception) -> None:
        for req_id in list(self._streams):
            self._deliver(req_id, exc)
            self.engine.abort(req_id)

    def _publish(self, result) -> None:
        for out in result.outputs:
            self._deliver(out.req_id, out if out.error is None else EngineStepFailed(
                f"the engine failed this request's step ({out.error}); retry the request"))
        if result.stats is not None:
            self.last_stats = result.stats
            if result.stats.num_drafts:
                tau = result.stats.mean_acceptance_length
                self.acceptance_ewma = tau if self.acceptance_ewma is None else (
                    0.9 * self.acceptance_ewma + 0.1 * tau)
            for listener in self.listeners:
                try:
                    listener(result.stats)
                except Exception:  # NOTE: an exporter never stops the loop
                    logger.exception("step listener failed")

    def _drain_inbox(self, adds_only: bool = False) -> None:
        """Hand what callers sent to the engine, in order. ``adds_only`` (``Engine.intake``,
        called in the middle of a step): requests are added, and aborts wait for the next
        drain (a request of the running step keeps its blocks until the step commits)."""
        if not adds_only:
            for req_id in self._deferred_aborts:
                self.engine.abort(req_id)
                self._streams.pop(req_id, None)
            self._deferred_aborts.clear()
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "abort" and adds_only:
                self._deferred_aborts.append(payload)
            elif kind == "add":
                sub: _Submission = payload
                with self._handed_lock:
                    self._num_handed -= 1
                try:
                    self.engine.add_request(sub.prompt_ids, sub.params, sub.stop_ids, sub.req_id)
                except Exception as exc:
                    sub.loop.call_soon_threadsafe(sub.stream.put_nowait, exc)
                    continue
                self._streams[sub.req_id] = sub
            else:
                self.engine.abort(payload)
                self._streams.pop(payload, None)

    def _deliver(self, req_id: str, item) -> None:
        sub = self._streams.get(req_id)
        if sub is None:
            return
        if isinstance(item, BaseException) or item.finished:
            del self._streams[req_id]  # NOTE: the engine dropped it when it finished
        try:
            sub.loop.call_soon_threadsafe(sub.stream.put_nowait, item)
        except RuntimeError:  # the caller's loop is gone: nobody is listening
            self.engine.abort(req_id)

    # ------------------------------------------------------------------ load
    def load(self) -> dict:
        """A snapshot of this engine's load (read by the load board and the router)."""
        load = self.engine.load()
        return {
            "pending_tokens": load.pending_tokens,
            "running": load.num_running,
            "queued": self._queued(load),
            "tokens_scheduled": self.last_stats.num_verify_tokens if self.last_stats else 0,
            "free_blocks": load.free_blocks,
            "total_blocks": load.total_blocks,
            "acceptance_length": self.acceptance_ewma or 1.0,
            "mean_survival": load.mean_survival,
            "timestamp": time.time(),
        }

    def _queued(self, load: EngineLoad | None = None) -> int:
        """Requests waiting in the engine plus those not yet handed to it."""
        return (load or self.engine.load()).num_waiting + self._num_handed
