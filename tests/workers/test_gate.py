"""The per-request draft gate: who drafts, from each request's own record and the step's
costs; probes cost only the requests probed; records follow what verification accepted."""

from __future__ import annotations

from dspark.workers.budget import CostModel, StepCostTable
from dspark.workers.engine_config import EngineConfig
from dspark.workers.gate import CostGate, DraftGate, DraftRecord, GateCandidate, make_gate
from dspark.workers.load_arms import LoadArms

# a plain step of B tokens costs 10 ms (B <= 8) up to 20 ms (B = 64)
VERIFY = StepCostTable((1, 8, 64), (100.0, 100.0, 50.0))


def gate(draft_ms: float, probe_every: int = 8, verify: StepCostTable = VERIFY,
         hold: int = 0) -> CostGate:
    """A cost gate; ``hold`` 0: every step priced (``test_a_choice_of_nobody_holds...``)."""
    rate = 1000.0 / draft_ms
    g = CostGate(7, CostModel(verify, StepCostTable((1, 64), (rate, rate)), "cpu"), probe_every)
    g.hold = hold
    g.observe([DraftRecord()], [4], [2])  # an engine-wide record exists
    return g


def cand(gain: float | None, ell: float | None = 4.0, idle: int = 0) -> GateCandidate:
    return GateCandidate(DraftRecord(gain, ell if gain is not None else None, idle), cap=7)


def test_requests_that_accept_draft_and_those_that_do_not_skip_in_the_same_step():
    # drafting costs 5 ms: a request gains 1 + g tokens over 15 ms instead of 1 over 10 ms
    picks = gate(5.0).choose([cand(3.0), cand(0.1), cand(2.5), cand(0.0)], 4, 0)
    assert picks == [True, False, True, False]


def test_drafting_pays_for_nobody_when_the_drafter_costs_more_than_it_gains():
    assert gate(50.0).choose([cand(3.0), cand(2.0)], 2, 0) == [False, False]
    assert gate(0.5).choose([cand(3.0), cand(2.0)], 2, 0) == [True, True]


def idle_steps(g: CostGate, n: int) -> None:
    for _ in range(n):
        g.observe([], [], [])  # steps in which the drafter did not run


def test_stale_requests_ride_along_when_the_drafter_runs_anyway():
    g = gate(5.0, probe_every=4)
    stale = [cand(0.0, idle=3), cand(0.0, idle=5), cand(0.0, idle=4), cand(0.0, idle=1)]
    picks = g.choose([cand(3.0), *stale], 5, 0)
    # the paying request drafts; the two stalest of the three stale ones are probed
    assert picks == [True, False, True, True, False]


def test_with_nobody_worth_drafting_probe_steps_back_off():
    # drafting costs 12 ms: a request accepting 0.2 drafts never pays; two accepting all
    # four of their drafts would, so probing them can change the decision
    g = gate(12.0, probe_every=4)
    stale = [cand(0.2, idle=3), cand(0.2, idle=1), cand(0.2, idle=7), cand(0.2, idle=3)]
    assert g.choose(stale, 4, 0) == [False] * 4  # the drafter just ran (the helper's step)
    drafted_at = []
    for step in range(60):
        picks = g.choose(stale, 4, 0)
        assert sum(picks) <= CostGate.probes_per_step
        if any(picks):
            assert picks[2] and (picks[0] or picks[3]) and not picks[1]  # stalest first
            drafted_at.append(step)
        g.observe([DraftRecord()] if any(picks) else [], [1] if any(picks) else [],
                  [0] if any(picks) else [])
    gaps = [b - a for a, b in zip([-1, *drafted_at], drafted_at)]
    assert gaps[:4] == [4, 8, 16, 32]  # the idle gap doubles, up to 8 * probe_every


def test_no_probe_where_even_full_acceptance_would_not_pay_but_a_refresh_at_the_longest_gap():
    # drafting costs 50 ms against a 10 ms step: a request accepting every draft it
    # verifies still loses, so a probe could only refresh the costs that say so, which it
    # does once the drafter has been idle for the longest gap (8 x probe_every steps),
    # then after twice that, and so on while the refreshes find nobody worth drafting
    g = gate(50.0, probe_every=4)
    never = GateCandidate(DraftRecord(idle=30), cap=7)
    picks = []
    for _ in range(240):
        picks.append(g.choose([cand(3.0, idle=30), never, cand(0.2, idle=30)], 3, 0))
        g.observe([DraftRecord()] * sum(picks[-1]), [], [], [])
    probed = [step for step, p in enumerate(picks) if any(p)]
    assert probed == [31, 95, 223]  # idle gaps of 32, 64 and 128 steps
    assert all(sum(picks[step]) <= g.probes_per_step for step in probed)


def test_a_choice_of_nobody_holds_for_a_few_steps_at_the_same_load_unpriced():
    # drafting costs 1 s: nobody pays; the choice stands for `hold` decode-only steps at
    # 4 decoding requests without pricing (even once drafting has become cheap), twice as
    # long after each repeat, and ends at once when the number of decoding requests
    # changes
    g = gate(1000.0, probe_every=100, hold=2)
    worth = [cand(3.0)] * 4
    assert g.choose(worth, 4, 0) == [False] * 4
    g.cost = CostModel(VERIFY, StepCostTable((1, 64), (2000.0, 2000.0)), "cpu")  # cheap now
    assert g.declines(4, 0) and g.declines(4, 0)
    assert not g.declines(4, 0)  # held twice: priced again
    assert g.choose(worth, 4, 0) == [True] * 4
    g.cost = CostModel(VERIFY, StepCostTable((1, 64), (1.0, 1.0)), "cpu")  # dear again
    g.observe([DraftRecord()] * 4, [4] * 4, [3] * 4)
    assert g.choose(worth, 4, 0) == [False] * 4
    assert g.declines(4, 0) and g.declines(4, 0) and not g.declines(4, 0)
    assert g.choose(worth, 4, 0) == [False] * 4  # nobody again: held twice as long
    assert all(g.declines(4, 0) for _ in range(4)) and not g.declines(4, 0)
    assert g.choose(worth, 4, 0) == [False] * 4
    assert g.declines(4, 0)
    assert not g.declines(5, 0)  # another load: priced
    assert g.choose(worth, 5, 0) == [False] * 4 and g.held == (5, 2)  # held afresh
    # a step with a prefill chunk drafts for nobody, unpriced, where it may not draft
    g.with_prefill = False  # EngineConfig.draft_with_prefill's default
    assert g.declines(3, 16)


def test_a_request_worth_drafting_resets_the_probe_gap():
    g = gate(12.0, probe_every=2)
    idle_steps(g, 5)
    assert g.choose([cand(0.1, idle=2)], 1, 0) == [True]  # a probe step
    assert g.gap == 4
    g.cost = CostModel(VERIFY, StepCostTable((1, 64), (2000.0, 2000.0)), "cpu")  # cheap now
    assert g.choose([cand(3.0), cand(0.1, idle=2)], 2, 0) == [True, True]
    assert g.gap == 2


def test_new_requests_use_the_engine_record_and_everyone_drafts_before_any_record():
    assert CostGate(7, CostModel(VERIFY, VERIFY, "cpu"), 8).choose([cand(None)] * 3, 3, 0) == [
        True] * 3
    g = gate(5.0)
    g.gain = 0.0  # the engine-wide record says drafts are never accepted
    assert g.choose([cand(None), cand(3.0)], 2, 0) == [False, True]


def test_prefill_load_makes_verification_dearer_and_drafting_rarer():
    # past 8 tokens a step gets dear fast: with 8 prefill tokens in the step, verifying 4
    # more tokens costs 3.8 ms instead of nothing
    steep = StepCostTable((1, 8, 16), (100.0, 100.0, 50.0))
    light = gate(2.0, verify=steep).choose([cand(0.3)], 1, 0)
    heavy = gate(2.0, verify=steep).choose([cand(0.3)], 1, 8)
    assert light == [True] and heavy == [False]


def test_observe_updates_records_from_accepted_counts():
    g = DraftGate(7)
    a, b, idle = DraftRecord(), DraftRecord(gain=2.0, ell=4.0, idle=3), DraftRecord(idle=1)
    g.observe([a, b], [5, 2], [4, 0], [idle])
    assert (a.gain, a.ell, a.idle) == (4.0, 5.0, 0)
    keep = 1 - g.alpha
    assert b.gain == keep * 2.0 and b.ell == keep * 4.0 + g.alpha * 2 and b.idle == 0
    assert idle.idle == 2
    # NOTE: the engine-wide EWMAs weigh each drafted request-step: two here
    step = 1 - (1 - g.engine_alpha) ** 2
    assert g.gain == 2.0 and abs(g.mean_survival - 2.0 / ((1 - step) * 7 + step * 3.5)) < 1e-9
    g.observe([DraftRecord()] * 64, [2] * 64, [0] * 64)
    one = DraftGate(7)
    one.gain = 2.0
    one.observe([DraftRecord()], [2], [0])
    # one step of 64 drafted requests moves the engine's gain more than a step of one
    assert g.gain < 0.5 * 2.0 < one.gain < 2.0


def test_prefilling_requests_in_the_step_count_against_drafting():
    # one decoding request gains 0.6 per draft at 2 ms of drafting; with 6 requests
    # prefilling in the same step, a 2 ms longer step delays 7 requests, not one
    assert gate(2.0).choose([cand(0.6)], 1, 6) == [True]
    assert gate(2.0).choose([cand(0.6)], 1, 6, other_requests=6) == [False]


def test_the_gate_weighs_whole_steps_not_forwards():
    # 32 requests decode; verifying costs 10 ms whatever B; one request could draft with 4
    # accepted at 1 ms of drafting. Against the bare forward, 36 tokens in 11 ms are not 5 %
    # more than 32 in 10 ms; once the step's sampling and commit are seen to take as long
    # again as its forward, 36 tokens in 21 ms are more than 5 % above 32 in 20 ms
    g = gate(1.0, verify=StepCostTable((1, 64), (100.0, 100.0)))
    assert g.choose([cand(4.0)], 32, 0) == [False]
    for _ in range(100):
        g.cost.observe(1, 0.010, 0, 0.0, other_seconds=0.010)
    assert abs(g.cost.overhead - 1.0) < 1e-3
    assert abs(g.cost.step_seconds(8) - 0.020) < 1e-3
    assert g.choose([cand(4.0)], 32, 0) == [True]


def test_the_margin_is_asked_of_drafting_and_inf_turns_drafting_off():
    # 1 request, 10 ms steps, 5 ms drafting: 0.55 accepted gives 1.55 tokens in 15 ms,
    # 3 % more than 1 in 10 ms, short of the 5 % margin; 0.6 gives 7 % more
    assert gate(5.0).choose([cand(0.55)], 1, 0) == [False]
    assert gate(5.0).choose([cand(0.6)], 1, 0) == [True]
    off = gate(0.001)
    off.margin = float("inf")
    assert off.choose([cand(7.0)], 1, 0) == [False]


def test_steps_that_draft_and_take_longer_than_predicted_make_drafting_dearer():
    # the tables say a drafted step of this request costs 15 ms; it keeps taking 45 ms
    # (4 tokens in 45 ms: less than 1 in a 10 ms plain step): the gate learns it and
    # stops drafting
    g = gate(5.0)
    rec = DraftRecord(3.0, 4.0)
    steps = 0
    for _ in range(80):
        steps += 1
        picks = g.choose([GateCandidate(rec, 7)], 1, 0)
        (drafted, mixed), predicted = g.prediction
        assert drafted == picks[0] and not mixed
        if not picks[0]:
            break
        g.observe([rec], [4], [3], seconds=3 * predicted)
    assert not picks[0] and steps > 5 and g.step_realism[True, False] > 2.5
    g.observe([], [], [], [rec], seconds=predicted)  # a plain step as predicted
    assert g.step_realism[False, False] == 1.0 and g.prediction is None
    # NOTE: steps with a prefill chunk keep their own: the same request drafts there
    assert g.step_realism[True, True] == 1.0
    assert g.choose([GateCandidate(rec, 7)], 1, 0, other_requests=1) == [True]



def test_a_request_that_never_drafted_is_probed_whatever_the_back_off():
    # the drafter has backed off to 32 idle steps; a request with no record of its own that
    # has been stale is probed once the drafter was idle probe_every steps, ahead of the
    # stalest request with a record
    g = gate(12.0, probe_every=4)
    g.gap = 32
    new = GateCandidate(DraftRecord(idle=3), cap=7)
    idle_steps(g, 2)
    assert g.choose([new, cand(0.2, idle=9)], 2, 0) == [False, False]
    idle_steps(g, 1)
    picks = g.choose([new, cand(0.2, idle=9), cand(0.2, idle=9), cand(0.2, idle=1)], 4, 0)
    assert picks == [True, True, False, False]



def test_a_prior_shrinks_a_short_record_toward_the_engine_and_a_long_one_less():
    # engine-wide: 2 accepted drafts per drafted step (the helper's first observation)
    g = gate(5.0)
    g.prior = 2.0
    lucky = DraftRecord(6.0, 7.0, count=1)  # one probe that accepted 6
    steady = DraftRecord(6.0, 7.0, count=50)  # the same EWMA over many steps
    assert g._gain(lucky) == (1 * 6.0 + 2 * 2.0) / 3
    memory = (2 - g.alpha) / g.alpha  # an EWMA's sample size: a long record counts so much
    assert g._gain(steady) == (memory * 6.0 + 2 * 2.0) / (memory + 2)
    assert g._gain(lucky) < g._gain(steady) < 6.0
    assert g._gain(DraftRecord()) == g.gain  # no record: the engine's
    g.prior = 0.0
    assert g._gain(lucky) == 6.0
    # drafting costs 5 ms and a step 10 ms: a request must gain 0.575 drafts (1.05 × 1 token
    # per 10 ms against 1 + g per 15 ms). One lucky record of 0.8 is drafted without a
    # prior, and not with one: (1 * 0.8 + 2 * 0.2) / 3 = 0.4
    g.gain = 0.2
    candidates = [GateCandidate(DraftRecord(0.8, 4.0, count=1), 7)]
    assert g.choose(candidates, 1, 0) == [True]
    g.prior = 2.0
    assert g.choose(candidates, 1, 0) == [False]


def test_records_count_their_drafted_steps():
    g, rec = gate(5.0), DraftRecord()
    g.observe([rec], [4], [3])
    g.observe([], [], [], idle=[rec])
    g.observe([rec], [4], [1])
    assert rec.count == 2 and rec.idle == 0


def test_rows_owed_are_priced_and_the_cheaper_request_drafts_first():
    # drafting costs 5 ms and each owed row 0.05 ms: the same record pays with no rows
    # owed and not with 600 (30 ms more); of two, the one owing nothing is drafted
    g = gate(5.0)
    g.cost.write_row = 5e-5
    owing = GateCandidate(DraftRecord(3.0, 4.0), cap=7, owed=600)
    fresh = GateCandidate(DraftRecord(3.0, 4.0), cap=7, owed=0)
    assert g.choose([owing], 1, 0) == [False]
    assert g.choose([owing, fresh], 2, 0) == [False, True]
    (drafted, _), predicted = g.prediction
    assert drafted and predicted < 0.030  # NOTE: the owing request's rows are not in it
    g.cost.write_row = 0.0
    assert g.choose([owing], 1, 0) == [True]


def test_records_that_promise_more_than_they_accept_are_discounted():
    # requests drafted for cost keep accepting a third of what their records promise:
    # the gate learns it (gain_realism) and stops drafting the records that only pay at
    # face value; probes do not count
    g = gate(5.0)
    recs = [DraftRecord(1.2, 4.0, count=30) for _ in range(2)]
    cands = [GateCandidate(r, 7) for r in recs]
    assert g.choose(cands, 2, 0) == [True, True]
    for _ in range(40):
        picks = g.choose(cands, 2, 0)
        if not any(picks):
            break
        g.observe([r for r, p in zip(recs, picks) if p], [4] * sum(picks), [0] * sum(picks))
        for r in recs:  # NOTE: their records as they were: only the realism moves
            r.gain, r.ell = 1.2, 4.0
    assert not any(picks) and g.gain_realism < 0.5


def test_rows_owed_are_spread_over_the_steps_the_request_may_still_draft():
    # 600 rows (30 ms) do not pay in one step; a request with 400 tokens to go drafts
    # about 100 more steps at a gain of 3, so its first write pays
    g = gate(5.0)
    g.cost.write_row = 5e-5
    assert g.choose([GateCandidate(DraftRecord(3.0, 4.0), 7, owed=600)], 1, 0) == [False]
    assert g.choose([GateCandidate(DraftRecord(3.0, 4.0), 7, owed=600, remaining=400)],
                    1, 0) == [True]
    (_, _), predicted = g.prediction
    assert predicted > 0.030  # NOTE: the step is predicted with every row it writes



def decide(g: CostGate, candidates, num_decoding, other_tokens, other_requests=0):
    """The engine's way: ``declines`` first, ``choose`` where it does not."""
    if g.declines(num_decoding, other_tokens, other_requests):
        return [False] * len(candidates)
    return g.choose(candidates, num_decoding, other_tokens, other_requests)


def armed(draft_ms: float = 5.0) -> CostGate:
    rate = 1000.0 / draft_ms
    g = CostGate(7, CostModel(VERIFY, StepCostTable((1, 64), (rate, rate)), "cpu"), 4,
                 arms=True)
    g.observe([DraftRecord()], [4], [2])  # an engine-wide record exists
    return g


def test_everyone_drafts_at_a_load_where_drafting_for_everyone_measured_faster():
    """The arms per load: a poor record is not drafted by cost; once a step where
    everyone drafted measured more tokens per second than a plain one at that load,
    everyone drafts there, and a load with a prefill chunk is left to the cost gate."""
    g = armed()
    poor = DraftRecord(0.1, 4.0, count=30)
    cands = [GateCandidate(poor, 7), GateCandidate(poor, 7)]
    assert g.choose(cands, 2, 0) == [False, False]  # by cost; a plain step at load 2
    g.observe([], [], [], idle=[poor, poor], seconds=0.010)  # 200 tokens per second
    assert g.choose(cands, 2, 0) == [True, True]  # the other arm, never measured: tried
    g.observe([poor, poor], [4, 4], [3, 3], seconds=0.016)  # 8 tokens: 500 per second
    for _ in range(5):
        poor.gain = 0.1  # NOTE: its record as it was: only the arms move
        assert g.choose(cands, 2, 0) == [True, True]
        g.observe([poor, poor], [4, 4], [3, 3], seconds=0.016)
    poor.gain = 0.1
    assert g.choose(cands, 2, 0, other_requests=1) == [False, False]  # a prefill in it
    g.observe([], [], [], idle=[poor, poor], seconds=0.012)
    assert g.choose(cands, 1, 0) == [False, False]  # another load: its own arms


def test_a_losing_arm_is_tried_again_after_a_gap_that_doubles():
    g = armed()
    poor = DraftRecord(0.1, 4.0, count=30)
    cands = [GateCandidate(poor, 7)]
    tried = []
    for step in range(120):
        picks = g.choose(cands, 1, 0)
        if g.arm == (0, "all"):
            assert picks == [True]
            tried.append(step)
            g.observe([poor], [4], [0], seconds=0.020)  # 1 token in 20 ms: loses
        else:
            g.observe([], [], [], idle=[poor], seconds=0.010)
    # each try lasts LoadArms.trial (4) steps; the gap between tries (plain steps + 1)
    # doubles from probe_every (4) to 32 << load 0
    tries = [tried[i:i + 4] for i in range(0, len(tried), 4)]
    assert all(t == list(range(t[0], t[0] + 4)) for t in tries)
    gaps = [b[0] - a[-1] - 1 for a, b in zip(tries, tries[1:])]
    assert tried[0] == 1 and gaps[:3] == [7, 15, 31] and set(gaps[3:]) == {31}


def test_one_slow_first_step_does_not_hold_the_drafting_arm_down():
    """A replica warming up beside others: its first step where everyone drafted took 20
    times its time. A retry measures the arm afresh, so the first retry wins it back."""
    g = armed()
    poor = DraftRecord(0.1, 4.0, count=30)
    cands = [GateCandidate(poor, 7)]
    drafted = []
    for step in range(60):
        poor.gain = 0.1  # NOTE: its record as it was: only the arms move
        picks = g.choose(cands, 1, 0)
        if g.arm == (0, "all"):
            slow = 20 if not drafted else 1  # 4 tokens in 8 ms, the first in 160 ms
            drafted.append(step)
            g.observe([poor], [4], [3], seconds=0.008 * slow)
        elif picks[0]:  # a probe of the cost gate, not an arm's step
            g.observe([poor], [4], [3], seconds=0.008)
        else:
            g.observe([], [], [], idle=[poor], seconds=0.004)  # 1 token in 4 ms
    # tried for 4 steps, lost to the slow one, tried again after the gap: won for good
    assert drafted == [1, 2, 3, 4, *range(12, 60)]


def test_at_one_request_a_new_request_is_tried_at_once():
    """The drafting arm lost on one request (nothing accepted); the next request alone is
    tried at its first step, whatever the gap."""
    g = armed()
    first, second = DraftRecord(0.1, 4.0, count=30), DraftRecord(0.1, 4.0, count=30)
    for _ in range(5):  # a plain step, then a try of 4 steps that loses
        g.choose([GateCandidate(first, 7)], 1, 0)
        arm = g.arm
        if arm == (0, "all"):
            g.observe([first], [4], [0], seconds=0.020)
        else:
            g.observe([], [], [], idle=[first], seconds=0.010)
    assert g.choose([GateCandidate(first, 7)], 1, 0) == [False] and g.arm == (0, "none")
    g.observe([], [], [], idle=[first], seconds=0.010)
    assert g.choose([GateCandidate(second, 7)], 1, 0) == [True] and g.arm == (0, "all")


def test_each_number_of_requests_up_to_7_is_a_load_of_its_own_then_powers_of_two():
    loads = [LoadArms.load(n) for n in (1, 2, 4, 6, 7, 8, 15, 16, 64)]
    assert loads == [0, 1, 3, 5, 6, 7, 7, 8, 10]
    assert [LoadArms.level(load) for load in loads] == [0, 1, 2, 2, 2, 3, 3, 4, 6]


def test_a_try_whose_drafts_go_unverified_ends_at_once():
    g = armed()
    poor = DraftRecord(0.1, 4.0, count=30)
    cands = [GateCandidate(poor, 7)]
    g.choose(cands, 1, 0)
    g.observe([], [], [], idle=[poor], seconds=0.010)
    assert g.choose(cands, 1, 0) == [True] and g.arm == (0, "all")
    g.observe([poor], [0], [0], seconds=0.015)  # the budget verified no draft
    assert g.choose(cands, 1, 0) == [False]  # judged after one step, not four


def test_above_the_arms_loads_the_gate_stops_where_its_drafting_steps_measure_slower():
    """8 decoding requests (load 7): the cost gate's own choice is the ``all`` arm and
    nobody drafting the ``none`` arm; once steps in which it drafted have measured fewer
    tokens per second than plain ones, nobody drafts there, unpriced, until a retry after
    the gap (which doubles from probe_every)."""
    g = armed(draft_ms=0.5)  # drafting is cheap: the cost gate drafts good records
    g.hold = 0
    good = [GateCandidate(DraftRecord(3.0, 4.0, count=30), 7) for _ in range(8)]
    records = [c.record for c in good]
    assert decide(g, good, 8, 0) == [False] * 8 and g.arm == (7, "none")  # measured first
    g.observe([], [], [], idle=records, seconds=0.010)  # 8 tokens in 10 ms
    for _ in range(LoadArms.trial):
        assert decide(g, good, 8, 0) == [True] * 8 and g.arm == (7, "all")
        g.observe(records, [4] * 8, [1] * 8, seconds=0.030)  # 16 tokens in 30 ms
    declined = 0
    while g.declines(8, 0):
        assert g.arm == (7, "none")
        g.observe([], [], [], idle=records, seconds=0.010)
        declined += 1
    assert declined == 7  # the 8th step tries the gate again
    assert g.choose(good, 8, 0) == [True] * 8


def test_a_step_with_a_prefill_chunk_drafts_for_nobody_unless_asked():
    """``EngineConfig.draft_with_prefill`` False (the default): a newcomer's prefill step
    is a plain step, even for a request whose record pays; True: priced as any step."""
    rate = 1000.0 / 5.0
    cost = CostModel(VERIFY, StepCostTable((1, 64), (rate, rate)), "cpu")
    for with_prefill, want in ((False, [False]), (True, [True])):
        g = CostGate(7, cost, 8, with_prefill=with_prefill)
        g.observe([DraftRecord()], [4], [2])
        assert decide(g, [cand(6.0)], 1, 3, other_requests=1) == want
        assert decide(g, [cand(6.0)], 1, 0) == [True]  # decode-only: drafts either way
    assert not make_gate(7, cost, True, EngineConfig(budget="algorithm1")).with_prefill

