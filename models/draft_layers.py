"""Building blocks shared by the drafters: attention with injected context K/V (and its
tensor-held backend), draft decoder layers, the Markov heads and the confidence head.

Vocabulary:
- *context K/V*: keys and values projected from the fused target features of positions
  before the anchor; context tokens are never queries.
- *block*: the draft slots of one round (anchor + ``<mask>`` slots), the queries.
- *Markov bias*: a low-rank first-order correction ``W2(W1[x_{k-1}])`` added to slot k's
  logits so that parallel drafts agree with the token sampled just before them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dspark.models.drafter_config import DrafterConfig
from dspark.models.kv_cache import AttentionBackend
from dspark.models.linear import Linear, linear
from dspark.models.stacked import stacked_weight
from dspark.models.target import RMSNorm, SwiGLU, apply_rope, rms_normalize


class ContextAttention:
    """The attention backend of parallel drafting from context K/V held as tensors (the
    training batch, a single-request session): keys/values are ``[context ; block]`` and
    ``mask`` alone decides visibility (no causal flag); block K/V are never stored."""

    def __init__(
        self,
        ctx_kvs: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,  # per layer [B, kv, S, hd]
        mask: torch.Tensor | None,  # [B or 1, 1, Q, S + Q] bool, True = visible
    ) -> None:
        self.ctx_kvs, self.mask = ctx_kvs, mask

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # q: [B, H, Q, hd]; k, v: [B, kv, Q, hd] of the block -> [B, H, Q, hd]
        if self.ctx_kvs is not None:
            ctx_k, ctx_v = self.ctx_kvs[layer_idx]
            k = torch.cat([ctx_k, k], dim=2)  # [B, kv, S + Q, hd]
            v = torch.cat([ctx_v, v], dim=2)
        mask = self.mask if self.mask is None else self.mask[:, :, : q.shape[2]]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class InjectedAttention(nn.Module):
    """GQA + QK-norm attention of the draft tokens, over keys/values its backend supplies.

    The same W_k / W_v project the fused context and the block (paper Eq. 3); only draft
    tokens are queries. EAGLE-3 / MTP-1 use it with ``in_dim = 2d`` (token ; hidden).
    """

    def __init__(self, cfg: DrafterConfig, in_dim: int | None = None, layer_idx: int = 0) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        in_dim = in_dim or d
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
        )
        self.q_proj = Linear(in_dim, self.num_heads * hd, bias=False)
        self.k_proj = Linear(in_dim, self.num_kv_heads * hd, bias=False)
        self.v_proj = Linear(in_dim, self.num_kv_heads * hd, bias=False)
        self.o_proj = Linear(self.num_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # [B, Q, in] draft-token inputs (already normed)
        cos: torch.Tensor,  # [B, 1, Q, head_dim] their positions
        sin: torch.Tensor,
        attention: AttentionBackend,
        rows: int | torch.Tensor | None = None,
    ) -> torch.Tensor:  # [B, Q, d], or [B, rows, d]
        """``rows``: only the first ``rows`` tokens of each batch row are queries, or
        (a tensor) only the tokens at those indices (every token still gives its key and
        value); the output has those rows only."""
        bsz, num_q, _ = x.shape
        heads, kv_heads, hd = self.num_heads, self.num_kv_heads, self.head_dim
        # NOTE: one product for q, k and v; q and k normed (each head by its own norm's
        # weight) and rotated together, in fewer operators than one by one
        qkv = linear(x, stacked_weight(self, "qkv", (
            self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)))
        qkv = qkv.view(bsz, num_q, heads + 2 * kv_heads, hd)
        norms = stacked_weight(self, "qk_norm", (self.q_norm.weight.expand(heads, hd),
                                                 self.k_norm.weight.expand(kv_heads, hd)))
        qk = norms * rms_normalize(qkv[:, :, : heads + kv_heads], self.q_norm.eps)
        qk = apply_rope(qk.transpose(1, 2), cos, sin)  # [B, H + kv, Q, hd]
        v = qkv[:, :, heads + kv_heads :].transpose(1, 2)  # [B, kv, Q, hd]
        q = (qk[:, :heads] if rows is None else qk[:, :heads, :rows]
             if not isinstance(rows, torch.Tensor) else qk[:, :heads].index_select(2, rows))
        out = attention.attend(self.layer_idx, q, qk[:, heads:], v)  # [B, H, Q or rows, hd]
        return self.o_proj(out.transpose(1, 2).reshape(bsz, q.shape[2], -1))


class DraftLayer(nn.Module):
    """Pre-norm block ``x + Attn(norm(x), ctx)``, then ``x + MLP(norm(x))`` (dense SwiGLU)."""

    def __init__(self, cfg: DrafterConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = InjectedAttention(cfg, layer_idx=layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, attention: AttentionBackend, rows: int | None = None):
        """``rows``: the output of the first ``rows`` tokens of each batch row only (the
        others are keys and values; ``InjectedAttention``)."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, attention, rows)
        x = (x if rows is None else x[:, :rows]) + h
        return x + self.mlp(self.post_attention_layernorm(x))


class MarkovHead(nn.Module):
    """Sequential correction of parallel draft logits (vanilla, gated or RNN).

    ``logits_k = U_k + bias_k``; the bias depends on the token before slot k (the anchor for
    slot 0) and, for gated/RNN heads, on the backbone hidden ``h_k``.
    """

    def __init__(self, kind: str, vocab: int, rank: int, hidden: int) -> None:
        super().__init__()
        self.kind, self.rank = kind, rank
        self.w1 = nn.Embedding(vocab, rank)
        self.w2 = Linear(rank, vocab, bias=False)
        if kind == "gated":
            self.gate_proj = Linear(hidden + rank, rank)
        if kind == "rnn":
            self.joint = Linear(2 * rank + hidden, 3 * rank)

    def init_state(self, batch: int, like: torch.Tensor) -> torch.Tensor | None:
        return like.new_zeros(batch, self.rank) if self.kind == "rnn" else None

    def step(
        self, prev_ids: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """prev_ids: [B], h: [B, d], state: [B, r] -> bias [B, V], next state."""
        e = self.w1(prev_ids)  # [B, r]
        if self.kind == "vanilla":
            return self.w2(e), state
        if self.kind == "gated":
            gate = torch.sigmoid(self.gate_proj(torch.cat([h, e], -1)))
            return self.w2(gate * e), state
        gate, cand, out = self.joint(torch.cat([state, e, h], -1)).chunk(3, -1)
        gate = torch.sigmoid(gate)
        state = gate * state + (1 - gate) * torch.tanh(cand)
        return self.w2(torch.tanh(out)), state

    def block_bias(self, prev_ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Teacher-forced bias of whole blocks: prev_ids [..., K], h [..., K, d] -> [..., K, V]."""
        if self.kind != "rnn":
            lead = prev_ids.shape
            bias, _ = self.step(prev_ids.reshape(-1), h.reshape(-1, h.shape[-1]), None)
            return bias.view(*lead, -1)
        flat_ids = prev_ids.reshape(-1, prev_ids.shape[-1])  # [N, K]
        flat_h = h.reshape(-1, *h.shape[-2:])  # [N, K, d]
        state = self.init_state(flat_ids.shape[0], flat_h)
        out = []
        for k in range(flat_ids.shape[1]):
            bias, state = self.step(flat_ids[:, k], flat_h[:, k], state)
            out.append(bias)
        return torch.stack(out, 1).view(*prev_ids.shape, -1)


class ConfidenceHead(nn.Module):
    """``c_k = w·[h_k ; W1[x_{k-1}]] + b``: logit of P(draft k accepted | 1..k-1 accepted)."""

    def __init__(self, hidden: int, rank: int) -> None:
        super().__init__()
        self.proj = Linear(hidden + rank, 1)

    def forward(self, h: torch.Tensor, prev_embed: torch.Tensor | None) -> torch.Tensor:
        # h: [..., d], prev_embed: [..., r] -> [...]
        x = h if prev_embed is None else torch.cat([h, prev_embed], -1)
        return self.proj(x).squeeze(-1)


class DrafterBase(nn.Module):
    """What every drafter has first: frozen copies of the target's embedding and LM head,
    and ``fc``, the projection of the target features it reads to the hidden size."""

    def __init__(self, cfg: DrafterConfig, embed_weight: torch.Tensor, head_weight: torch.Tensor):
        super().__init__()
        d = cfg.hidden_size
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        self.embed_tokens.weight = frozen_copy(embed_weight)
        self.lm_head = Linear(d, cfg.vocab_size, bias=False)
        self.lm_head.weight = frozen_copy(head_weight)
        self.fc = Linear(cfg.feature_dim, d, bias=False)
        self.token_ranking: torch.Tensor | None = None
        """The target's vocabulary ids, most often generated first (its checkpoint's
        ``draft_vocab.json``); None: not known. Not a weight."""


def frozen_copy(weight: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(weight.detach().clone().float(), requires_grad=False)


def init_trainable(module: nn.Module, seed: int, std: float = 0.02) -> None:
    """Normal(0, std) matrices, unit norms, zero biases; frozen parameters are left alone."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
