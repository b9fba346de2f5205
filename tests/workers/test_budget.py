"""Verification budgets, and the paper's Appendix A: a retrospective search biases the
output distribution; Algorithm 1 with its early stop does not."""

from __future__ import annotations

import pytest
import torch
from budget_reference import (
    GroupCost,
    algorithm1,
    capacity_from_stale,
    fixed_budget,
    survival,
    threshold_budget,
    topk_budget,
)

from dspark.kernels.prefix_select import select_prefixes
from dspark.models.generation import SamplingParams
from dspark.workers.budget import CostModel, GroupLoad, OnlineCostTable, StepCostTable
from dspark.workers.sampling import RequestSampling, UniformStream, verify

SAMPLED = SamplingParams(temperature=1.0)
FLAT = StepCostTable((1, 64), (10.0, 10.0))  # verifying more never costs more


def test_step_cost_table_interpolates_and_validates():
    cost = StepCostTable((1, 5, 9), (10.0, 6.0, 2.0))
    assert cost.sps(1) == 10.0 and cost.sps(3) == 8.0 and cost.sps(9) == 2.0
    # past the profile, step time grows in proportion to B: twice the tokens, half the SPS
    assert cost.sps(18) == 1.0
    with pytest.raises(ValueError, match="increasing"):
        StepCostTable((4, 2), (1.0, 1.0))


def test_the_online_table_keeps_the_profiles_shape_and_learns_its_level():
    # profiled: 10 ms at B=1, 12 at 8, 20 at 64
    profile = StepCostTable((1, 8, 64), (100.0, 1000 / 12, 50.0))
    online = OnlineCostTable(profile, alpha=1.0)
    # the live engine runs slower than the profile: only single-token steps seen, at 15 ms
    online.observe(1, 0.015)
    times = [1000 / online.table.sps(b) for b in (1, 8, 64)]
    # every bucket takes B=1's ratio (1.5): the table keeps its slope (it used to go flat at
    # 15 ms up to B=8: drafts looked free)
    assert times == pytest.approx([15.0, 18.0, 30.0])
    # a bucket observed keeps its own ratio; the unobserved one takes its nearest's
    online.observe(8, 0.0132)  # 1.1 x the profile
    assert [1000 / online.table.sps(b) for b in (1, 8, 64)] == pytest.approx([15.0, 15.0, 22.0])
    # B=5 maps to bucket 8 (log scale) and is compared with the profile at 5
    online.observe(5, 0.022)
    assert online.ratios[:2] == pytest.approx([1.5, 0.022 * profile.sps(5)])


def test_a_buckets_first_observation_moves_it_by_alpha_not_outright():
    """One slow step at a bucket never observed (a cold step, a burst beside it) must not
    price that bucket outright: the budget would then keep away from it, and it would
    never be observed again (the C=1 freeze over HTTP, session 15)."""
    profile = StepCostTable((1, 8, 64), (100.0, 1000 / 12, 50.0))
    online = OnlineCostTable(profile, alpha=0.5)
    online.observe(1, 0.015)  # from the profile's ratio 1.0 toward 1.5
    assert online.ratios[0] == pytest.approx(1.25)
    online.observe(8, 0.024)  # 2 x the profile: from bucket 1's 1.25 toward 2.0
    assert online.ratios[1] == pytest.approx(1.625)
    assert 1000 / online.table.sps(8) == pytest.approx(12 * 1.625)


def test_fixed_and_threshold_budgets():
    assert fixed_budget([7, 3, 0], 5) == [5, 3, 0]
    conf = [[0.9, 0.8, 0.3, 0.9], [0.2, 0.9], []]
    assert threshold_budget(conf, 0.5) == [2, 0, 0]


def test_algorithm1_admits_everything_when_verification_is_free():
    surv = survival([[0.9, 0.5, 0.5], [0.2]])
    assert algorithm1(surv, FLAT) == [3, 1]


def test_algorithm1_verify_budget_shrinks_as_steps_get_expensive():
    conf = [[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]] * 4
    cheap = StepCostTable((1, 64), (100.0, 90.0))
    steep = StepCostTable((1, 8, 64), (100.0, 40.0, 5.0))
    assert sum(algorithm1(survival(conf), cheap)) > sum(algorithm1(survival(conf), steep))


def test_algorithm1_budget_per_request_shrinks_with_concurrency():
    # memory-bound (flat) up to 16 tokens per step, compute-bound (1/B) beyond
    sizes = (1, 16, 32, 64, 128, 256)
    cost = StepCostTable(sizes, tuple(100.0 * min(1.0, 16 / b) for b in sizes))
    row = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    per_request = []
    for num in (1, 4, 16, 32):
        lengths = algorithm1(survival([row] * num), cost)
        per_request.append(sum(lengths) / num)
    assert per_request == sorted(per_request, reverse=True)
    assert per_request[0] > per_request[-1]


def test_topk_takes_the_most_likely_prefixes_and_capacity_comes_from_stale_values():
    surv = survival([[0.9, 0.9, 0.9], [0.5, 0.5]])
    assert topk_budget(surv, 3) == [3, 0]
    assert topk_budget(surv, 4) == [3, 1]
    assert capacity_from_stale(surv, FLAT) == 5


def retrospective_search(surv, cost):
    """The biased alternative: for one request, pick the ℓ with the best expected
    throughput over all prefixes (it looks at later positions before deciding earlier ones)."""
    row = surv[0]
    best, best_len, expected = cost.sps(1), 0, 1.0
    for j, a in enumerate(row):
        expected += a
        if expected * cost.sps(j + 2) > best:
            best, best_len = expected * cost.sps(j + 2), j + 1
    return [best_len]


def first_token_frequency(policy, runs=4000):
    """Target (0.7, 0.3) over tokens {0, 1} at draft position 1; a perfect drafter; the
    confidence of position 2 depends on the sampled draft (high after 0, low after 1)."""
    cost = StepCostTable((1, 2, 3), (1.0, 0.6, 0.55))
    p = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.5, 0.5]])  # positions 1, 2 and the bonus
    hits = 0
    for seed in range(runs):
        gen = torch.Generator().manual_seed(seed)
        x1 = int(torch.multinomial(p[0], 1, generator=gen))
        x2 = int(torch.multinomial(p[1], 1, generator=gen))
        conf = [[0.5, 0.95 if x1 == 0 else 0.05]]
        length = policy(survival(conf), cost)[0]
        out = verify([RequestSampling(SAMPLED, 0, UniformStream(gen))], [0], p[: length + 1],
                     [[x1, x2][:length]], p[:length])
        hits += out.output_ids[0][0] == 0
    return hits / runs


def test_appendix_a_retrospective_search_is_biased_algorithm1_is_not():
    assert first_token_frequency(algorithm1) == pytest.approx(0.7, abs=0.025)
    biased = first_token_frequency(retrospective_search)
    assert biased == pytest.approx(0.7 + 0.3 * 0.7, abs=0.025)  # 0.91, not 0.7


def test_requests_the_step_also_serves_shrink_algorithm1():
    """Undrafted and prefilling requests get their token one step time later too: counting
    them makes a longer step dearer, so fewer drafts are verified (never more)."""
    cost = StepCostTable((1, 8, 32), (100.0, 80.0, 40.0))
    surv = survival([[0.9, 0.6, 0.4, 0.3], [0.8, 0.5, 0.2]])
    alone = algorithm1(surv, cost, 2)
    crowded = algorithm1(surv, cost, 2, other_requests=12)
    assert sum(crowded) < sum(alone)
    assert all(c <= a for c, a in zip(crowded, alone))


def test_a_ranks_step_is_private_at_the_heaviest_member_and_shared_per_member():
    """t(B) = 1/SPS(B) profiled with B tokens on every member; a rank's step is
    (1 - f) t(max of the members' tokens) + f t(the group's tokens per member)."""
    table = StepCostTable((1, 10, 20, 40), (100.0, 50.0, 25.0, 10.0), (0.2, 0.4, 0.4, 0.6))
    cost = CostModel(table, None, "cpu")
    assert cost.shared == 0.4  # the median over batch sizes
    assert cost.verify_seconds(10) == pytest.approx(1 / 50)  # alone: the table
    cost.group = GroupLoad((30,), 12.0)
    # private at max(10, 30) = 30 (SPS 17.5), shared at (10 + 30) / 2 = 20 (SPS 25)
    assert cost.verify_seconds(10) == pytest.approx(0.6 / 17.5 + 0.4 / 25.0)
    assert cost.group_committed == 12.0
    cost.group = GroupLoad((), 0.0)  # a group of one: alone again
    assert cost.verify_seconds(10) == pytest.approx(1 / 50)
    with pytest.raises(ValueError, match="shared"):
        StepCostTable((1, 10), (10.0, 5.0), (0.5,))


@pytest.mark.parametrize("others,committed", [((3,), 0.0), ((40,), 6.0), ((12, 50), 30.0)])
def test_cluster_selection_equals_algorithm1_on_per_rank_costs(others, committed):
    """The cluster budget's tensor selection is Algorithm 1 with the per-rank step cost and
    the rest of the group's committed tokens among the requests the step serves."""
    table = StepCostTable((1, 8, 16, 32, 64), (100.0, 80.0, 60.0, 35.0, 15.0),
                          (0.3, 0.5, 0.5, 0.6, 0.7))
    cost = CostModel(table, None, "cpu")
    cost.group = GroupLoad(others, committed)
    gen = torch.Generator().manual_seed(len(others))
    conf = (0.3 + 0.7 * torch.rand(6, 7, generator=gen)).tolist()
    surv = survival(conf)
    want = algorithm1(surv, GroupCost(table, others, cost.shared), 3, 2 + committed)
    got = cost.select(torch.tensor(surv), 3, other_requests=2)  # the host path on the CPU
    assert got.tolist() == want
    twin = select_prefixes(torch.tensor(surv), cost.sizes, cost.rates, 3, -1, 2 + committed,
                           cost._group())
    assert twin.tolist() == want
    alone = CostModel(table, None, "cpu").select(torch.tensor(surv), 3, other_requests=2)
    assert alone.tolist() == algorithm1(surv, table, 3, 2)


def test_the_online_table_of_observed_times_is_kept_to_compare():
    """``online_costs='times'``: each bucket's EWMA of the times seen there, as before."""
    profile = StepCostTable((1, 8, 64), (100.0, 1000 / 12, 50.0))
    online = OnlineCostTable(profile, alpha=0.5, keep_shape=False)
    online.observe(1, 0.016)
    online.observe(2, 0.016)  # nearest bucket: 1
    # bucket 1: 10 -> 13 -> 14.5 ms; 8 and 64 unobserved: 12 and 20, lifted to stay
    # non-decreasing (the table goes flat up to B=8)
    times = [1000 / online.table.sps(b) for b in (1, 8, 64)]
    assert times == pytest.approx([14.5, 14.5, 20.0])
    from dspark.workers.engine_config import EngineConfig

    with pytest.raises(ValueError, match="online_costs must be 'ratio' or 'times'"):
        EngineConfig(online_costs="median")
