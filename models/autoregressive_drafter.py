"""EAGLE-3 and MTP-1: one autoregressive draft layer over target features.

Vocabulary:
- *pair j*: the target feature at position j together with the token at j + 1 (the token
  the target produced from that feature). The layer's output at pair j predicts x[j + 2].
- *training-time test (TTT)*: training unrolls the layer for ``block_size`` steps; step s
  feeds the ground-truth token x[t + s + 1] with the layer's own previous output as the
  hidden, and sees the true-feature keys at positions <= t plus its own earlier steps' keys
  at position t only (what inference sees while drafting).
- *the layer step* (``AutoregressiveDrafter.step``): the one forward of the layer over new
  pairs; training (``TrainingTimeTest``), the session (a contiguous ``KVCache``) and the
  serving engine (paged cache) differ only in the attention backend they pass.

EAGLE-3 fuses the chosen target layers with ``fc``; MTP-1 (DeepSeek-V3's multi-token
prediction at depth 1) reads the target's final normed hidden and proposes one token.
Both concatenate ``[norm(emb(token)) ; norm(hidden)]`` as the layer's attention input and
have their own final norm before the shared frozen LM head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dspark.models.draft_layers import DrafterBase, InjectedAttention
from dspark.models.drafter_config import DrafterConfig
from dspark.models.kv_cache import AttentionBackend, KVCache
from dspark.models.target import RMSNorm, RotaryEmbedding, SwiGLU


class FusedInputLayer(nn.Module):
    """``h + Attn([norm(emb) ; norm(h)])`` then the usual MLP residual."""

    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.self_attn = InjectedAttention(cfg, in_dim=2 * d)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.mlp = SwiGLU(d, cfg.intermediate_size)

    def forward(
        self,
        h: torch.Tensor,  # [B, T, d] hidden of each pair (fc(feature) or the last output)
        emb: torch.Tensor,  # [B, T, d] embedding of each pair's token
        cos: torch.Tensor,  # [B, 1, T, head_dim]
        sin: torch.Tensor,
        attention: AttentionBackend,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [B, T, d], or [B, len(rows), d]
        """``rows``: the output at those pairs only (every pair still writes its key and
        value through ``attention``)."""
        u = torch.cat([self.input_layernorm(emb), self.hidden_norm(h)], -1)  # [B, T, 2d]
        if rows is not None:
            h = h.index_select(1, rows)
        h = h + self.self_attn(u, cos, sin, attention, rows)
        return h + self.mlp(self.post_attention_layernorm(h))


class AutoregressiveDrafter(DrafterBase):
    """EAGLE-3 (fused layer features, TTT over the block) or MTP-1 (last hidden, 1 token)."""

    def __init__(self, cfg: DrafterConfig, embed_weight: torch.Tensor, head_weight: torch.Tensor):
        if cfg.is_parallel:
            raise ValueError(f"AutoregressiveDrafter serves eagle3/mtp, not {cfg.method}")
        super().__init__(cfg, embed_weight, head_weight)
        d = cfg.hidden_size
        self.layer = FusedInputLayer(cfg)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))

    def step(
        self,
        h: torch.Tensor,  # [B, T, d]
        tokens: torch.Tensor,  # [B, T]
        positions: torch.Tensor,  # [B, T]
        attention: AttentionBackend,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [B, T, d] the layer's output at each pair (at ``rows``' only)
        """The one layer step over T pairs (training-time test, sessions, the engine's extend
        and drafting); ``attention`` keeps the pairs' K/V and decides what each sees;
        ``rows``: the pairs whose output is wanted (``FusedInputLayer``)."""
        cos, sin = self.rotary_emb(positions)
        return self.layer(h, self.embed_tokens(tokens), cos, sin, attention, rows)

    def new_kv_cache(self) -> KVCache:
        """A contiguous cache of the layer's K/V for one request."""
        cfg, param = self.config, self.lm_head.weight
        return KVCache(1, 1, cfg.num_key_value_heads, cfg.head_dim, cfg.max_position_embeddings,
                       param.dtype, param.device)

    def ttt_logits(
        self,
        input_ids: torch.Tensor,  # [B, S]
        features: torch.Tensor,  # [B, S, F]
        steps: int,
    ) -> list[torch.Tensor]:
        """Training-time test: ``steps`` lists of logits [B, S, V]; step s, position t
        predicts x[t + s + 2] (ground-truth tokens, self-generated hiddens)."""
        bsz, seq = input_ids.shape
        h = self.fc(features.float())  # [B, S, d]
        base_pos = torch.arange(seq, device=input_ids.device).expand(bsz, seq)
        attention = TrainingTimeTest(seq, h.device)
        out_logits = []
        for s in range(steps):
            tokens = F.pad(input_ids[:, s + 1 :], (0, s + 1))  # x[t + s + 1]
            h = self.step(h, tokens, base_pos + s, attention)
            out_logits.append(self.logits(h))
        return out_logits

class TrainingTimeTest:
    """The attention backend of TTT: step 0's keys are the true-feature pairs (causal); the
    query of step s at position t also sees its own earlier steps' keys at position t only
    (what inference sees while drafting). One call per step, steps in order."""

    def __init__(self, seq: int, device: torch.device) -> None:
        self.causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()  # [S, S]
        self.k0 = self.v0 = None  # [B, H, S, hd] step 0 (heads repeated)
        self.diag_k: list[torch.Tensor] = []  # per later step [B, H, S, hd]
        self.diag_v: list[torch.Tensor] = []

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # q: [B, H, S, hd]; k, v: [B, kv, S, hd] -> [B, H, S, hd]
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        if self.k0 is None:
            self.k0, self.v0 = k, v
        else:
            self.diag_k.append(k)
            self.diag_v.append(v)
        seq, scale = q.shape[2], q.shape[-1] ** -0.5
        scores = (q @ self.k0.transpose(-1, -2)) * scale  # [B, H, S, S]
        scores = scores.masked_fill(~self.causal, float("-inf"))
        diag = [(q * dk).sum(-1, keepdim=True) * scale for dk in self.diag_k]  # [B, H, S, 1]
        weights = torch.softmax(torch.cat([scores, *diag], -1), -1)
        out = weights[..., :seq] @ self.v0
        for j, dv in enumerate(self.diag_v):
            out = out + weights[..., seq + j : seq + j + 1] * dv
        return out
