"""The light drafter's gate (``dspark.workers.lanes``): everyone or nobody drafts with
it, at every load, each step measured against a plain step of as many requests, and
nobody drafting measured afresh while drafting wins."""

from __future__ import annotations

from dspark.workers.budget import CostModel, StepCostTable
from dspark.workers.gate import CostGate, DraftRecord, GateCandidate
from dspark.workers.lanes import LIGHT_MAX_LOAD
from dspark.workers.load_arms import LoadArms

# a plain step of B tokens costs 10 ms (B <= 8) up to 20 ms (B = 64)
VERIFY = StepCostTable((1, 8, 64), (100.0, 100.0, 50.0))


def decide(g: CostGate, candidates, num_decoding):
    """The engine's way: ``declines`` first, ``choose`` where it does not."""
    if g.declines(num_decoding, 0):
        return [False] * len(candidates)
    return g.choose(candidates, num_decoding, 0)



def light(probe_every: int = 4) -> CostGate:
    """The light drafter's gate (``dspark.workers.lanes``): arms at every load, measured
    against a plain step of as many requests."""
    g = CostGate(1, CostModel(VERIFY, StepCostTable((1, 64), (2000.0, 2000.0)), "cpu"),
                 probe_every, arms=True, max_load=LIGHT_MAX_LOAD, per_plain=True)
    g.observe([DraftRecord()], [1], [1])  # an engine-wide record exists
    return g


def test_a_light_gate_compares_each_step_with_a_plain_step_of_as_many_requests():
    """16 and 31 decoding requests share a load (16-31). Nobody drafting measured at 16,
    everyone drafting at 31 with nothing accepted: more tokens per second than at 16 (a
    bigger batch), no more than a plain step of 31 would give; so it stops, and it never
    drafts for some requests only."""
    g = light()
    plain = g.cost.step_seconds
    recs = [DraftRecord(0.7, 1.0, count=30) for _ in range(31)]
    cands = [GateCandidate(r, 1) for r in recs]
    for _ in range(LoadArms.trial):  # nobody first, measured at 16 requests
        assert decide(g, cands[:16], 16) == [False] * 16
        g.observe([], [], [], idle=recs[:16], seconds=plain(16))
    picks = decide(g, cands, 31)  # then everyone, tried at 31
    assert picks == [True] * 31
    for _ in range(LoadArms.trial):
        g.observe(recs, [1] * 31, [0] * 31, seconds=plain(31))
        assert 31.0 / plain(31) > 16.0 / plain(16) * 1.02  # faster by the raw rates
        assert decide(g, cands, 31) in ([True] * 31, [False] * 31)
    assert decide(g, cands, 31) == [False] * 31 and g.arm == (8, "none")


def test_a_light_gate_measures_nobody_drafting_afresh_while_drafting_wins():
    """While everyone drafting wins, nobody drafting is measured again for a trial every
    ``recheck`` steps of the load; a plain step that now measures faster stops drafting."""
    g = light()
    plain = g.cost.step_seconds
    recs = [DraftRecord(0.7, 1.0, count=30) for _ in range(20)]
    cands = [GateCandidate(r, 1) for r in recs]
    kinds = []
    for step in range(260):
        picks = decide(g, cands, 20)
        kinds.append("a" if picks[0] else "n")
        assert picks in ([True] * 20, [False] * 20)
        if picks[0]:
            g.observe(recs, [1] * 20, [1] * 14 + [0] * 6 if step < 60 else [0] * 20,
                      seconds=1.2 * plain(20))
        else:
            g.observe([], [], [], idle=recs, seconds=plain(20))
    runs = "".join(kinds)
    recheck = LoadArms.recheck_every * 4
    assert runs.startswith("n" * LoadArms.trial + "a")
    first = runs.index("a")
    assert runs[first:first + recheck - 1] == "a" * (recheck - 1)
    assert "a" + "n" * LoadArms.trial + "a" in runs[:60]  # a recheck, and drafting wins
    assert runs[-100:].count("a") <= 2 * LoadArms.trial, runs  # it stops: rare retries


def test_a_light_gate_judges_its_step_predictions_by_the_whole_step():
    """Steps that take what the light gate predicted keep its step realism at 1, drafted
    or not. Until session 27 the arms' per-request scaling of a step's seconds reached the
    realism too, which then sat at its clamp (4) whatever the steps took."""
    g = light()
    recs = [DraftRecord(0.7, 1.0, count=30) for _ in range(20)]
    cands = [GateCandidate(r, 1) for r in recs]
    kinds = set()
    for _ in range(40):
        drafted = decide(g, cands, 20)[0]
        kinds.add(drafted)
        seconds = g.prediction[1]
        if drafted:
            g.observe(recs, [1] * 20, [1] * 20, seconds=seconds)
        else:
            g.observe([], [], [], idle=recs, seconds=seconds)
    assert kinds == {True, False}
    assert all(abs(v - 1.0) < 1e-9 for v in g.step_realism.values()), g.step_realism


def test_a_decode_only_step_of_more_requests_than_the_main_arms_cover_asks_the_light_lane_first():
    """``lane_order``: the main lane first up to ``LoadArms.max_load`` (7 decoding
    requests) and in any step with a prefill chunk; above, the light lane first."""
    from dspark.workers.lanes import lane_order

    main, light_lane = object(), object()
    lanes = [main, light_lane]
    assert lane_order(lanes, 7, 0, 0) == [main, light_lane]
    assert lane_order(lanes, 8, 0, 0) == [light_lane, main]
    assert lane_order(lanes, 64, 0, 0) == [light_lane, main]
    assert lane_order(lanes, 16, 40, 1) == [main, light_lane]  # a prefill chunk in it
    assert lane_order([main], 64, 0, 0) == [main]
