"""Verification (``dspark.workers.sampling``): rejection sampling equals a single-request
oracle draw for draw; coupled sampling commits the target's Gumbel-max token whatever was
drafted, and that token is an exact sample of the target."""

from __future__ import annotations

import pytest
import torch

from dspark.models.generation import SamplingParams, gumbel_max, inverse_cdf, position_gumbel
from dspark.workers.sampling import (
    RequestSampling,
    UniformStream,
    _plain_softmax,
    draft_noise,
    target_probs,
    verify,
    verify_greedy,
    verify_host,
    verify_tensors,
)

SAMPLED = SamplingParams(temperature=1.0)
GREEDY = SamplingParams()


def oracle(drafts, q, p, gen, greedy):
    """Single-request speculative sampling, written out plainly: (accepted, next token)."""
    if greedy:
        target = p.argmax(-1).tolist()
        a = 0
        while a < len(drafts) and drafts[a] == target[a]:
            a += 1
        return a, target[a]
    uniforms = torch.rand(len(drafts), generator=gen).tolist()  # all ℓ_r, then the token's
    a = 0
    for k, d in enumerate(drafts):
        if not uniforms[k] < min(1.0, float(p[k, d]) / max(float(q[k, d]), 1e-8)):
            break
        a += 1
    dist = p[a] if a == len(drafts) else (p[a] - q[a]).clamp_min(0.0)
    if float(dist.sum()) <= 1e-8:
        dist = p[a]
    return a, int(inverse_cdf(dist[None], torch.rand(1, generator=gen))[0])


def random_batch(lens, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.randn(sum(lens), vocab, generator=gen) * 2, -1)
    p = torch.softmax(torch.randn(sum(lens) + len(lens), vocab, generator=gen) * 2, -1)
    flat = torch.multinomial(q, 1, generator=gen).squeeze(-1).tolist()
    drafts, start = [], 0
    for n in lens:
        drafts.append(flat[start : start + n])
        start += n
    return drafts, q, p


def test_rejection_sampling_equals_the_single_request_oracle_draw_for_draw():
    lens = [7, 0, 3, 5, 1]
    params = [SAMPLED, SAMPLED, GREEDY, SAMPLED, SAMPLED]
    for trial in range(30):
        drafts, q, p = random_batch(lens, 11, trial)
        samplers = [RequestSampling.create(pr, 100 * trial + r) for r, pr in enumerate(params)]
        out = verify(samplers, [0] * len(lens), p, drafts, q)
        qs = p_start = 0
        for r, n in enumerate(lens):
            gen = torch.Generator().manual_seed(100 * trial + r)
            a, tok = oracle(drafts[r], q[qs : qs + n], p[p_start : p_start + n + 1], gen,
                            params[r].temperature == 0)
            assert out.num_accepted[r] == a
            assert out.output_ids[r] == drafts[r][:a] + [tok]
            qs, p_start = qs + n, p_start + n + 1


def test_greedy_requests_accept_exactly_the_argmax_prefix():
    p = torch.eye(5)[[1, 2, 3, 4]]  # target argmax: 1, 2, 3, then bonus 4
    greedy = [RequestSampling.create(GREEDY, 0)]
    out = verify(greedy, [0], p, [[1, 2, 0]], torch.eye(5)[[1, 2, 0]])
    assert out.num_accepted == [2] and out.output_ids == [[1, 2, 3]]
    out = verify(greedy, [0], p, [[1, 2, 3]], torch.eye(5)[[1, 2, 3]])
    assert out.num_accepted == [3] and out.output_ids == [[1, 2, 3, 4]]


def test_all_greedy_steps_verify_without_distributions_as_verify_does():
    """``verify_greedy`` (a step of greedy requests only) commits what ``verify`` commits
    from the one-hot argmax distributions, drafts of every length, none included."""
    lens = [7, 0, 3, 5, 1]
    greedy = [RequestSampling.create(GREEDY, r) for r in range(len(lens))]
    for trial in range(30):
        drafts, q, p = random_batch(lens, 5, trial)  # NOTE: 5 tokens: drafts often match
        one_hot = torch.zeros_like(p).scatter_(-1, p.argmax(-1, keepdim=True), 1.0)
        expected = verify(greedy, [0] * len(lens), one_hot, drafts, q)
        out = verify_greedy(p.argmax(-1), drafts)
        assert (out.num_accepted, out.output_ids) == (expected.num_accepted,
                                                      expected.output_ids)
    out = verify_greedy(torch.tensor([1, 2, 3, 4]), [[1, 2, 0]])
    assert out.num_accepted == [2] and out.output_ids == [[1, 2, 3]]


def test_coupled_requests_commit_the_targets_gumbel_max_token_whatever_was_drafted():
    seeded = SamplingParams(temperature=1.0, seed=1234)
    sampler = RequestSampling.create(seeded, 0)
    assert sampler.coupled and sampler.stream is None
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(5, 13, generator=gen), -1)  # positions 40..44
    noise = position_gumbel(torch.full((5,), 1234), torch.arange(40, 45), 13)
    truth = gumbel_max(p, noise).tolist()
    for drafts in ([], truth[:4], [truth[0], (truth[1] + 1) % 13, 0, 0], [0, 1, 2, 3]):
        rows = p[: len(drafts) + 1]
        out = verify([sampler], [40], rows, [drafts], torch.full((len(drafts), 13), 1 / 13))
        a = out.num_accepted[0]
        assert drafts[:a] == truth[:a] and out.output_ids[0] == truth[: a + 1]
        assert a == len(drafts) or drafts[a] != truth[a]
    assert verify([sampler], [40], p, [truth[:4]], torch.full((4, 13), 1 / 13)).num_accepted == [4]


def test_position_noise_gives_exact_samples_and_differs_by_seed_and_position():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0])
    runs = 20000
    noise = position_gumbel(torch.arange(runs), torch.full((runs,), 7), 6)
    counts = torch.bincount(gumbel_max(probs.expand(runs, -1), noise), minlength=6).float()
    expected = probs * runs
    assert counts[5] == 0, "a zero-probability token is never drawn"
    chi2 = float(((counts[:5] - expected[:5]) ** 2 / expected[:5]).sum())
    assert chi2 < 18.5  # 4 degrees of freedom, p = 0.001
    # neighbouring positions of one seed are independent: joint frequencies factorise
    pos = position_gumbel(torch.zeros(runs, dtype=torch.long), torch.arange(runs), 6)
    first = gumbel_max(probs.expand(runs // 2, -1), pos[0::2])
    second = gumbel_max(probs.expand(runs // 2, -1), pos[1::2])
    both = float(((first == 0) & (second == 0)).float().mean())
    assert both == pytest.approx(0.25, abs=0.02)
    assert not torch.equal(position_gumbel(torch.tensor([1]), torch.tensor([3]), 6),
                           position_gumbel(torch.tensor([2]), torch.tensor([3]), 6))


def test_draft_noise_draws_in_the_documented_order():
    unseeded = RequestSampling.create(SAMPLED, 5)
    seeded = RequestSampling.create(SamplingParams(temperature=1.0, seed=9), 0)
    noise = draft_noise([unseeded, seeded, RequestSampling.create(GREEDY, 1)], [10, 20, 30],
                        block=4, vocab=7, device="cpu")
    assert torch.equal(noise.uniforms[0], torch.rand(4, generator=torch.Generator().manual_seed(5)))
    assert not noise.uniforms[1:].any()
    assert noise.coupled.tolist() == [False, True, False]
    want = position_gumbel(torch.full((4,), 9), torch.arange(20, 24), 7)
    assert torch.equal(noise.gumbel[1], want) and not noise.gumbel[[0, 2]].any()
    fewer = draft_noise([seeded], [20], block=4, vocab=7, device="cpu", slots=2)
    assert torch.equal(fewer.gumbel[0], want[:2])  # only the slots drafted this step


def test_a_uniform_stream_is_its_generators_draws_one_by_one_in_order():
    stream = UniformStream(torch.Generator().manual_seed(7))
    got = stream.take(5) + stream.take(1) + stream.take(70) + stream.take(3)
    gen = torch.Generator().manual_seed(7)
    want = [float(torch.rand((), generator=gen)) for _ in range(79)]
    assert got == want


@pytest.mark.parametrize("lens, params", [
    ([7, 0, 3, 5, 1, 2],
     [SAMPLED, SAMPLED, GREEDY, SAMPLED, GREEDY, SamplingParams(temperature=0.7)]),
    ([1, 1, 2, 1], [SAMPLED] * 4),  # NOTE: every request drafts (often all rejected)
])
def test_the_host_path_commits_what_the_tensor_path_commits(lens, params):
    """``verify_host`` (the CPU's, without coupled requests) against ``verify_tensors``:
    the same accepted drafts and tokens, and each rejection stream left at the same draw,
    over mixed batches of greedy and rejection requests with drafts of every length."""
    rows, seen = [i for i, n in enumerate(lens) for _ in range(n)], set()
    for trial in range(40):
        drafts, q, p = random_batch(lens, 7 if trial % 2 else 11, trial)
        if trial % 3 == 0:  # NOTE: drafts equal to the target's argmax: long prefixes
            q = torch.softmax(p[rows] * 4, -1)
        elif trial % 3 == 1:  # NOTE: drafts where the target is unlikely: rejections
            q = torch.softmax(-p[rows] * 8, -1)
            drafts = [d.tolist() for d in q.argmax(-1).split(lens)]
        runs = []
        for fn in (verify_host, verify_tensors):
            samplers = [RequestSampling.create(pr, 100 * trial + r)
                        for r, pr in enumerate(params)]
            args = (samplers, p, drafts, q) if fn is verify_host else (
                samplers, [0] * len(lens), p, drafts, q)
            out = fn(*args)
            after = [s.stream.take(1) if s.stream is not None else None for s in samplers]
            runs.append((out.num_accepted, out.output_ids, after))
        assert runs[0] == runs[1]
        rejected = sum(a < n for a, n, pr in zip(runs[0][0], lens, params) if pr is SAMPLED)
        seen.add(rejected == params.count(SAMPLED))  # NOTE: both of ``_next_tokens``' ways
    assert any(a > 0 for a in runs[0][0])
    assert False in seen
    assert (True in seen) == all(n for n, pr in zip(lens, params) if pr is SAMPLED)


def test_a_plain_softmax_step_draws_what_the_general_path_draws():
    # NOTE: a step without drafts whose requests all sample a plain softmax takes
    # ``_plain_softmax``; the general path (``target_probs``, then ``verify``) is the
    # reference, uniform for uniform, at mixed temperatures
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(12, 64, generator=gen) * 4
    temps = [1.0, 0.7, 1.3, 0.05] * 3

    def samplers():
        return [RequestSampling.create(SamplingParams(temperature=t), 10 + r)
                for r, t in enumerate(temps)]

    general, fast = samplers(), samplers()
    for _ in range(20):  # NOTE: the streams go on drawing, step after step
        want = verify(general, [0] * 12, target_probs(logits, general, [1] * 12), [[]] * 12,
                      logits.new_zeros(0, 64))
        got = _plain_softmax(fast, logits)
        assert got.output_ids == want.output_ids and got.num_accepted == [0] * 12
        logits = torch.randn(12, 64, generator=gen) * 4
