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
from dspark.models.kv_cache import AttentionBackend, ContiguousAttention, KVCache
from dspark.models.parallel_drafter import Proposal, draft_probs, sample_token
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
    ) -> torch.Tensor:  # [B, T, d]
        u = torch.cat([self.input_layernorm(emb), self.hidden_norm(h)], -1)  # [B, T, 2d]
        h = h + self.self_attn(u, cos, sin, attention)
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
    ) -> torch.Tensor:  # [B, T, d] the layer's output at each pair
        """The one layer step over T pairs (training-time test, sessions, the engine's extend
        and drafting); ``attention`` keeps the pairs' K/V and decides what each sees."""
        cos, sin = self.rotary_emb(positions)
        return self.layer(h, self.embed_tokens(tokens), cos, sin, attention)

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

    def new_session(self) -> AutoregressiveSession:
        return AutoregressiveSession(self)


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


class AutoregressiveSession:
    """Per-request state: the layer's K/V of committed pairs (a contiguous cache) and the
    last pair's output.

    NOTE: drafts' K/V are written past the committed length while proposing and rolled back
    after, so the cache holds exactly the committed pairs between calls.
    """

    def __init__(self, drafter: AutoregressiveDrafter) -> None:
        self.drafter = drafter
        self.cache = drafter.new_kv_cache()
        self.last_h: torch.Tensor | None = None  # [1, 1, d]

    @property
    def length(self) -> int:
        return self.cache.length

    @torch.no_grad()
    def extend(self, features: torch.Tensor, next_tokens: list[int]) -> None:
        """Append pairs (feature of position j, token j + 1) for the next n positions."""
        device = features.device
        num = features.shape[0]
        h0 = self.drafter.fc(features[None].float())  # [1, n, d]
        tokens = torch.tensor([next_tokens], device=device)
        pos = torch.arange(self.length, self.length + num, device=device)[None]
        out = self.drafter.step(h0, tokens, pos, ContiguousAttention(self.cache))
        self.cache.advance(num)
        self.last_h = out[:, -1:]

    @torch.no_grad()
    def propose(
        self,
        anchor: int,
        temperature: float,
        gen: torch.Generator | None,
        max_tokens: int,
        stop_ids: tuple[int, ...] = (),
    ) -> Proposal:
        """Up to ``max_tokens`` drafts, stopping after a stop token; the anchor is already
        paired with the last committed feature."""
        del anchor
        d, committed = self.drafter, self.length
        attention = ContiguousAttention(self.cache)
        h = self.last_h
        tokens, prob_rows = [], []
        for i in range(min(max_tokens, d.config.block_size)):
            probs = draft_probs(d.logits(h)[0, -1], temperature)
            token = sample_token(probs, temperature, gen)
            tokens.append(token)
            prob_rows.append(probs)
            if token in stop_ids or i + 1 == min(max_tokens, d.config.block_size):
                break
            pos = torch.tensor([[committed + i]], device=h.device)
            h = d.step(h, torch.tensor([[token]], device=h.device), pos, attention)
            self.cache.advance(1)
        self.cache.truncate(committed)
        return Proposal(tokens=tokens, probs=torch.stack(prob_rows))
