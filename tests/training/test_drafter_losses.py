"""Alignment of draft slots with labels and target distributions, anchors, loss weights."""

from __future__ import annotations

import math

import torch

from dspark.training.drafter_losses import (
    block_targets,
    lr_at,
    parallel_loss,
    sample_anchors,
    slot_weights,
    ttt_loss,
)


def test_slot_k_aligns_with_label_a_plus_k_plus_1_and_target_at_a_plus_k():
    ids = torch.arange(100, 112)[None]  # token at position p is 100 + p
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[0, :3] = False  # prompt
    anchors, keep = torch.tensor([[4]]), torch.tensor([[True]])
    t = block_targets(ids, mask, torch.tensor([12]), anchors, keep, block=7)
    assert t.labels[0, 0].tolist() == [105, 106, 107, 108, 109, 110, 111]
    assert t.prev_ids[0, 0].tolist() == [104, 105, 106, 107, 108, 109, 110]
    assert t.target_index[0, 0].tolist() == [4, 5, 6, 7, 8, 9, 10]
    assert t.eval_mask[0, 0].all()


def test_eval_mask_is_a_contiguous_prefix_ending_at_the_sequence_or_reply():
    ids = torch.arange(10)[None]
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 7] = False  # a hole inside the reply switches off the rest of the block
    t = block_targets(
        ids, mask, torch.tensor([9]), torch.tensor([[4, 2]]), torch.tensor([[True, False]]), block=4
    )
    assert t.eval_mask[0, 0].tolist() == [True, True, False, False]
    assert not t.eval_mask[0, 1].any()  # dummy block
    t = block_targets(
        ids,
        torch.ones(1, 10, dtype=torch.bool),
        torch.tensor([8]),
        torch.tensor([[5]]),
        torch.tensor([[True]]),
        block=4,
    )
    assert t.eval_mask[0, 0].tolist() == [True, True, False, False]  # labels 6, 7 < length 8


def test_anchors_are_valid_sorted_and_capped():
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, 5:15] = True
    mask[1, 10:12] = True
    lengths = torch.tensor([15, 20])
    anchors, keep = sample_anchors(mask, lengths, 4, torch.Generator().manual_seed(0))
    row0 = anchors[0][keep[0]].tolist()
    assert len(row0) == 4 and row0 == sorted(row0)
    assert all(5 <= a <= 13 for a in row0)  # anchor and next token in the reply, a <= len - 2
    assert anchors[1][keep[1]].tolist() == [10]
    everything, _ = sample_anchors(mask, lengths, 100, torch.Generator().manual_seed(0))
    assert sorted(everything[0].tolist()) == list(range(5, 14))


def test_slot_weights_decay_with_gamma_4():
    w = slot_weights(torch.ones(1, 1, 7, dtype=torch.bool), 4.0)[0, 0]
    expected = [1.0, 0.779, 0.607, 0.472, 0.368, 0.287, 0.223]
    assert [round(x, 3) for x in w.tolist()] == expected


def test_l1_loss_is_zero_when_draft_equals_target_and_confidence_label_is_one():
    logits = torch.randn(1, 2, 3, 11)
    t = block_targets(
        torch.arange(12)[None],
        torch.ones(1, 12, dtype=torch.bool),
        torch.tensor([12]),
        torch.tensor([[1, 5]]),
        torch.tensor([[True, True]]),
        block=3,
    )
    conf = torch.full((1, 2, 3), 20.0)  # confident: sigmoid ~ 1
    total, metrics = parallel_loss(logits, conf, logits.clone(), t, 0.0, 1.0, 1.0)
    assert metrics["l1"] < 1e-6
    assert metrics["bce"] < 1e-6
    assert all(abs(a - 1.0) < 1e-6 for a in metrics["accept@k"])
    other = torch.randn(1, 2, 3, 11)
    _, m2 = parallel_loss(logits, conf, other, t, 0.0, 1.0, 1.0)
    assert m2["l1"] > 0.1 and m2["bce"] > 0.1


def test_ttt_step_s_is_scored_against_the_target_at_t_plus_s_plus_1():
    """A drafter whose step-s logits equal the target's logits shifted by s + 1 has the
    minimum loss (the target's entropy); the unshifted copy scores worse."""
    torch.manual_seed(0)
    seq, vocab = 10, 13
    target_logits = torch.randn(1, seq, vocab) * 3
    mask = torch.ones(1, seq, dtype=torch.bool)
    lengths = torch.tensor([seq])
    shifted = [
        torch.nn.functional.pad(target_logits[:, s + 1 :], (0, 0, 0, s + 1)) for s in range(3)
    ]
    best, _ = ttt_loss(shifted, target_logits, mask, lengths, 0.8)
    worse, _ = ttt_loss([target_logits] * 3, target_logits, mask, lengths, 0.8)
    assert float(best) < float(worse)


def test_lr_warms_up_then_decays_to_zero():
    assert lr_at(0, 100, 1.0, 0.04) == 0.25
    assert lr_at(3, 100, 1.0, 0.04) == 1.0
    assert math.isclose(lr_at(100, 100, 1.0, 0.04), 0.0, abs_tol=1e-12)
