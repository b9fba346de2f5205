"""The asyncio front leaves no request state behind once an output is delivered: after a
finish, after the caller stops listening (abort), and after a refused request; what is sent
while a step drafts reaches the engine then (late admission), aborts after the commit."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from dspark.models.generation import SamplingParams, generate_tokens
from dspark.workers import engine as engine_module
from dspark.workers.async_engine import AsyncEngine
from dspark.workers.budget import StepCostTable
from dspark.workers.engine import Engine, EngineConfig

COST = StepCostTable((1, 8, 64), (100.0, 90.0, 40.0))


def wait_for(condition, timeout_s=30.0):
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.01)


def test_finished_aborted_and_refused_requests_leave_no_state(make_model, make_drafter):
    target = make_model()
    eng = Engine(target, make_drafter(target, "dspark"),
                 EngineConfig(block_size=4, num_blocks=8, max_num_seqs=4), COST)
    front = AsyncEngine(eng)
    free = eng.blocks.num_free_blocks

    async def scenario():
        tokens = []
        async for out in front.generate([5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True)):
            tokens += out.new_token_ids
        assert len(tokens) == 6
        stream = front.generate([8, 9, 10], SamplingParams(max_tokens=15, ignore_eos=True))
        await stream.__anext__()
        await stream.aclose()  # the caller stops listening: aborted
        with pytest.raises(ValueError, match="KV blocks"):
            async for _ in front.generate([5] * 10, SamplingParams(max_tokens=400)):
                pass

    try:
        asyncio.run(scenario())
        wait_for(lambda: not eng.scheduler.requests and not eng.states)
        assert eng.blocks.num_free_blocks == free and eng.draft_worker.last_h == {}
    finally:
        front.shutdown()


def test_a_full_queue_refuses_before_queueing_and_the_loop_reports_alive(make_model):
    """With ``max_waiting`` requests queued, the next one raises ``OverloadedError`` before
    anything is queued; the ones admitted still finish; ``is_alive`` follows the thread."""
    import threading

    from dspark.workers.async_engine import OverloadedError

    eng = Engine(make_model(), None, EngineConfig(block_size=4, num_blocks=32, max_num_seqs=1),
                 COST)
    front = AsyncEngine(eng, max_waiting=1)
    assert front.is_alive()
    gate = threading.Event()
    front.listeners.append(lambda _stats: gate.wait(60))  # holds the loop after a step
    long = SamplingParams(max_tokens=20, ignore_eos=True)

    async def drain(stream):
        return sum([len(out.new_token_ids) async for out in stream])

    async def scenario():
        running = front.generate([5, 6, 7], long)
        first = await running.__anext__()  # admitted; the loop now waits at the gate
        waiting = asyncio.create_task(drain(front.generate([8, 9], long)))
        deadline = time.time() + 30
        while front.load()["queued"] < 1:  # handed over, not yet taken: queued
            assert time.time() < deadline, "the second request never queued"
            await asyncio.sleep(0.01)
        with pytest.raises(OverloadedError):  # at once; admitted, it would wait at the gate
            await asyncio.wait_for(front.generate([10, 11], long).__anext__(), 30)
        gate.set()
        assert len(first.new_token_ids) + await drain(running) == 20
        assert await waiting == 20

    try:
        asyncio.run(scenario())
        wait_for(lambda: not eng.scheduler.requests and not eng.states)
    finally:
        gate.set()
        front.shutdown()
    assert not front.is_alive()


def test_a_failed_step_raises_in_its_streams_and_the_loop_goes_on(make_model, monkeypatch):
    """A step the engine fails ends its requests with ``EngineStepFailed`` (naming only the
    exception's type), never with a finish reason a client would take for an answer; the
    next request is served."""
    from dspark.workers.async_engine import EngineStepFailed

    eng = Engine(make_model(), None, EngineConfig(block_size=4, num_blocks=32, max_num_seqs=2),
                 COST)
    front = AsyncEngine(eng)
    real = eng.runner.forward
    monkeypatch.setattr(eng.runner, "forward", lambda batch: 1 / 0)
    params = SamplingParams(max_tokens=4, ignore_eos=True)

    async def tokens():
        return sum([len(out.new_token_ids) async for out in front.generate([5, 6, 7], params)])

    try:
        with pytest.raises(EngineStepFailed, match=r"\(ZeroDivisionError\); retry"):
            asyncio.run(tokens())
        monkeypatch.setattr(eng.runner, "forward", real)
        assert asyncio.run(tokens()) == 4 and front.is_alive()
    finally:
        front.shutdown()


def test_a_dead_engine_loop_fails_its_requests_refuses_new_ones_and_reports_it(make_model,
                                                                             monkeypatch):
    """An error that ends the loop thread (a bug outside the step) fails the requests it
    held with ``EngineLoopDied`` instead of leaving them waiting, refuses new ones at once,
    and ``is_alive`` (what the replica's health check reads) turns false."""
    import threading

    from dspark.workers.async_engine import EngineLoopDied

    eng = Engine(make_model(), None, EngineConfig(block_size=4, num_blocks=32, max_num_seqs=2),
                 COST)
    front = AsyncEngine(eng)
    gate, broken = threading.Event(), threading.Event()

    def listener(_stats):
        gate.wait(60)
        if broken.is_set():
            raise SystemExit("a bug")  # NOTE: not an Exception: the listener guard passes it

    front.listeners.append(listener)
    params = SamplingParams(max_tokens=20, ignore_eos=True)

    async def scenario():
        stream = front.generate([5, 6, 7], params)
        await stream.__anext__()  # running; the loop waits at the gate
        broken.set()
        gate.set()
        async def rest():
            return [out async for out in stream]

        with pytest.raises(EngineLoopDied, match=r"\(SystemExit\)"):  # not waiting forever
            await asyncio.wait_for(rest(), 30)
        with pytest.raises(EngineLoopDied):
            await asyncio.wait_for(front.generate([8, 9], params).__anext__(), 30)

    try:
        asyncio.run(scenario())
        wait_for(lambda: not front.is_alive())
    finally:
        gate.set()
        front.shutdown()


def test_a_request_sent_while_a_step_drafts_joins_it_and_an_abort_waits_for_the_commit(
        make_model, make_drafter, monkeypatch):
    """Through ``AsyncEngine``: a request sent while a step drafts joins that step, and an
    abort of a request of the step, sent meanwhile, waits until the step has committed
    (applied at once, the step would still write into its freed blocks), then leaves no
    state and no block behind."""
    target = make_model()
    eng = Engine(target, make_drafter(target, "dspark"), EngineConfig(
        block_size=4, num_blocks=200, max_num_batched_tokens=64, budget="fixed",
        draft_gating=False, max_num_seqs=4), COST)
    free = eng.blocks.num_free_blocks
    worker, drafting, joined = eng.draft_worker, threading.Event(), []
    propose, admit_late = worker.propose_step, engine_module.admit_late

    def held_propose(*args):
        if not drafting.is_set():  # the first drafting step waits until the new request
            drafting.set()         # and the abort are both sent
            wait_for(lambda: front._inbox.qsize() >= 2)
        return propose(*args)

    def counted_admit_late(*args):
        joined.append(admit_late(*args))
        return joined[-1]

    worker.propose_step = held_propose
    monkeypatch.setattr(engine_module, "admit_late", counted_admit_late)
    front = AsyncEngine(eng)
    params = SamplingParams(max_tokens=6, ignore_eos=True)

    async def scenario():
        first = front.generate([5, 6, 7], SamplingParams(max_tokens=30, ignore_eos=True))
        await first.__anext__()  # its prefill step is done; its next step drafts
        await asyncio.to_thread(wait_for, drafting.is_set)

        async def collect():
            return [t async for out in front.generate([8, 9, 10, 11], params)
                    for t in out.new_token_ids]

        second = asyncio.create_task(collect())
        await asyncio.to_thread(wait_for, lambda: front._inbox.qsize() >= 1)
        await first.aclose()  # its abort reaches the inbox while the step drafts
        return await asyncio.wait_for(second, 30)

    try:
        tokens = asyncio.run(scenario())
        assert joined[0] is True, "the request sent while the step drafted joined it"
        assert tokens == list(generate_tokens(target, [8, 9, 10, 11], params, ()))
        wait_for(lambda: not eng.scheduler.requests and not eng.states)
        assert eng.blocks.num_free_blocks == free
    finally:
        front.shutdown()
