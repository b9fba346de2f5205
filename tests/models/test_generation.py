import pytest
import torch

from dspark.models.generation import (
    SamplingParams,
    draw_softmax,
    generate_tokens,
    inverse_cdf,
    sampling_probs,
    softmax_rows,
)


def _greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_with_kv_cache_equals_recomputation(make_model):
    model = make_model()
    prompt = [5, 17, 3, 88, 41]
    got = list(generate_tokens(model, prompt, SamplingParams(max_tokens=12)))
    assert got == _greedy_without_cache(model, prompt, 12)


def test_seeded_sampling_reproduces_and_seeds_differ(make_model):
    model = make_model()
    params = SamplingParams(temperature=1.0, max_tokens=16, seed=11)
    a = list(generate_tokens(model, [1, 2, 3], params))
    b = list(generate_tokens(model, [1, 2, 3], params))
    c = list(
        generate_tokens(model, [1, 2, 3], SamplingParams(temperature=1.0, max_tokens=16, seed=12))
    )
    assert a == b and a != c


def test_stops_at_stop_token_and_at_context_end(make_model):
    model = make_model(max_position_embeddings=16)
    first = list(generate_tokens(model, [1, 2], SamplingParams(max_tokens=5)))[0]
    stopped = list(generate_tokens(model, [1, 2], SamplingParams(max_tokens=5), stop_ids=[first]))
    assert stopped == [first]
    ignored = list(
        generate_tokens(
            model, [1, 2], SamplingParams(max_tokens=5, ignore_eos=True), stop_ids=[first]
        )
    )
    assert len(ignored) == 5
    full = list(generate_tokens(model, [1] * 10, SamplingParams(max_tokens=50)))
    assert len(full) == 6  # 10 prompt + 6 new fill the 16-token context


def test_tiny_temperature_behaves_like_greedy():
    logits = torch.tensor([40.0, 3.0, 1.0])
    torch.testing.assert_close(sampling_probs(logits, 1e-40, 1.0), torch.tensor([1.0, 0.0, 0.0]))


def test_draw_softmax_inverts_the_softmax_cdf_of_every_row():
    # NOTE: every token's interval of the normalised CDF, probed at its middle (away from
    # the rounding at its ends): the token drawn there is that token, so each is drawn
    # with exactly its softmax probability; masked tokens have no interval
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 32, generator=gen) * 3
    logits[2, 5:] = -float("inf")
    temperatures = [1.0, 0.5, 2.0, 1e-3]
    for row, temp in enumerate(temperatures):
        probs = sampling_probs(logits[row], temp, 1.0).double()
        cdf = probs.cumsum(0)
        lower = torch.cat([torch.zeros(1, dtype=cdf.dtype), cdf[:-1]])
        tokens = [k for k in range(32) if probs[k] > 1e-6]
        middles = ((lower + cdf) / 2)[tokens].float()
        rows = logits[row].expand(len(tokens), 32)
        drawn = draw_softmax(rows, [temp] * len(tokens), middles)
        assert drawn.tolist() == tokens, (row, temp)
    assert set(draw_softmax(logits[2:3].expand(100, 32), [1.0] * 100,
                            torch.rand(100, generator=gen)).tolist()) <= set(range(5))
    # NOTE: and the very arithmetic of ``sampling_probs``, row by row
    uniforms = torch.rand(4, generator=gen)
    each = torch.stack([sampling_probs(logits[r], t, 1.0) for r, t in enumerate(temperatures)])
    assert torch.equal(draw_softmax(logits, temperatures, uniforms),
                       inverse_cdf(each, uniforms))
    # NOTE: where every T is 1 the maximum is not subtracted first (softmax does it): the
    # same probabilities, bit for bit, far from zero and with masked tokens too
    wide = torch.randn(8, 4096, generator=gen) * 30 + torch.randn(8, 1, generator=gen) * 50
    wide[3, 100:] = -float("inf")
    assert torch.equal(softmax_rows(wide, [1.0] * 8), sampling_probs(wide, 1.0, 1.0))


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = sampling_probs(logits, 1.0, 0.8)
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(
        sampling_probs(logits, 1.0, 1.0), torch.tensor([0.5, 0.3, 0.15, 0.05])
    )
    assert sampling_probs(logits, 1.0, 0.01)[0] == 1.0


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"temperature": -0.5}, r"temperature must be in \[0, 100\], got -0.5"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"max_tokens": 2.5}, "max_tokens must be an integer"),
        ({"seed": 10**23}, r"seed must be in \[0, 2\*\*63\)"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        SamplingParams(**kwargs)


def test_bad_prompts_are_clear(make_model):
    model = make_model(max_position_embeddings=16)
    with pytest.raises(ValueError, match="prompt is empty"):
        list(generate_tokens(model, [], SamplingParams()))
    with pytest.raises(ValueError, match="prompt has 16 tokens but the model's context is 16"):
        list(generate_tokens(model, [1] * 16, SamplingParams()))
    with pytest.raises(ValueError, match=r"prompt token ids \[500\] outside \[0, 97\)"):
        list(generate_tokens(model, [1, 500], SamplingParams()))
