"""Drafters: configs, checkpoints bound to their target, and train/inference agreement."""

from __future__ import annotations

import drafter_oracle
import pytest
import torch

from dspark.models.draft_layers import ContextAttention
from dspark.models.drafter_checkpoint import load_drafter, save_drafter
from dspark.models.drafter_config import DrafterConfig, DrafterConfigError
from dspark.models.kv_cache import ContiguousAttention
from dspark.models.parallel_drafter import block_attention_mask

MASK_ID = 4


def test_default_configs_follow_the_method(make_model):
    target = make_model()
    dspark = DrafterConfig.for_target(target.config, "dspark")
    assert (dspark.markov_type, dspark.markov_rank, dspark.confidence_head) == ("vanilla", 64, True)
    dflash = DrafterConfig.for_target(target.config, "dflash")
    assert (dflash.markov_rank, dflash.confidence_head, dflash.block_size) == (0, False, 7)
    mtp = DrafterConfig.for_target(target.config, "mtp")
    assert (mtp.block_size, mtp.feature_layers, mtp.num_layers) == (1, (), 1)
    assert DrafterConfig.for_target(target.config, "eagle3").num_layers == 1
    # three target layers, never the last one
    assert dspark.feature_layers == (0, 1)  # the tiny target has 3 layers


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"method": "medusa"}, "method"),
        ({"markov_type": "lstm"}, "markov_type"),
        ({"markov_type": "vanilla", "markov_rank": 0}, "markov_rank"),
        ({"block_size": 0}, "block_size"),
        ({"mask_token_id": 10_000}, "mask_token_id"),
        ({"sts_temperatures": (1.0, -1.0)}, "sts_temperatures"),
    ],
)
def test_bad_drafter_configs_name_the_field(make_model, overrides, field):
    target = make_model()
    base = DrafterConfig.for_target(target.config, "dflash").to_dict()
    base.update(overrides)
    with pytest.raises(DrafterConfigError, match=field):
        DrafterConfig.from_dict(base)


def test_unknown_config_keys_are_refused(make_model):
    data = DrafterConfig.for_target(make_model().config, "dflash").to_dict()
    data["markov_order"] = 2
    with pytest.raises(DrafterConfigError, match="markov_order"):
        DrafterConfig.from_dict(data)


@pytest.mark.parametrize("method", ["dspark", "dflash", "eagle3", "mtp"])
def test_checkpoint_round_trip_and_target_binding(make_drafter, make_model, tmp_path, method):
    target = make_model(seed=0)
    drafter = make_drafter(target, method)
    save_drafter(drafter, tmp_path / method, dtype=torch.float32)
    loaded = load_drafter(tmp_path / method, target)
    for (name, a), (_, b) in zip(drafter.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    other = make_model(seed=0, hidden_size=48, head_dim=12)
    with pytest.raises(DrafterConfigError, match="trained against target"):
        load_drafter(tmp_path / method, other)


def test_frozen_embedding_and_head_are_not_stored(make_drafter, make_model, tmp_path):
    from safetensors.torch import load_file

    target = make_model()
    save_drafter(make_drafter(target, "dspark"), tmp_path / "d")
    names = set(load_file(str(tmp_path / "d" / "model.safetensors")))
    assert "lm_head.weight" not in names and "embed_tokens.weight" not in names
    assert "markov.w1.weight" in names and "confidence.proj.weight" in names


def test_block_attention_mask_is_anchor_bounded_and_block_local():
    anchors = torch.tensor([[2, 5]])
    keep = torch.tensor([[True, False]])
    mask = block_attention_mask(anchors, keep, ctx_len=6, block=3)[0, 0]  # [6, 6 + 6]
    ctx, blocks = mask[:, :6], mask[:, 6:]
    # block 0 (anchor 2): context 0 and 1 only, strictly before the anchor
    assert ctx[:3].tolist() == [[True, True, False, False, False, False]] * 3
    # block 1 is a dummy: no context at all
    assert not ctx[3:].any()
    # bidirectional inside a block, never across blocks
    expected = torch.block_diag(torch.ones(3, 3), torch.ones(3, 3)).bool()
    assert torch.equal(blocks, expected)


@pytest.mark.parametrize("markov", ["vanilla", "gated", "rnn"])
def test_training_forward_matches_inference_proposal(make_drafter, make_model, markov):
    """The packed training forward and the cached inference forward give the same slot
    hiddens, logits and confidences for the same anchor."""
    target = make_model(seed=3)
    drafter = make_drafter(target, "dspark", markov_type=markov, markov_rank=8)
    layers = drafter.config.feature_layers
    ids = torch.randint(5, 97, (1, 20), generator=torch.Generator().manual_seed(0))
    feats = target(ids, feature_layers=layers).layer_features  # [1, 20, F]
    anchors = torch.tensor([[6, 11]])
    h = drafter.train_hidden(ids, feats, anchors, torch.tensor([[True, True]]))
    for j, a in enumerate(anchors[0].tolist()):
        session = drafter_oracle.new_session(drafter)
        session.extend(feats[0, :a], ids[0, 1 : a + 1].tolist())
        block_ids = torch.full((1, 7), MASK_ID)
        block_ids[0, 0] = ids[0, a]
        pos = torch.arange(a, a + 7)[None]
        h_inf = drafter.run_blocks(block_ids, pos, ContextAttention(session.kv, None))[0]
        torch.testing.assert_close(h[0, j], h_inf, atol=1e-5, rtol=1e-5)
        prev = ids[0, a : a + 7]
        logits_train, conf_train = drafter.teacher_forced_heads(h[0, j], prev)
        tokens, logits_inf, _ = drafter_oracle.sample_block(drafter, h_inf, int(ids[0, a]), 0.0,
                                                            None)
        # greedy sampling feeds its own tokens; with teacher tokens equal to them, the
        # corrected logits must agree
        logits_teacher, _ = drafter.teacher_forced_heads(
            h_inf, torch.tensor([int(ids[0, a])] + tokens[:-1])
        )
        torch.testing.assert_close(logits_teacher, logits_inf, atol=1e-5, rtol=1e-5)
        assert logits_train.shape == (7, 97) and conf_train.shape == (7,)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_a_block_run_for_its_first_slots_gives_their_hiddens(make_drafter, make_model,
                                                             num_layers):
    """``run_blocks(..., rows=n)`` (the engine's proposal of n drafts): the first n slots'
    hiddens of the whole block, with every slot still a key of every layer."""
    target = make_model(seed=5)
    drafter = make_drafter(target, "dspark", num_layers=num_layers)
    ids = torch.randint(5, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    feats = target(ids, feature_layers=drafter.config.feature_layers).layer_features
    kv = drafter.context_kv(feats, torch.arange(16).expand(2, 16))
    block_ids = torch.full((2, 7), MASK_ID)
    block_ids[:, 0] = ids[:, -1]
    pos = torch.arange(16, 23).expand(2, 7)
    whole = drafter.run_blocks(block_ids, pos, ContextAttention(kv, None))
    for rows in (1, 3, 6):
        part = drafter.run_blocks(block_ids, pos, ContextAttention(kv, None), rows)
        assert part.shape == (2, rows, whole.shape[-1])
        torch.testing.assert_close(part, whole[:, :rows], atol=1e-5, rtol=1e-5)
    # the slots after the first ones are keys: a block cut to its first slots differs
    cut = drafter.run_blocks(block_ids[:, :3], pos[:, :3], ContextAttention(kv, None))
    assert not torch.allclose(cut, whole[:, :3], atol=1e-5)


def test_ttt_step_matches_inference_drafting(make_drafter, make_model):
    """EAGLE-3: TTT step s at position t equals drafting from pairs <= t with tokens
    x[t+2..t+s+1] fed back (ground-truth tokens, self-generated hiddens)."""
    target = make_model(seed=4)
    drafter = make_drafter(target, "eagle3")
    ids = torch.randint(5, 97, (1, 16), generator=torch.Generator().manual_seed(1))
    feats = target(ids, feature_layers=drafter.config.feature_layers).layer_features
    steps = drafter.ttt_logits(ids, feats, 4)  # 4 x [1, 16, V]
    t = 7
    session = drafter_oracle.new_session(drafter)
    session.extend(feats[0, : t + 1], ids[0, 1 : t + 2].tolist())
    h, attention = session.last_h, ContiguousAttention(session.cache)
    for s in range(4):
        torch.testing.assert_close(drafter.logits(h)[0, -1], steps[s][0, t], atol=1e-4, rtol=1e-4)
        token = ids[0, t + s + 2].view(1, 1)
        h = drafter.step(h, token, torch.tensor([[t + 1 + s]]), attention)
        session.cache.advance(1)


def test_a_draft_vocabulary_ranking_is_saved_with_the_drafter_and_checked(
        make_model, make_drafter, tmp_path):
    from dspark.models.checkpoint import CheckpointError
    from dspark.models.drafter_checkpoint import VOCAB_FILE, write_token_ranking

    target = make_model()
    drafter = make_drafter(target, "dspark")
    save_drafter(drafter, tmp_path)
    assert load_drafter(tmp_path, target).token_ranking is None
    vocab = drafter.config.vocab_size
    counts = torch.zeros(vocab, dtype=torch.long)
    counts[[9, 3, 5]] = torch.tensor([2, 7, 7])
    written = write_token_ranking(tmp_path, counts, "test counts")
    assert written["ranked_ids"][:4] == [3, 5, 9, 0] and written["num_tokens"] == 16
    assert load_drafter(tmp_path, target).token_ranking[:4].tolist() == [3, 5, 9, 0]
    (tmp_path / VOCAB_FILE).write_text('{"ranked_ids": [0, 0, 1]}')
    with pytest.raises(CheckpointError, match="draft_vocab.json: ranked_ids must order"):
        load_drafter(tmp_path, target)


def test_reply_tokens_are_counted_and_their_coverage_reported():
    from dspark.training.draft_vocab import coverage, reply_token_counts
    from dspark.training.feature_cache import FeatureCache

    ids = torch.tensor([1, 2, 2, 3, 3, 3, 0])
    mask = torch.tensor([0, 1, 1, 1, 1, 1, 0], dtype=torch.uint8)  # the prompt is not counted
    cache = FeatureCache(ids, mask, torch.zeros(7, 2), torch.zeros(7, 2),
                         torch.tensor([0, 7]), {})
    counts = reply_token_counts(cache, 5)
    assert counts.tolist() == [0, 0, 2, 3, 0]
    assert coverage(counts, (1, 2, 9)) == {1: 0.6, 2: 1.0, 9: 1.0}
