"""Closed loops interleaved step by step: each engine decodes what it decodes alone, each
loop's clock holds only its own steps, and every request's time to first token is kept."""

from __future__ import annotations

import time

from dspark.bench.closed_loop import ClosedLoop, interleave, run_cell


def test_interleaved_loops_decode_alone_and_time_only_themselves(demo_target_dir):
    from dspark.models.drafter_checkpoint import load_drafter
    from dspark.models.generation import SamplingParams, load_for_generation
    from dspark.workers.engine import Engine, EngineConfig

    target, tok = load_for_generation(demo_target_dir)
    prompts = [tok.chat_prompt(t) for t in ("What is 2 + 3?", "Write hello world in Python.",
                                            "Name a colour.")]
    drafter = load_drafter(demo_target_dir.parent / "drafters" / "dspark", target)

    def params(i: int) -> SamplingParams:
        return SamplingParams(max_tokens=5 + i % 3)

    def engines():
        return (Engine(target, None, EngineConfig(max_num_seqs=4)),
                Engine(target, drafter, EngineConfig(max_num_seqs=4, budget="algorithm1")))

    alone = [run_cell(e, prompts, tok.stop_ids, 2, 5, params) for e in engines()]
    built = engines()
    start = time.perf_counter()  # NOTE: before the loops: building one admits its first requests
    loops = [ClosedLoop(e, prompts, tok.stop_ids, 2, 5, params) for e in built]
    interleave(loops)
    wall = time.perf_counter() - start
    for loop, (per_user, tokens, _, stats) in zip(loops, alone):
        assert loop.done and len(loop.per_user) == len(per_user) == 5
        assert sum(loop.tokens.values()) == tokens  # greedy: the same tokens as alone
        assert len(loop.stats) > 0 and len(stats) > 0
        # one first token per request, each within the loop's own clock
        assert len(loop.ttft) == 5 and all(0 < t <= loop.clock for t in loop.ttft)
    # the two clocks hold disjoint stretches of the interleaved run
    assert loops[0].clock + loops[1].clock <= wall
    assert all(loop.clock > 0 for loop in loops)


def test_a_loop_stopped_after_some_steps_returns_their_stats_and_aborts_the_rest(
        demo_target_dir):
    from dspark.models.generation import SamplingParams, load_for_generation
    from dspark.workers.engine import Engine, EngineConfig

    target, tok = load_for_generation(demo_target_dir)
    engine = Engine(target, None, EngineConfig(max_num_seqs=4))
    loop = ClosedLoop(engine, [tok.chat_prompt("Count to twenty.")], tok.stop_ids, 3,
                      10 ** 9, lambda i: SamplingParams(max_tokens=40))
    ticks = [loop.tick() for _ in range(4)]
    assert ticks == loop.stats and all(t.num_output_tokens == 3 for t in ticks)
    loop.abort()
    assert not engine.has_unfinished() and engine.states == {}
