"""DSpark and DFlash: a parallel draft backbone fed with fused target features.

Vocabulary:
- *anchor*: the last token the target produced, not yet run through the target; it sits in
  slot 0 of the block at its own position ``a``. Slots 1..γ-1 hold ``<mask>``.
- *slot k* predicts the token at ``a + k + 1``; its target distribution is the target's
  next-token distribution at ``a + k``, and its "previous token" (Markov and confidence
  heads) is ``x[a + k]`` (the anchor for slot 0).
- *context*: fused target features of positions strictly before the anchor; they supply
  keys and values to every draft layer and are never queries.

DSpark adds the Markov head (sequential correction, sampled left to right) and the
confidence head; DFlash samples every slot independently from the backbone logits.
"""

from __future__ import annotations

import torch
from torch import nn

from dspark.models.draft_layers import (
    ConfidenceHead,
    ContextAttention,
    DrafterBase,
    DraftLayer,
    MarkovHead,
)
from dspark.models.drafter_config import DrafterConfig
from dspark.models.kv_cache import AttentionBackend
from dspark.models.linear import linear
from dspark.models.stacked import stacked_weight
from dspark.models.target import RMSNorm, RotaryEmbedding, apply_rope, rms_normalize


def block_attention_mask(
    anchors: torch.Tensor, keep: torch.Tensor, ctx_len: int, block: int
) -> torch.Tensor:
    """Anchor-bounded packing mask ``[B, 1, N*K, S + N*K]`` (True = visible).

    A query of block j sees context key i iff ``i < anchors[j]`` and the block is kept, and
    every slot of its own block (bidirectional); never another block. Dummy blocks see only
    themselves, so no row is empty.
    """
    bsz, num = anchors.shape  # anchors: [B, N]
    ctx_pos = torch.arange(ctx_len, device=anchors.device)
    ctx_vis = (ctx_pos[None, None, :] < anchors[..., None]) & keep[..., None]  # [B, N, S]
    ctx_vis = ctx_vis[:, :, None, :].expand(bsz, num, block, ctx_len)
    blk = torch.arange(num, device=anchors.device).repeat_interleave(block)  # [N*K]
    same = (blk[:, None] == blk[None, :]).expand(bsz, -1, -1)  # [B, N*K, N*K]
    mask = torch.cat([ctx_vis.reshape(bsz, num * block, ctx_len), same], dim=-1)
    return mask[:, None]


class ParallelDrafter(DrafterBase):
    """DSpark (Markov + confidence heads) or DFlash (neither) over a shared backbone."""

    def __init__(self, cfg: DrafterConfig, embed_weight: torch.Tensor, head_weight: torch.Tensor):
        if not cfg.is_parallel:
            raise ValueError(f"ParallelDrafter serves dspark/dflash, not {cfg.method}")
        super().__init__(cfg, embed_weight, head_weight)
        d = cfg.hidden_size
        self.hidden_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DraftLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.markov = (
            MarkovHead(cfg.markov_type, cfg.vocab_size, cfg.markov_rank, d)
            if cfg.markov_rank > 0
            else None
        )
        self.confidence = ConfidenceHead(d, cfg.markov_rank) if cfg.confidence_head else None

    # -- backbone -------------------------------------------------------------------------

    def context_kv(
        self, features: torch.Tensor, positions: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fuse features [B, S, F] (paper Eq. 2) and project them per layer at ``positions``:
        each layer's (k, v), [B, kv, S, hd] each."""
        k, v = self.context_kv_stacked(features, positions)
        return list(zip(k.unbind(0), v.unbind(0)))

    def context_kv_stacked(
        self, features: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``context_kv`` with the layers stacked: k, v [L, B, kv, S, hd]. Every layer's
        keys and values come from one product, normed and rotated as its block's are."""
        fused = self.hidden_norm(self.fc(features.float()))  # [B, S, d]
        cos, sin = self.rotary_emb(positions)
        attns = [layer.self_attn for layer in self.layers]
        kv_heads, hd, num = attns[0].num_kv_heads, attns[0].head_dim, len(attns)
        bsz, seq, _ = fused.shape
        both = linear(fused, stacked_weight(
            self, "context_kv", [w for a in attns for w in (a.k_proj.weight, a.v_proj.weight)]))
        both = both.view(bsz, seq, num, 2, kv_heads, hd)
        norms = stacked_weight(self, "context_k_norm", [a.k_norm.weight for a in attns])
        k = norms.view(num, 1, hd) * rms_normalize(both[:, :, :, 0], attns[0].k_norm.eps)
        k = apply_rope(k.reshape(bsz, seq, num * kv_heads, hd).transpose(1, 2), cos, sin)
        k = k.view(bsz, num, kv_heads, seq, hd).transpose(0, 1)  # [L, B, kv, S, hd]
        return k, both[:, :, :, 1].permute(2, 0, 3, 1, 4)

    def draft_blocks(
        self, anchors: torch.Tensor, anchor_pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block per row: anchors [R] at positions anchor_pos [R] -> block ids [R, K]
        (anchor, then ``<mask>``) and their positions [R, K]."""
        cfg = self.config
        block = cfg.block_size
        block_ids = torch.full((anchors.shape[0], block), cfg.mask_token_id, device=anchors.device)
        block_ids[:, 0] = anchors
        block_pos = anchor_pos[:, None] + torch.arange(block, device=anchors.device)
        return block_ids, block_pos

    def run_blocks(
        self,
        block_ids: torch.Tensor,  # [B, Q]
        block_pos: torch.Tensor,  # [B, Q]
        context: AttentionBackend,
        rows: int | None = None,
    ) -> torch.Tensor:  # [B, Q, d], or [B, rows, d]
        """The draft backbone over the blocks (the one layer loop of training, sessions and
        the serving engine); ``context`` supplies each layer's context K/V and the mask:
        ``ContextAttention`` over tensors, or the engine's paged drafter cache.

        ``rows`` (one block per batch row): the hidden of the block's first ``rows`` slots
        only. The same values as the whole block's first ``rows``: every layer but the last
        runs every slot (their keys and values feed the next layer), and the last one
        computes its queries, its attention output and its MLP for those slots alone."""
        x = self.embed_tokens(block_ids)
        cos, sin = self.rotary_emb(block_pos)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, context, rows if i == last else None)
        return self.norm(x)

    def train_hidden(
        self,
        input_ids: torch.Tensor,  # [B, S]
        features: torch.Tensor,  # [B, S, F]
        anchors: torch.Tensor,  # [B, N] anchor positions (ascending)
        keep: torch.Tensor,  # [B, N] bool, False for dummy blocks
    ) -> torch.Tensor:
        """Backbone hidden of every slot of every block: [B, N, K, d]."""
        cfg = self.config
        bsz, seq = input_ids.shape
        num, block = anchors.shape[1], cfg.block_size
        positions = torch.arange(seq, device=input_ids.device).expand(bsz, seq)
        ctx_kvs = self.context_kv(features, positions)
        block_ids = torch.full((bsz, num, block), cfg.mask_token_id, device=input_ids.device)
        anchor_ids = input_ids.gather(1, anchors)
        block_ids[:, :, 0] = torch.where(keep, anchor_ids, cfg.mask_token_id)
        offsets = torch.arange(block, device=input_ids.device)
        block_pos = (anchors[..., None] + offsets).reshape(bsz, num * block)
        mask = block_attention_mask(anchors, keep, seq, block)
        context = ContextAttention(ctx_kvs, mask)
        h = self.run_blocks(block_ids.reshape(bsz, -1), block_pos, context)
        return h.view(bsz, num, block, -1)

    # -- heads ----------------------------------------------------------------------------

    def teacher_forced_heads(
        self, h: torch.Tensor, prev_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h: [..., K, d], prev_ids: [..., K] (anchor, labels[:-1]) -> logits [..., K, V], conf."""
        logits = self.lm_head(h)
        if self.markov is not None:
            logits = logits + self.markov.block_bias(prev_ids, h)
        conf = None
        if self.confidence is not None:
            prev_embed = self.markov.w1(prev_ids) if self.markov is not None else None
            conf = self.confidence(h, prev_embed)
        return logits, conf
