"""Speculative decoding on the engine is lossless: greedy output equals plain decoding for
every drafter variant; at T=1 the committed tokens follow the target's exact distribution
under both sampling modes (rejection for unseeded requests, Gumbel coupling for seeded
ones), and a broken draft distribution is caught by the same test; a seeded request's text
is the same whatever the drafter, the budget and the load, and equals plain decoding."""

from __future__ import annotations

import itertools

import pytest
import torch

from dspark.models.generation import SamplingParams, generate_tokens
from dspark.workers import step as step_module
from dspark.workers.budget import GroupLoad, StepCostTable
from dspark.workers.drafting import DraftWorker
from dspark.workers.engine import Engine, EngineConfig
from dspark.workers.gate import DraftGate

COST = StepCostTable((1, 8, 64), (100.0, 90.0, 40.0), (0.3, 0.4, 0.5))
DRAFT_COST = StepCostTable((1, 8), (400.0, 300.0))
# 0.999 quantile of the chi-square distribution with 11 degrees of freedom
CHI2_11_999 = 31.26


def engine(target, drafter=None, on_round=None, group_load=None, **cfg):
    cfg.setdefault("block_size", 4)
    cfg.setdefault("num_blocks", 400)
    cfg.setdefault("max_num_seqs", 8)
    return Engine(target, drafter, EngineConfig(**cfg), COST, DRAFT_COST, on_round=on_round,
                  group_load=group_load)


def prompts(num, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (3 + (i * 7) % 50,), generator=gen).tolist()
            for i in range(num)]  # some prompts run into the 64-token context


@pytest.mark.parametrize("method, overrides", [
    ("dspark", {}), ("dspark", {"markov_type": "gated"}), ("dspark", {"markov_type": "rnn"}),
    ("dflash", {}), ("eagle3", {}), ("mtp", {}),
])
def test_greedy_equals_plain_decoding_on_20_prompts(make_drafter, make_model, method, overrides):
    target = make_model(seed=0)
    drafter = make_drafter(target, method, **overrides)
    params = SamplingParams(temperature=0.0, max_tokens=30)
    batch = prompts(20, target.config.vocab_size)
    rounds = []
    eng = engine(target, drafter, on_round=lambda req_id, r: rounds.append(r))
    got = eng.generate(batch, params, (7,))
    assert got == [list(generate_tokens(target, p, params, (7,))) for p in batch]
    assert rounds and all(0 <= r.accepted <= r.proposed for r in rounds)
    assert sum(r.committed for r in rounds) <= sum(len(g) for g in got)


def exact_marginal(target, ids, position):
    """Exact T=1 distribution of generated token ``position`` (0-based), tiny vocab."""
    vocab = target.config.vocab_size
    marg = torch.zeros(vocab, dtype=torch.float64)
    with torch.no_grad():
        for prefix in itertools.product(range(vocab), repeat=position):
            seq = torch.tensor([ids + list(prefix)])
            probs = torch.softmax(target(seq).logits[0, len(ids) - 1 :].double(), -1)
            p_prefix = torch.prod(probs[torch.arange(position), list(prefix)])
            marg += p_prefix * probs[position]
    return marg.float()


def chi_square(counts, probs):
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def third_token_counts(target, drafter, ids, runs, seeded):
    params = [SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True,
                             seed=s if seeded else None) for s in range(runs)]
    eng = engine(target, drafter, num_blocks=4000, max_num_seqs=128,
                 max_num_batched_tokens=2048)
    outs = eng.generate([ids] * runs, params)
    return torch.bincount(torch.tensor([o[2] for o in outs]),
                          minlength=target.config.vocab_size).float()


@pytest.mark.parametrize("seeded", [False, True], ids=["rejection", "coupled"])
def test_t1_distribution_is_exact_and_a_wrong_draft_distribution_is_caught(
        make_drafter, make_model, monkeypatch, seeded):
    """Third generated token (the 2nd draft slot of the first round) over 1,000 requests:
    chi-square against the exact target marginal over a 12-token vocabulary."""
    target = make_model(seed=6, vocab_size=12, max_position_embeddings=32)
    drafter = make_drafter(target, "dspark", seed=3, std=0.4, markov_rank=4, num_layers=1)
    with torch.no_grad():  # a strong Markov head: its drafts differ a lot from the target's
        drafter.markov.w1.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(0))
        drafter.markov.w2.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(1))
    ids = [5, 9, 6]
    exact = exact_marginal(target, ids, 2)
    good = chi_square(third_token_counts(target, drafter, ids, 1000, seeded), exact)
    assert good < CHI2_11_999, good
    if seeded:
        return  # coupling never reads the draft distribution: nothing to break
    real = DraftWorker.propose_step

    def uniform_probs(*args):  # claim every draft came from the uniform distribution
        proposal = real(*args)
        if proposal is None:
            return None
        flat = torch.full_like(proposal.probs, 1.0 / proposal.probs.shape[-1])
        return step_module.DraftProposal(proposal.seqs, proposal.caps, proposal.tokens, flat,
                                         proposal.conf_logits)

    monkeypatch.setattr(DraftWorker, "propose_step", uniform_probs)
    bad = chi_square(third_token_counts(target, drafter, ids, 1000, seeded), exact)
    assert bad > 2 * CHI2_11_999, bad  # p < 1e-12


SYSTEMS = [(None, "fixed"), ("dspark", "fixed"), ("dspark", "algorithm1"), ("dspark", "topk"),
           ("dspark", "threshold"), ("dspark", "cluster"), ("dflash", "fixed"),
           ("eagle3", "fixed"), ("mtp", "fixed")]


def test_a_seeded_request_has_one_text_whatever_the_drafter_budget_and_load(
        make_model, make_drafter):
    """The same seeded T=1 request, alone and inside a loaded batch of other (seeded and
    unseeded) requests, under every drafter and budget: one text, equal to plain decoding
    with that seed."""
    target = make_model(seed=4)
    mine = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=77, ignore_eos=True)
    prompt = [5, 6, 7, 8]
    want = list(generate_tokens(target, prompt, mine))
    load = prompts(12, target.config.vocab_size, seed=3)
    load_params = [SamplingParams(temperature=0.7, max_tokens=20,
                                  seed=i if i % 2 else None) for i in range(len(load))]
    drafters = {m: make_drafter(target, m) for m in ("dspark", "dflash", "eagle3", "mtp")}

    def group():  # the rest of a busy expert-parallel group
        return GroupLoad((50, 3), 12.0)

    for method, budget in SYSTEMS:
        drafter = drafters[method] if method else None
        alone = engine(target, drafter, budget=budget).generate([prompt], mine)[0]
        loaded = engine(target, drafter, budget=budget, group_load=group).generate(
            [*load[:6], prompt, *load[6:]], [*load_params[:6], mine, *load_params[6:]])[6]
        assert alone == want, (method, budget)
        assert loaded == want, (method, budget)


class CoinGate(DraftGate):
    """Drafts for each candidate on a seeded coin flip: whatever the gate picks, per request
    and per step, output must not change."""

    def __init__(self, gamma: int, chance: float = 0.5) -> None:
        super().__init__(gamma)
        self.coins, self.chance = torch.Generator().manual_seed(5), chance

    def choose(self, candidates, num_decoding, other_tokens, other_requests=0):
        return (torch.rand(len(candidates), generator=self.coins) < self.chance).tolist()


def greedy_and_seeded(target, num: int, seed: int):
    """``num`` prompts, every other one greedy and the others seeded at T=1, and plain
    decoding's tokens of each: (prompts, params, tokens)."""
    batch = prompts(num, target.config.vocab_size, seed=seed)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, max_tokens=24, seed=i)
              for i in range(len(batch))]
    return batch, params, [list(generate_tokens(target, p, sp)) for p, sp in zip(batch, params)]


def test_per_request_gating_changes_no_output(make_model, make_drafter):
    """Greedy and seeded T=1 requests decoded with a gate that drafts for a random subset
    of requests every step: exactly plain decoding's tokens; steps that draft for some
    requests and not others happened."""
    target = make_model(seed=2)
    drafter = make_drafter(target, "dspark")
    batch, params, want = greedy_and_seeded(target, 10, seed=8)
    eng = engine(target, drafter, budget="algorithm1")
    eng.gate = CoinGate(eng.gamma)
    mixed = []
    ids = [eng.add_request(p, sp) for p, sp in zip(batch, params)]
    got = {i: [] for i in ids}
    while eng.has_unfinished():
        result = eng.step()
        for out in result.outputs:
            got[out.req_id] += out.new_token_ids
        if result.stats is not None:
            mixed.append(0 < result.stats.num_drafts < result.stats.num_decode_requests)
    assert [got[i] for i in ids] == want
    assert sum(mixed) >= 5, mixed


def test_proposals_fitted_to_what_is_verified_change_no_output(make_model, make_drafter,
                                                               monkeypatch):
    """``draft_fit``: greedy and seeded T=1 requests commit plain decoding's tokens, and
    in the steps of 8 or more decoding requests the engine drafted fewer slots than γ more
    often than with whole proposals (the untrained drafter's drafts are rarely verified
    far, so the records ask for few)."""
    target = make_model(seed=2)
    drafter = make_drafter(target, "dspark")
    batch, params, want = greedy_and_seeded(target, 12, seed=9)
    real, slots = DraftWorker.propose, []

    def spy(self, *args, **kwargs):
        slots.append(args[4])  # drafts per request (``num_tokens``)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DraftWorker, "propose", spy)
    short = {}
    for fit in (True, False):
        slots.clear()
        eng = engine(target, drafter, budget="algorithm1", draft_fit=fit, max_num_seqs=12,
                     draft_gating=False)  # NOTE: everyone drafts every step
        assert eng.generate(batch, params) == want, fit
        short[fit] = sum(n < eng.gamma for n in slots)
    assert short[True] > short[False], short


def watch(real, seen):
    """``real``, also calling ``seen(*args, out)`` with its result."""
    def wrapper(*args):
        out = real(*args)
        seen(*args, out)
        return out
    return wrapper


def run_turns(eng, turns, params):
    """Each turn's prompts to the end, one turn after the other; the outputs per turn."""
    outs = []
    for batch in turns:
        ids = [eng.add_request(p, sp) for p, sp in zip(batch, params)]
        got = {i: [] for i in ids}
        while eng.has_unfinished():
            for out in eng.step().outputs:
                got[out.req_id] += out.new_token_ids
        outs.append([got[i] for i in ids])
    return outs


@pytest.mark.parametrize("method", ["dspark", "mtp"])
def test_deferred_drafter_rows_draft_what_eager_extension_drafts(make_model, make_drafter,
                                                                 method):
    """Drafter-cache rows deferred (every fed row's features stored at its slot, a
    request's unwritten context rows written when it drafts, a request that reuses cached
    blocks reading the rows written there or writing them) give every drafted round the
    same confidences and accepted counts as writing every committed row at once, over a
    second chat turn that reuses the first turn's blocks, with preemption and block reuse
    in a small cache; and they write fewer rows. MTP-1's deferred rows are its layer over
    the unwritten pairs, whose last output its drafts start from."""
    target = make_model(seed=2)
    drafter = make_drafter(target, method)
    gen = torch.Generator().manual_seed(9)
    first = [torch.randint(5, target.config.vocab_size, (3 + 3 * i,), generator=gen).tolist()
             for i in range(8)]
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, max_tokens=16, seed=i)
              for i in range(8)]
    runs = []
    for lazy in (False, True):
        rounds, written, shared, dists = [], [], [], []
        eng = engine(target, drafter, budget="fixed", num_blocks=40,  # NOTE: it preempts
                     on_round=lambda req_id, rec, rounds=rounds: rounds.append((req_id, rec)))
        eng.gate = CoinGate(eng.gamma, chance=0.2)
        worker = eng.draft_worker
        worker.lazy = lazy
        worker.extend = watch(worker.extend, lambda batch, _, seen=written: seen.append(
            batch.features.shape[0]))
        worker.share = watch(worker.share,
                             lambda _, blocks, out, seen=shared: seen.extend(blocks))
        worker.propose_step = watch(worker.propose_step, lambda *args, seen=dists: seen.append(
            args[-1].probs.float().flatten(0, 1)))
        outs = run_turns(eng, [first], params)
        second = [p + o + [7, 8, 9] for p, o in zip(first, outs[0])]
        # NOTE: latest conversations first: theirs are the blocks still cached in so small
        # a cache (the first turn's early blocks were reused for later requests)
        outs += run_turns(eng, [second[::-1]], params[::-1])
        runs.append((rounds, outs, sum(written), len(shared), torch.cat(dists)))
    (eager, eager_out, eager_rows, _, eager_q), (lazy, lazy_out, lazy_rows, num_shared,
                                                 lazy_q) = runs
    assert lazy_out == eager_out
    # NOTE: every draft was drawn from the same distribution
    torch.testing.assert_close(lazy_q, eager_q, rtol=1e-4, atol=1e-5)
    assert len(lazy) == len(eager) > 20
    for (ra, a), (rb, b) in zip(eager, lazy):
        assert ra == rb and (a.proposed, a.accepted) == (b.proposed, b.accepted)
        if method == "dspark":
            torch.testing.assert_close(torch.tensor(a.conf_logits),
                                       torch.tensor(b.conf_logits))
    assert num_shared > 0  # the second turn started on the first turn's cached blocks
    assert lazy_rows < eager_rows


def ranked(drafter, seed):
    """A drafter whose draft vocabulary ranking is a random order of the ids."""
    vocab = drafter.config.vocab_size
    drafter.token_ranking = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
    return drafter


@pytest.mark.parametrize("method", ["dspark", "dflash"])
def test_a_draft_vocabulary_leaves_greedy_output_unchanged(make_drafter, make_model, method):
    """Half the vocabulary may never be drafted; the output is plain decoding's."""
    target = make_model(seed=0)
    drafter = ranked(make_drafter(target, method), 1)
    params = SamplingParams(temperature=0.0, max_tokens=30)
    batch = prompts(20, target.config.vocab_size)
    rounds = []
    eng = engine(target, drafter, on_round=lambda req_id, r: rounds.append(r),
                 draft_vocab=target.config.vocab_size // 2)
    assert eng.draft_worker.vocab is not None
    got = eng.generate(batch, params, (7,))
    assert got == [list(generate_tokens(target, p, params, (7,))) for p in batch]
    assert rounds and any(r.accepted for r in rounds)


def test_t1_distribution_is_exact_with_half_the_vocabulary_draftable(make_drafter, make_model):
    """Rejection sampling against q restricted to 6 of 12 tokens (zero elsewhere) still
    commits the target's exact distribution."""
    target = make_model(seed=6, vocab_size=12, max_position_embeddings=32)
    drafter = ranked(make_drafter(target, "dspark", seed=3, std=0.4, markov_rank=4,
                                  num_layers=1), 2)
    ids = [5, 9, 6]
    exact = exact_marginal(target, ids, 2)
    params = [SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)] * 1000
    eng = engine(target, drafter, num_blocks=4000, max_num_seqs=128,
                 max_num_batched_tokens=2048, draft_vocab=6)
    outs = eng.generate([ids] * 1000, params)
    counts = torch.bincount(torch.tensor([o[2] for o in outs]), minlength=12).float()
    assert chi_square(counts, exact) < CHI2_11_999


class TurnGate(DraftGate):
    """Drafts on a seeded coin flip per candidate in every other decoding step, for nobody
    in the others (where the engine asks its light drafter's gate)."""

    def __init__(self, gamma: int) -> None:
        super().__init__(gamma)
        self.coin, self.turn = CoinGate(gamma), 0

    def declines(self, num_decoding, other_tokens, other_requests=0):
        self.turn += 1
        return self.turn % 2 == 0

    def choose(self, candidates, num_decoding, other_tokens, other_requests=0):
        return self.coin.choose(candidates, num_decoding, other_tokens, other_requests)


def test_a_light_drafter_beside_the_main_one_changes_no_output(make_model, make_drafter):
    """DSpark with MTP-1 as the light drafter, each drafting for random requests in turns
    (so each writes the rows the other's steps committed): greedy and seeded T=1 requests
    give exactly plain decoding's tokens, both drafters drafted, the light one one slot
    at a time, and unseeded T=1 requests finish."""
    target = make_model(seed=2)
    drafter, light = make_drafter(target, "dspark"), make_drafter(target, "mtp")
    batch = prompts(10, target.config.vocab_size, seed=8)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, max_tokens=24, seed=i)
              for i in range(len(batch))]
    want = [list(generate_tokens(target, p, sp)) for p, sp in zip(batch, params)]
    eng = Engine(target, drafter, EngineConfig(budget="algorithm1", block_size=4,
                                               num_blocks=400, max_num_seqs=8),
                 COST, DRAFT_COST, light_drafter=light, light_cost_table=DRAFT_COST)
    eng.gate = TurnGate(eng.gamma)
    eng.lanes[1].gate = CoinGate(1)
    proposed = {False: [], True: []}
    real = eng._propose

    def seen(*args):
        out = real(*args)
        if out[0] is not None:
            proposed[out[0].light].append(out[0].tokens.shape[1])
        return out

    eng._propose = seen
    assert eng.generate(batch, params) == want
    assert len(proposed[False]) >= 5 and len(proposed[True]) >= 5, proposed
    assert set(proposed[True]) == {1} and max(proposed[False]) > 1
    unseeded = eng.generate(batch, SamplingParams(temperature=1.0, max_tokens=12,
                                                  ignore_eos=True))
    assert [len(o) for o in unseeded] == [12] * len(batch)


def test_a_light_drafter_must_be_mtp_beside_another_drafter_under_the_gate(
        make_model, make_drafter):
    target = make_model(seed=2)
    dspark, mtp = make_drafter(target, "dspark"), make_drafter(target, "mtp")
    for main, light, cfg, field in (
            (dspark, dspark, {"budget": "algorithm1"}, "light_drafter must be an mtp"),
            (None, mtp, {"budget": "algorithm1"}, "needs a main drafter"),
            (mtp, mtp, {"budget": "fixed"}, "needs a main drafter"),
            (dspark, mtp, {"budget": "fixed"}, "needs the cost gate")):
        with pytest.raises(ValueError, match=field):
            Engine(target, main, EngineConfig(block_size=4, num_blocks=64, **cfg), COST,
                   DRAFT_COST, light_drafter=light)
