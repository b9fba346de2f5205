"""The Markov sampling loop: Triton kernel (interpreted on CPU) equals its torch twin;
the twin samples from the distribution it reports."""

from __future__ import annotations

import os

import pytest
import torch

from dspark.kernels.markov_sample import markov_sample_torch, markov_sample_triton, sample_rows

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
needs_triton = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(), reason="needs TRITON_INTERPRET=1 or a GPU"
)


def case(seed, num_req=3, slots=4, vocab=37, rank=5):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        base=torch.randn(num_req, slots, vocab, generator=gen) * 2,
        anchors=torch.randint(0, vocab, (num_req,), generator=gen),
        w1=torch.randn(vocab, rank, generator=gen),
        w2=torch.randn(vocab, rank, generator=gen) * 0.5,
        temperatures=torch.tensor([0.0, 1.0, 0.7])[:num_req],
        uniforms=torch.rand(num_req, slots, generator=gen),
    )


def test_twin_bias_follows_the_sampled_token():
    c = case(0)
    tokens, probs = markov_sample_torch(**c)
    prev = torch.cat([c["anchors"][:, None], tokens[:, :-1]], 1)
    logits = c["base"] + (c["w1"][prev] @ c["w2"].T)
    assert torch.equal(tokens[0], logits[0].argmax(-1))  # greedy row
    torch.testing.assert_close(probs[1], torch.softmax(logits[1], -1))
    torch.testing.assert_close(probs[2], torch.softmax(logits[2] / 0.7, -1))


def test_an_all_greedy_batch_drafts_what_the_mixed_loop_drafts():
    """All rows greedy: the argmax-only loop (one-hot rows built once) returns what a
    batch with one sampled row returns for its greedy rows."""
    for seed in range(3):
        c = case(seed, num_req=3)
        greedy = {**c, "temperatures": torch.zeros(3)}
        tokens, probs = markov_sample_torch(**greedy)
        mixed = {**c, "temperatures": torch.tensor([0.0, 0.0, 1.0])}
        want_tokens, want_probs = markov_sample_torch(**mixed)
        assert torch.equal(tokens[:2], want_tokens[:2])
        assert torch.equal(probs[:2], want_probs[:2])
        assert torch.equal(probs, torch.zeros_like(probs).scatter_(-1, tokens[..., None], 1.0))


@needs_triton
@pytest.mark.parametrize("markov", [True, False])
def test_kernel_matches_twin(markov):
    for seed in range(3):
        c = case(seed)
        if not markov:
            c["w1"] = c["w2"] = None
        want_tokens, want_probs = markov_sample_torch(**c)
        moved = {k: v.to(DEVICE) if v is not None else None for k, v in c.items()}
        tokens, probs = markov_sample_triton(**moved, block_v=16)  # 3 vocabulary chunks
        assert torch.equal(tokens.cpu(), want_tokens)
        torch.testing.assert_close(probs.cpu(), want_probs, atol=1e-6, rtol=1e-5)


def test_sample_rows_draws_from_the_reported_distribution():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 6, generator=gen).expand(20000, 6)
    tokens, probs = sample_rows(logits, torch.ones(20000), torch.rand(20000, generator=gen))
    freq = torch.bincount(tokens, minlength=6).float() / 20000
    expected = probs[0]
    # chi-square with 5 degrees of freedom; 0.999 critical value 20.5
    chi2 = float((((freq - expected) ** 2) / expected).sum() * 20000)
    assert chi2 < 20.5
