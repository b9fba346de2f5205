"""Anchors, block targets and losses of the drafters (method digest §2.5, §5, §7.2).

Vocabulary:
- *valid anchor*: position p with ``loss_mask[p] == loss_mask[p + 1] == 1`` (the anchor and
  its first label are both inside a reply), p <= length - 2.
- *eval mask*: slot k of a block is supervised iff its label ``a + k + 1`` exists, lies in a
  reply and the block is kept; a cumulative product keeps only a contiguous prefix.
- *slot weight*: ``w_k = eval_mask_k * exp(-k / gamma)`` with gamma = 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class BlockTargets:
    labels: torch.Tensor  # [B, N, K] token at a + k + 1
    prev_ids: torch.Tensor  # [B, N, K] token at a + k (anchor for slot 0)
    target_index: torch.Tensor  # [B, N, K] position whose target distribution slot k matches
    eval_mask: torch.Tensor  # [B, N, K] bool, contiguous prefix per block


def sample_anchors(
    loss_mask: torch.Tensor,  # [B, S] bool
    lengths: torch.Tensor,  # [B]
    num_anchors: int,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``num_anchors`` valid anchors per row, uniformly without replacement, sorted.

    Returns anchors [B, N] and keep [B, N]; N is the largest count taken in the batch and
    unused slots are dummy blocks (anchor 0, keep False).
    """
    bsz, seq = loss_mask.shape
    pos = torch.arange(seq)
    valid = loss_mask.clone()
    valid[:, :-1] &= loss_mask[:, 1:]
    valid[:, -1] = False
    valid &= pos[None, :] <= (lengths[:, None] - 2)
    picks = []
    for row in range(bsz):
        cand = valid[row].nonzero().squeeze(-1)
        cand = cand[torch.randperm(cand.numel(), generator=gen)[:num_anchors]]
        picks.append(cand.sort().values)
    num = max(1, max(p.numel() for p in picks))
    anchors = torch.zeros(bsz, num, dtype=torch.long)
    keep = torch.zeros(bsz, num, dtype=torch.bool)
    for row, p in enumerate(picks):
        anchors[row, : p.numel()] = p
        keep[row, : p.numel()] = True
    return anchors, keep


def block_targets(
    input_ids: torch.Tensor,  # [B, S]
    loss_mask: torch.Tensor,  # [B, S] bool
    lengths: torch.Tensor,  # [B]
    anchors: torch.Tensor,  # [B, N]
    keep: torch.Tensor,  # [B, N]
    block: int,
) -> BlockTargets:
    """NOTE: slot k <-> label x[a + k + 1] <-> target distribution at a + k (off by one)."""
    bsz, seq = input_ids.shape
    label_idx = anchors[..., None] + 1 + torch.arange(block)  # [B, N, K]
    clamped = label_idx.clamp(max=seq - 1)
    flat = clamped.view(bsz, -1)
    labels = input_ids.gather(1, flat).view_as(label_idx)
    in_reply = loss_mask.gather(1, flat).view_as(label_idx)
    valid = (label_idx < lengths[:, None, None]) & in_reply & keep[..., None]
    eval_mask = valid.long().cumprod(-1).bool()
    anchor_ids = input_ids.gather(1, anchors)
    prev_ids = torch.cat([anchor_ids[..., None], labels[..., :-1]], -1)
    return BlockTargets(labels, prev_ids, clamped - 1, eval_mask)


def slot_weights(eval_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    block = eval_mask.shape[-1]
    decay = torch.exp(-torch.arange(block, dtype=torch.float32) / gamma)
    return eval_mask.float() * decay


def parallel_loss(
    logits: torch.Tensor,  # [B, N, K, V] Markov-corrected draft logits
    conf_logits: torch.Tensor | None,  # [B, N, K]
    target_logits: torch.Tensor,  # [B, N, K, V] aligned target logits
    targets: BlockTargets,
    alpha_ce: float,
    alpha_l1: float,
    alpha_conf: float,
    gamma: float = 4.0,
) -> tuple[torch.Tensor, dict]:
    """``alpha_ce * CE + alpha_l1 * L1 + alpha_conf * BCE``, each a w-weighted slot mean."""
    w = slot_weights(targets.eval_mask, gamma)  # [B, N, K]
    denom = w.sum().clamp_min(1e-6)
    ce = F.cross_entropy(logits.flatten(0, 2).float(), targets.labels.flatten(), reduction="none")
    ce = ce.view_as(w)
    p_d = torch.softmax(logits.float(), -1)
    p_t = torch.softmax(target_logits.float(), -1)
    l1 = (p_d - p_t).abs().sum(-1)  # [B, N, K], = 2 TV
    total = alpha_ce * (w * ce).sum() / denom
    if alpha_l1:
        total = total + alpha_l1 * (w * l1).sum() / denom
    bce_mean = torch.zeros(())
    if conf_logits is not None and alpha_conf:
        label = (1.0 - 0.5 * l1).clamp(0.0, 1.0).detach()
        bce = F.binary_cross_entropy_with_logits(conf_logits.float(), label, reduction="none")
        bce_mean = (w * bce).sum() / denom
        total = total + alpha_conf * bce_mean
    accept = (1.0 - 0.5 * l1.detach()) * targets.eval_mask  # teacher-forced 1 - TV
    counts = targets.eval_mask.sum((0, 1)).clamp_min(1)
    metrics = {
        "ce": float((w * ce).detach().sum() / denom),
        "l1": float((w * l1).detach().sum() / denom),
        "bce": float(bce_mean.detach()),
        "accept@k": (accept.sum((0, 1)) / counts).tolist(),
    }
    return total, metrics


def ttt_loss(
    step_logits: list[torch.Tensor],  # steps x [B, S, V]
    target_logits: torch.Tensor,  # [B, S, V] target distribution at every position
    loss_mask: torch.Tensor,  # [B, S] bool
    lengths: torch.Tensor,  # [B]
    step_decay: float,
) -> tuple[torch.Tensor, dict]:
    """EAGLE-3 / MTP-1: soft cross-entropy against the target, ``sum_s decay^s * loss_s``.

    Step s at position t predicts x[t + s + 2], whose target distribution is the target's at
    t + s + 1. A position counts iff x[t + s + 2] exists and lies in a reply. Each sequence's
    sum is divided by its length (every sequence weighs the same, as at batch size 1).
    """
    bsz, seq, _ = target_logits.shape
    pos = torch.arange(seq)
    total = torch.zeros(())
    metrics: dict = {"soft_ce@s": []}
    log_t = torch.log_softmax(target_logits.float(), -1)
    for s, logits in enumerate(step_logits):
        shift = s + 1
        p_t = F.pad(log_t[:, shift:], (0, 0, 0, shift)).exp()  # [B, S, V] target at t + s + 1
        label_pos = pos + s + 2
        in_range = label_pos[None, :] < lengths[:, None]
        mask_at_label = F.pad(loss_mask[:, s + 2 :], (0, s + 2), value=False)
        mask = in_range & mask_at_label  # [B, S]
        soft_ce = -(p_t * torch.log_softmax(logits.float(), -1)).sum(-1)  # [B, S]
        per_seq = (soft_ce * mask).sum(-1) / lengths.float()
        step_loss = per_seq.mean()
        total = total + (step_decay**s) * step_loss
        denom = mask.sum().clamp_min(1)
        metrics["soft_ce@s"].append(float((soft_ce.detach() * mask).sum() / denom))
    return total, metrics


def lr_at(step: int, total: int, lr: float, warmup_frac: float) -> float:
    """Linear warmup over ``warmup_frac`` of the steps, then cosine to 0."""
    warm = max(1, int(total * warmup_frac))
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
