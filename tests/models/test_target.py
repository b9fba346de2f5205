import pytest
import torch

from dspark.models.dense_experts import dense_experts
from dspark.models.grouped_experts import grouped_experts
from dspark.models.target import SparseMoeBlock

VARIANTS = {
    "moe": {},
    "dense": {"num_experts": 0},
    "moe+shared+dense-layer": {"shared_expert_intermediate_size": 24, "mlp_only_layers": (1,)},
    "sparse-step-2": {"decoder_sparse_step": 2},
    "tied": {"tie_word_embeddings": True},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shapes_and_features(make_model, variant):
    model = make_model(**VARIANTS[variant])
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    out = model(ids, feature_layers=(-1, 0, 2))
    assert out.logits.shape == (2, 11, cfg.vocab_size)
    assert out.hidden_states.shape == (2, 11, cfg.hidden_size)
    assert out.layer_features.shape == (2, 11, 3 * cfg.hidden_size)
    # feature -1 is the embedding output; the final hidden is normalised (unit RMS * weight 1)
    emb = model.model.embed_tokens(ids)
    torch.testing.assert_close(out.layer_features[..., : cfg.hidden_size], emb)
    rms = out.hidden_states.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out.logits, model.lm_head(out.hidden_states))


def test_raw_residual_feature_is_layer_output_not_normed(make_model):
    model = make_model()
    ids = torch.randint(0, 97, (1, 9))
    feats = model(ids, feature_layers=(2,)).layer_features  # last layer, raw
    hidden = model(ids).hidden_states
    torch.testing.assert_close(model.model.norm(feats), hidden)
    assert not torch.allclose(feats, hidden)


@pytest.mark.parametrize("variant", VARIANTS)
def test_incremental_decoding_matches_full_recomputation(make_model, variant):
    model = make_model(**VARIANTS[variant])
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    full = model(ids).logits  # [2, 20, V]
    cache = model.new_kv_cache(batch_size=2)
    chunks = [ids[:, :7], ids[:, 7:8], ids[:, 8:13], ids[:, 13:14], ids[:, 14:]]
    pieces = [model(chunk, kv_cache=cache).logits for chunk in chunks]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-4)


def test_cache_truncate_rolls_back(make_model):
    model = make_model()
    ids = torch.randint(0, 97, (1, 12))
    cache = model.new_kv_cache()
    model(ids[:, :8], kv_cache=cache)
    model(torch.randint(0, 97, (1, 3)), kv_cache=cache)  # speculative tokens, rejected
    cache.truncate(8)
    out = model(ids[:, 8:], kv_cache=cache).logits
    torch.testing.assert_close(out, model(ids).logits[:, 8:], atol=1e-5, rtol=1e-4)


def test_moe_matches_naive_per_token_loop(make_model):
    model = make_model(shared_expert_intermediate_size=24)
    block = model.model.layers[0].mlp
    assert isinstance(block, SparseMoeBlock)
    x = torch.randn(13, model.config.hidden_size)
    routing = block.route(x)
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(13))
    expected = torch.zeros_like(x)
    probs = torch.softmax(block.gate(x), -1)
    for t in range(13):
        top = torch.topk(probs[t], 2)
        w = top.values / top.values.sum()
        for weight, e in zip(w, top.indices):
            expected[t] += weight * block.experts[int(e)](x[t])
        expected[t] += torch.sigmoid(block.shared_expert_gate(x[t])) * block.shared_expert(x[t])
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("norm", [True, False])
def test_dense_small_batch_experts_equal_the_sparse_path(make_model, norm):
    """Small inference batches on the CPU run every expert on every token
    (``dense_experts``); the same sums as running each token's routed experts, and the
    stacked weights follow a weight changed in place."""
    model = make_model(shared_expert_intermediate_size=24, norm_topk_prob=norm)
    block = model.model.layers[0].mlp
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for num in (1, 5, block.dense_max_tokens):
            x = torch.randn(num, model.config.hidden_size, generator=gen)
            routing = block.route(x)
            torch.testing.assert_close(dense_experts(block, x, routing),
                                       block.sparse_experts(x, routing), atol=1e-5, rtol=1e-4)
        block.experts[1].down_proj.weight.mul_(2.0)
        routing = block.route(x)
        torch.testing.assert_close(dense_experts(block, x, routing),
                                   block.sparse_experts(x, routing), atol=1e-5, rtol=1e-4)
        # NOTE: past dense_max_tokens the grouped path, and with gradients the sparse path
        big = torch.randn(block.dense_max_tokens + 1, model.config.hidden_size, generator=gen)
        assert torch.equal(block.combine_experts(big, block.route(big)),
                           grouped_experts(block, big, block.route(big)))
    assert torch.equal(block.combine_experts(x, routing), block.sparse_experts(x, routing))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_the_sparse_path(make_model, dtype):
    """The GPU's path (two grouped products over the expert-sorted slots) sums what running
    each token's routed experts sums, experts with no rows included; its stacked weights
    follow a weight changed in place, and ``expert_path`` chooses it on any device."""
    model = make_model(shared_expert_intermediate_size=24).to(dtype)
    block = model.model.layers[0].mlp
    gen = torch.Generator().manual_seed(1)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        for num in (0, 1, 2, 7, 64):
            x = torch.randn(num, model.config.hidden_size, generator=gen).to(dtype)
            routing = block.route(x)
            if num == 1:
                assert len(routing.expert_ids.unique()) < block.num_experts  # empty groups
            torch.testing.assert_close(grouped_experts(block, x, routing),
                                       block.sparse_experts(x, routing), **tol)
        block.experts[2].up_proj.weight.mul_(-1.5)
        routing = block.route(x)
        sparse = block.sparse_experts(x, routing)
        torch.testing.assert_close(grouped_experts(block, x, routing), sparse, **tol)
        block.expert_path = "sparse"
        try:
            assert torch.equal(block.combine_experts(x, routing), sparse)
        finally:
            del block.expert_path
        # CPU, 64 rows: grouped by default
        assert torch.equal(block.combine_experts(x, routing), grouped_experts(block, x, routing))


def test_unnormalised_topk_keeps_softmax_weights(make_model):
    model = make_model(norm_topk_prob=False)
    block = model.model.layers[0].mlp
    x = torch.randn(5, model.config.hidden_size)
    routing = block.route(x)
    assert torch.all(routing.weights.sum(-1) < 1.0)


def test_training_mode_reports_load_balancing_loss(make_model):
    model = make_model().train()
    out = model(torch.randint(0, 97, (2, 6)))
    assert out.aux_loss is not None and out.aux_loss.item() >= 1.0 - 1e-5  # minimum is 1


def test_sequence_past_context_is_rejected(make_model):
    model = make_model(max_position_embeddings=16)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"feature layer 5 outside \[-1, 2\]"):
        model(torch.zeros(1, 3, dtype=torch.long), feature_layers=(5,))


def test_logits_at_chosen_rows_are_those_rows_of_the_full_forward(make_model):
    model = make_model()
    ids = torch.randint(0, 97, (2, 9))
    rows = torch.tensor([0, 4, 8])
    out = model(ids, logit_rows=rows)
    assert out.logits.shape == (2, 3, 97)
    torch.testing.assert_close(out.logits, model(ids).logits[:, rows])


def test_a_given_attention_backend_needs_explicit_positions(make_model):
    from dspark.models.kv_cache import ContiguousAttention

    model = make_model()
    ids = torch.randint(0, 97, (1, 5))
    with pytest.raises(ValueError, match="explicit positions"):
        model(ids, attention=ContiguousAttention())
    out = model(ids, positions=torch.arange(5)[None], attention=ContiguousAttention())
    torch.testing.assert_close(out.logits, model(ids).logits)


@pytest.mark.parametrize("shape", [(1, 1, 192), (1, 8, 192), (3, 7, 576), (1, 64, 8, 48)])
def test_rms_normalize_in_float32_is_the_formula_bit_for_bit(shape):
    """The fused operator ``rms_normalize`` uses for float32 computes what the written-out
    formula computes, bit for bit, on contiguous rows and on slices of them (the drafter
    norms q and k as a slice of its qkv product)."""
    from dspark.models.target import rms_normalize

    gen = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1.0, 50.0):
        x = torch.randn(*shape[:-1], shape[-1] + 16, generator=gen)[..., : shape[-1]] * scale
        for rows in (x, x.contiguous()):
            formula = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + 1e-6)
            assert torch.equal(rms_normalize(rows, 1e-6), formula)
    half = torch.randn(*shape, generator=gen).bfloat16()
    want = (half.float() * torch.rsqrt(half.float().pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.equal(rms_normalize(half, 1e-6), want.bfloat16())
