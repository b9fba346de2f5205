"""EAGLE-3 and MTP-1: one autoregressive draft layer over target features.

Vocabulary:
- *pair j*: the target feature at position j together with the token at j + 1 (the token
  the target produced from that feature). The layer's output at pair j predicts x[j + 2].
- *training-time test (TTT)*: training unrolls the layer for ``block_size`` steps; step s
  feeds the ground-truth token x[t + s + 1] with the layer's own previous output as the
  hidden, and sees the true-feature keys at positions <= t plus its own earlier steps' keys
  at position t only (what inference sees while drafting).

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
from dspark.models.parallel_drafter import Proposal, draft_probs, sample_token
from dspark.models.target import RMSNorm, RotaryEmbedding, SwiGLU, apply_rope


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

    def attn_input(self, emb: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.input_layernorm(emb), self.hidden_norm(h)], -1)  # [..., 2d]

    def finish(self, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        h = h + attn_out
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

    def _qkv(self, u: torch.Tensor, positions: torch.Tensor):
        attn = self.layer.self_attn
        bsz, num, _ = u.shape
        cos, sin = self.rotary_emb(positions)
        q = attn.q_norm(attn.q_proj(u).view(bsz, num, attn.num_heads, attn.head_dim))
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, H, T, hd]
        k, v = attn.project_kv(u, cos, sin)  # [B, kv, T, hd]
        rep = attn.num_heads // attn.num_kv_heads
        return q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)

    def ttt_logits(
        self,
        input_ids: torch.Tensor,  # [B, S]
        features: torch.Tensor,  # [B, S, F]
        steps: int,
    ) -> list[torch.Tensor]:
        """Training-time test: ``steps`` lists of logits [B, S, V]; step s, position t
        predicts x[t + s + 2] (ground-truth tokens, self-generated hiddens)."""
        bsz, seq = input_ids.shape
        attn = self.layer.self_attn
        h = self.fc(features.float())  # [B, S, d]
        base_pos = torch.arange(seq, device=input_ids.device).expand(bsz, seq)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=h.device).tril()
        scale = attn.head_dim**-0.5
        k0 = v0 = None
        diag_k: list[torch.Tensor] = []
        diag_v: list[torch.Tensor] = []
        out_logits = []
        for s in range(steps):
            tokens = F.pad(input_ids[:, s + 1 :], (0, s + 1))  # x[t + s + 1]
            u = self.layer.attn_input(self.embed_tokens(tokens), h)
            q, k, v = self._qkv(u, base_pos + s)  # [B, H, S, hd]
            if s == 0:
                k0, v0 = k, v
            else:
                diag_k.append(k)
                diag_v.append(v)
            scores = (q @ k0.transpose(-1, -2)) * scale  # [B, H, S, S]
            scores = scores.masked_fill(~causal, float("-inf"))
            diag = [(q * dk).sum(-1, keepdim=True) * scale for dk in diag_k]  # [B, H, S, 1]
            weights = torch.softmax(torch.cat([scores, *diag], -1), -1)
            out = weights[..., :seq] @ v0
            for j, dv in enumerate(diag_v):
                out = out + weights[..., seq + j : seq + j + 1] * dv
            out = attn.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1))
            h = self.layer.finish(h, out)
            out_logits.append(self.logits(h))
        return out_logits

    def new_session(self) -> AutoregressiveSession:
        return AutoregressiveSession(self)


class AutoregressiveSession:
    """Per-request state: the layer's K/V of committed pairs and the last pair's output."""

    def __init__(self, drafter: AutoregressiveDrafter) -> None:
        self.drafter = drafter
        self.k: torch.Tensor | None = None  # [1, H, L, hd] (heads already repeated)
        self.v: torch.Tensor | None = None
        self.last_h: torch.Tensor | None = None  # [1, 1, d]
        self.length = 0

    def _step(self, h, tokens, positions, k_cache, v_cache):
        """Run the layer on new pairs; causal among them, all cached keys visible."""
        d = self.drafter
        u = d.layer.attn_input(d.embed_tokens(tokens), h)
        q, k, v = d._qkv(u, positions)
        if k_cache is not None:
            k, v = torch.cat([k_cache, k], 2), torch.cat([v_cache, v], 2)
        num_new, num_total = q.shape[2], k.shape[2]
        rows = torch.arange(num_new, device=q.device)[:, None] + (num_total - num_new)
        mask = torch.arange(num_total, device=q.device)[None, :] <= rows
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = d.layer.self_attn.o_proj(out.transpose(1, 2).reshape(1, num_new, -1))
        return d.layer.finish(h, out), k, v

    @torch.no_grad()
    def extend(self, features: torch.Tensor, next_tokens: list[int]) -> None:
        """Append pairs (feature of position j, token j + 1) for the next n positions."""
        device = features.device
        num = features.shape[0]
        h0 = self.drafter.fc(features[None].float())  # [1, n, d]
        tokens = torch.tensor([next_tokens], device=device)
        pos = torch.arange(self.length, self.length + num, device=device)[None]
        out, self.k, self.v = self._step(h0, tokens, pos, self.k, self.v)
        self.last_h = out[:, -1:]
        self.length += num

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
        d = self.drafter
        h, k, v = self.last_h, self.k, self.v
        tokens, prob_rows = [], []
        for i in range(min(max_tokens, d.config.block_size)):
            probs = draft_probs(d.logits(h)[0, -1], temperature)
            token = sample_token(probs, temperature, gen)
            tokens.append(token)
            prob_rows.append(probs)
            if token in stop_ids or i + 1 == min(max_tokens, d.config.block_size):
                break
            pos = torch.tensor([[self.length + i]], device=h.device)
            h, k, v = self._step(h, torch.tensor([[token]], device=h.device), pos, k, v)
        return Proposal(tokens=tokens, probs=torch.stack(prob_rows))
