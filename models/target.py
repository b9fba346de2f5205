"""The target model: a Qwen3-MoE-style decoder-only transformer.

Vocabulary:
- *residual stream*: the hidden state between decoder layers, before any norm. The drafters
  read the raw residual stream after chosen layers (``feature_layers``; -1 is the
  embedding output) and the *final hidden*, the residual stream after the final RMSNorm.
- *routed experts*: SwiGLU MLPs behind a softmax top-k router; the top-k gate weights are
  renormalised when ``norm_topk_prob`` is set. A *shared expert* (optional) sees every token.
- *the one forward*: ``TargetModel.forward`` serves training, prefill, decode, verify and
  feature capture; only the attention backend it is given differs (``kv_cache.py``: no
  cache or a contiguous cache; the model runner's paged backend in serving).

Parameter names are exactly Hugging Face's ``Qwen3MoeForCausalLM`` / ``Qwen3ForCausalLM``
(``model.layers.{i}.self_attn.q_proj.weight``, ``model.layers.{i}.mlp.experts.{e}.gate_proj
.weight``, ...), so ``state_dict()`` is a Hugging Face checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dspark.models.config import TargetConfig
from dspark.models.dense_experts import dense_experts
from dspark.models.grouped_experts import grouped_experts, grouped_mm_available, grouped_mm_fast
from dspark.models.kv_cache import AttentionBackend, ContiguousAttention, KVCache
from dspark.models.linear import Linear, linear
from dspark.models.stacked import stacked_weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms_normalize(x, self.eps)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x)`` over the last dimension, computed in float32 (RMSNorm before its
    weight)."""
    if x.dtype == torch.float32:
        # NOTE: one fused operator instead of five; the same arithmetic, bit for bit on
        # the CPU (tests/models/test_target.py): a decode step's norms cost their count
        return F.rms_norm(x, (x.shape[-1],), eps=eps)
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE with Hugging Face's half-rotation layout (``rotate_half``)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [B, T] -> cos, sin: [B, 1, T, head_dim]
        freqs = positions.float()[..., None] * self.inv_freq  # [B, T, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None], emb.sin()[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, head_dim]
    return (x.float() * cos + _rotate_half(x.float()) * sin).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention with per-head RMSNorm on queries and keys (QK-norm)."""

    def __init__(self, cfg: TargetConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        d, hd, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.q_proj = Linear(d, self.num_heads * hd, bias=bias)
        self.k_proj = Linear(d, self.num_kv_heads * hd, bias=bias)
        self.v_proj = Linear(d, self.num_kv_heads * hd, bias=bias)
        self.o_proj = Linear(self.num_heads * hd, d, bias=bias)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, d]
        cos: torch.Tensor,  # [B, 1, T, head_dim]
        sin: torch.Tensor,
        attention: AttentionBackend,
    ) -> torch.Tensor:  # [B, T, d]
        bsz, num_new, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(bsz, num_new, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(bsz, num_new, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(bsz, num_new, self.num_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, head_dim]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention.attend(self.layer_idx, q, k, v)  # [B, H, T, head_dim]
        out = out.transpose(1, 2).reshape(bsz, num_new, self.num_heads * self.head_dim)
        return self.o_proj(out)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: the dense MLP, one routed expert, the shared expert."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = Linear(d, hidden, bias=False)
        self.up_proj = Linear(d, hidden, bias=False)
        self.down_proj = Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = stacked_weight(self, "gate_up", (self.gate_proj.weight, self.up_proj.weight))
        gate, up = linear(x, both).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


@dataclass
class Routing:
    """Top-k routing of N tokens: expert ids and gate weights per token."""

    expert_ids: torch.Tensor  # [N, k] int64
    weights: torch.Tensor  # [N, k] gate weights (renormalised if norm_topk_prob)
    probs: torch.Tensor  # [N, E] full softmax, for the load-balancing loss


_sync_free = [False]


@contextmanager
def sync_free_experts():
    """Within it, the ``auto`` expert path never syncs with the host on a GPU (a CUDA
    graph's warm-up and capture, ``workers/graphs.py``): dense experts where torch's
    grouped product has no kernel of its own. NOTE: process-wide; the engine's one thread
    runs the forwards."""
    before, _sync_free[0] = _sync_free[0], True
    try:
        yield
    finally:
        _sync_free[0] = before


class SparseMoeBlock(nn.Module):
    """Routed SwiGLU experts behind a softmax top-k router, plus an optional shared expert.

    NOTE: ``route`` and ``combine_experts`` are separate so that an expert-parallel runner
    can route locally, exchange tokens with the ranks owning their experts, and run only
    the local experts (``expert_offset`` .. ``expert_offset + len(experts)``).
    """

    def __init__(self, cfg: TargetConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts)
        )
        self.shared_expert = None
        self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size > 0:
            self.shared_expert = SwiGLU(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False)
        self.last_aux_loss: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> Routing:
        # x: [N, d]
        probs = torch.softmax(self.gate(x).float(), dim=-1)  # [N, E]
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(expert_ids=expert_ids, weights=weights.to(x.dtype), probs=probs)

    dense_max_tokens = 16
    """Up to this many tokens on the CPU, every expert runs on every token in two linear
    layers (``dense_experts``) instead of one chain of calls per active expert: a small
    batch's cost there is the count of operations, not their arithmetic. Above it the
    grouped products run (``grouped_experts``), which from 24-32 tokens on cost less than
    dense and 0.6-0.9 of sparse (``python -m dspark.bench.moe_paths``, docs/engine.md,
    session 29). 0: never dense."""

    expert_path = "auto"
    """How the routed experts run: ``auto`` (on a GPU, grouped products in bf16 on sm90 and
    sm100, else sparse, or dense within ``sync_free_experts``; on the CPU, dense up to
    ``dense_max_tokens`` tokens, else grouped; sparse where this torch has no grouped
    product), or ``sparse``, ``dense``, ``grouped`` always (the benchmarks' side-by-side
    runs). Training (grad enabled) runs sparse."""

    def combine_experts(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Sum over each token's top-k experts of ``weight * expert(x)``; x: [N, d]."""
        path = self.expert_path
        if torch.is_grad_enabled():
            path = "sparse"
        elif path == "auto":
            if x.device.type == "cpu":
                path = "dense" if x.shape[0] <= self.dense_max_tokens else (
                    "grouped" if grouped_mm_available() else "sparse")
            else:
                # NOTE: on a GPU torch's grouped product has its own kernel for bf16 on sm90
                # and sm100 only; elsewhere it falls back to a loop that reads the group
                # ends back to the host, a sync per layer that a CUDA graph cannot hold:
                # there dense experts (no sync) while graphs are made, sparse otherwise
                path = "grouped" if grouped_mm_fast(x) else (
                    "dense" if _sync_free[0] else "sparse")
        if path == "grouped":
            return grouped_experts(self, x, routing)
        if path == "dense":
            return dense_experts(self, x, routing)
        return self.sparse_experts(x, routing)

    def sparse_experts(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """``combine_experts`` by sorting the tokens' expert slots and running each active
        expert on its rows."""
        flat_ids = routing.expert_ids.reshape(-1)  # [N * k]
        order = torch.argsort(flat_ids, stable=True)
        token_of = order // self.top_k  # [N * k] source token of each sorted slot
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        sorted_x = x.index_select(0, token_of)
        outs = []
        for expert, chunk in zip(self.experts, torch.split(sorted_x, counts)):
            outs.append(expert(chunk) if chunk.shape[0] else chunk)
        expert_out = torch.cat(outs, dim=0)  # [N * k, d]
        expert_out = expert_out * routing.weights.reshape(-1)[order, None]
        out = torch.zeros_like(x)
        out.index_add_(0, token_of, expert_out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, d]
        routing = self.route(flat)
        out = self.combine_experts(flat, routing)
        if self.shared_expert is not None:
            gate = torch.sigmoid(self.shared_expert_gate(flat))
            out = out + gate * self.shared_expert(flat)
        if self.training:
            # Switch-style load balancing: E * sum_e(fraction routed to e * mean prob of e).
            frac = torch.bincount(routing.expert_ids.reshape(-1), minlength=self.num_experts)
            frac = frac.float() / routing.expert_ids.numel()
            self.last_aux_loss = self.num_experts * (frac * routing.probs.mean(0)).sum()
        return out.reshape(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TargetConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer_idx):
            self.mlp: nn.Module = SparseMoeBlock(cfg)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, attention: AttentionBackend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class TargetBackbone(nn.Module):
    """``model.*`` in Hugging Face naming: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: TargetConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)


@dataclass
class TargetOutput:
    """What one forward returns."""

    logits: torch.Tensor | None  # [B, T, V], [B, M, V] at logit_rows, None when not requested
    hidden_states: torch.Tensor  # [B, T, d] final hidden, after the final RMSNorm
    layer_features: torch.Tensor | None  # [B, T, len(feature_layers) * d] raw residuals
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss (training mode only)


class TargetModel(nn.Module):
    """Qwen3-MoE / Qwen3 causal LM with Hugging Face parameter names."""

    def __init__(self, cfg: TargetConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = TargetBackbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, seed: int, std: float = 0.02) -> None:
        """Random initialisation (normal(0, std) matrices, unit norms), deterministic."""
        gen = torch.Generator().manual_seed(seed)
        for name, param in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif name.endswith(".bias"):
                    param.zero_()
                else:
                    # NOTE: no extra down-scaling of o_proj/down_proj: with it, the demo
                    # target took far longer to learn to copy from its context (induction).
                    param.copy_(torch.randn(param.shape, generator=gen) * std)

    def new_kv_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        cfg = self.config
        param = self.lm_head.weight
        return KVCache(
            num_layers=cfg.num_hidden_layers,
            batch_size=batch_size,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            max_len=max_len or cfg.max_position_embeddings,
            dtype=param.dtype,
            device=param.device,
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        positions: torch.Tensor | None = None,  # [B, T]; default: cache length + arange(T)
        kv_cache: KVCache | None = None,
        feature_layers: Sequence[int] = (),
        compute_logits: bool = True,
        key_mask: torch.Tensor | None = None,  # [B, cache length + T] bool; False = padding
        attention: AttentionBackend | None = None,
        logit_rows: torch.Tensor | None = None,  # [M] indices into T; None = every row
    ) -> TargetOutput:
        """The one forward: prefill, decode, verify and drafter-feature capture.

        Attention goes to ``attention`` when given (the engine passes its paged backend with
        the flattened batch as one row, B = 1, and explicit per-token ``positions``);
        otherwise to the contiguous backend over ``kv_cache`` (which then advances by T) or,
        with no cache, over this forward's tokens only. ``key_mask`` lets left-padded rows
        ignore their padding keys (batched generation); pass per-row ``positions`` that start
        at 0 on each row's first real token. Logits are computed for ``logit_rows`` only
        when given: ``logits`` is then [B, M, V].
        """
        cfg = self.config
        for layer in feature_layers:
            if not -1 <= layer < cfg.num_hidden_layers:
                raise ValueError(f"feature layer {layer} outside [-1, {cfg.num_hidden_layers - 1}]")
        if attention is None:
            positions = self._contiguous_positions(input_ids, positions, kv_cache)
            attention = ContiguousAttention(kv_cache, key_mask)
        elif positions is None or kv_cache is not None or key_mask is not None:
            raise ValueError("an attention backend takes explicit positions, no kv_cache or "
                             "key_mask")
        x, captured = self._run_layers(input_ids, positions, attention, feature_layers)
        if kv_cache is not None:
            kv_cache.advance(input_ids.shape[1])
        hidden = self.model.norm(x)  # [B, T, d]
        features = torch.cat([captured[i] for i in feature_layers], -1) if feature_layers else None
        logits = None
        if compute_logits:
            logits = self.lm_head(hidden if logit_rows is None else hidden[:, logit_rows])
        return TargetOutput(
            logits=logits, hidden_states=hidden, layer_features=features,
            aux_loss=self._aux_loss(),
        )

    def _contiguous_positions(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None, kv_cache: KVCache | None
    ) -> torch.Tensor:  # [B, T]
        bsz, num_new = input_ids.shape
        start = kv_cache.length if kv_cache is not None else 0
        limit = self.config.max_position_embeddings
        if start + num_new > limit:
            raise ValueError(
                f"sequence of {start + num_new} tokens exceeds max_position_embeddings={limit}"
            )
        if positions is None:
            positions = torch.arange(start, start + num_new, device=input_ids.device)
            positions = positions.expand(bsz, num_new)
        return positions

    def _run_layers(
        self,
        input_ids: torch.Tensor,  # [B, T]
        positions: torch.Tensor,  # [B, T]
        attention: AttentionBackend,
        feature_layers: Sequence[int],
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The layer loop: the last residual [B, T, d] and the captured feature layers."""
        cos, sin = self.model.rotary_emb(positions)
        x = self.model.embed_tokens(input_ids)  # [B, T, d]
        captured: dict[int, torch.Tensor] = {}
        if -1 in feature_layers:
            captured[-1] = x
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, attention)
            if i in feature_layers:
                captured[i] = x
        return x, captured

    def _aux_loss(self) -> torch.Tensor | None:
        """Mean MoE load-balancing loss of the last forward (training mode only)."""
        if not self.training or self.config.num_experts == 0:
            return None
        losses = [
            layer.mlp.last_aux_loss
            for layer in self.model.layers
            if isinstance(layer.mlp, SparseMoeBlock) and layer.mlp.last_aux_loss is not None
        ]
        return torch.stack(losses).mean() if losses else None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
