"""Speculative generation is lossless: greedy equality and distribution tests."""

from __future__ import annotations

import itertools

import pytest
import torch

from dspark.models.drafter_config import DrafterConfig
from dspark.models.generation import SamplingParams, generate_tokens
from dspark.models.parallel_drafter import Proposal, draft_probs
from dspark.models.speculative import rejection_sample, speculative_generate

MASK_ID = 4
# 0.999 quantile of the chi-square distribution with 11 degrees of freedom
CHI2_11_999 = 31.26


def prompts(num, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num):
        length = 3 + (i * 7) % 50  # some prompts run into the 64-token context
        out.append(torch.randint(5, vocab, (length,), generator=gen).tolist())
    return out


@pytest.mark.parametrize(
    "method, overrides",
    [
        ("dspark", {}),
        ("dspark", {"markov_type": "gated"}),
        ("dspark", {"markov_type": "rnn"}),
        ("dflash", {}),
        ("eagle3", {}),
        ("mtp", {}),
    ],
)
def test_greedy_equals_plain_decoding_on_20_prompts(make_drafter, make_model, method, overrides):
    target = make_model(seed=0)
    drafter = make_drafter(target, method, **overrides)
    stops = (7,)
    for ids in prompts(20, target.config.vocab_size):
        params = SamplingParams(temperature=0.0, max_tokens=30)
        plain = list(generate_tokens(target, ids, params, stops))
        rounds = []
        spec = list(speculative_generate(target, drafter, ids, params, stops, rounds.append))
        assert spec == plain
        assert sum(r.committed for r in rounds) + 1 >= len(spec)


class TargetAsDrafter:
    """A 'drafter' that samples from the target itself: every draft must be accepted."""

    def __init__(self, target, block=7):
        self.target, self.block = target, block
        self.config = DrafterConfig.for_target(target.config, "dflash", mask_token_id=MASK_ID)
        self.history: list[int] = []

    def new_session(self):
        return self

    def extend(self, features, next_tokens):
        self.history += next_tokens

    def propose(self, anchor, temperature, gen, max_tokens):
        ids = list(self.prompt) + self.history
        tokens, rows = [], []
        for _ in range(max_tokens):
            logits = self.target(torch.tensor([ids + tokens])).logits[0, -1]
            probs = draft_probs(logits, temperature)
            tokens.append(int(torch.multinomial(probs, 1, generator=gen)))
            rows.append(probs)
        return Proposal(tokens, torch.stack(rows))


def test_a_drafter_equal_to_the_target_is_accepted_in_full(make_model):
    target = make_model(seed=2)
    oracle = TargetAsDrafter(target)
    ids = prompts(1, target.config.vocab_size, seed=5)[0][:6]
    oracle.prompt = ids[:1]  # history starts with prompt[1:] + first token
    rounds = []
    params = SamplingParams(temperature=1.0, max_tokens=40, seed=0)
    out = list(speculative_generate(target, oracle, ids, params, (), rounds.append))
    assert len(out) == 40
    assert rounds and all(r.accepted == r.proposed for r in rounds)
    assert all(r.committed == r.proposed + 1 for r in rounds)
    assert rounds[0].committed == 8  # block 7 + bonus


def test_rejection_sampler_outputs_the_target_distribution():
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])  # target at positions 0 and 1
    q = torch.tensor([[0.1, 0.2, 0.7]])  # draft distribution at position 0
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    num = 20000
    for _ in range(num):
        draft = int(torch.multinomial(q[0], 1, generator=gen))
        accepted, token = rejection_sample([draft], q, p, gen, greedy=False)
        counts[draft if accepted else token] += 1
    torch.testing.assert_close(counts / num, p[0], atol=0.015, rtol=0)


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


def sampled_counts(target, drafter, ids, runs, position, report_base):
    """Histogram of generated token ``position`` over ``runs`` seeds."""
    counts = torch.zeros(target.config.vocab_size)
    make_session = type(drafter).new_session

    def session_with_flag(self):
        session = make_session(self)
        session.report_base_probs = report_base
        return session

    drafter.new_session = session_with_flag.__get__(drafter)
    try:
        for seed in range(runs):
            params = SamplingParams(temperature=1.0, max_tokens=position + 1, seed=seed)
            out = list(speculative_generate(target, drafter, ids, params))
            counts[out[position]] += 1
    finally:
        del drafter.new_session
    return counts


def chi_square(counts, probs):
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_t1_distribution_is_exact_and_fails_with_uncorrected_draft_probs(make_drafter, make_model):
    """Third generated token (the 2nd draft slot of the first round): chi-square against
    the exact target marginal over a 12-token vocabulary."""
    target = make_model(seed=6, vocab_size=12, max_position_embeddings=32)
    drafter = make_drafter(target, "dspark", seed=3, std=0.4, markov_rank=4, num_layers=1)
    with torch.no_grad():  # a strong Markov head: corrected and base logits differ a lot
        drafter.markov.w1.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(0))
        drafter.markov.w2.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(1))
    ids = [5, 9, 6]
    exact = exact_marginal(target, ids, 2)
    runs = 1000
    good = chi_square(sampled_counts(target, drafter, ids, runs, 2, False), exact)
    bad = chi_square(sampled_counts(target, drafter, ids, runs, 2, True), exact)
    print(f"chi-square corrected {good:.1f}, base {bad:.1f}")
    assert good < CHI2_11_999, good
    assert bad > 3 * CHI2_11_999, bad
