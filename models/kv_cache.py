"""Attention backends of the models' one forward, and the contiguous KV cache.

Vocabulary:
- *attention backend*: what a layer's attention hands the queries, keys and values of its
  new tokens to (normed and rotated). The backend keeps the keys and values wherever it
  keeps them (nowhere, a contiguous cache, paged slots) and returns what each query sees.
  The layer loop of a model exists once; prefill, decode, verify, drafting and training
  differ only in the backend they pass.
- *contiguous backend*: ``B`` rows of equal length; new token ``t`` of a row sees the
  row's keys at positions ``<=`` its own: the cache's (if any), then this forward's.

NOTE: the contiguous cache serves ``generate``, the single-request oracle and training-time
tools; the serving engine uses the paged backend of ``dspark.workers.model_runner``.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,  # [B, H, T, head_dim] queries of the T new tokens
        k: torch.Tensor,  # [B, kv_heads, T, head_dim] their keys
        v: torch.Tensor,  # [B, kv_heads, T, head_dim] their values
    ) -> torch.Tensor:  # [B, H, T, head_dim]
        """Store the new keys/values of layer ``layer_idx`` (if it keeps any) and attend."""
        ...


class KVCache:
    """Keys and values of every layer for ``batch_size`` sequences of equal length.

    ``length`` counts committed positions; a forward writes its new keys at
    ``[length, length + T)`` and then advances. ``truncate`` rolls back (e.g. rejected
    speculative tokens).
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def update(
        self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # k_new, v_new: [B, kv_heads, T, head_dim] -> all keys/values [B, kv_heads, S, head_dim]
        end = self.length + k_new.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len={self.max_len}")
        self.k[layer, :, :, self.length : end] = k_new
        self.v[layer, :, :, self.length : end] = v_new
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate to {length}; cache holds {self.length}")
        self.length = length


def causal_mask(num_new: int, num_total: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask [num_new, num_total] letting new token i see keys <= its position.

    ``None`` means "no mask needed" (a single new token sees everything before it).
    """
    if num_new == 1:
        return None
    past = num_total - num_new
    rows = torch.arange(num_new, device=device)[:, None] + past
    cols = torch.arange(num_total, device=device)[None, :]
    return cols <= rows


class ContiguousAttention:
    """The contiguous backend: causal attention over ``cache`` (when given) and this
    forward's keys; with no cache, over this forward's keys only (training, scoring).

    ``key_mask`` [B, cache length + T] (False = padding key) lets left-padded rows of a
    batch ignore their padding. The caller advances the cache after the forward.
    """

    def __init__(self, cache: KVCache | None = None, key_mask: torch.Tensor | None = None):
        self.cache, self.key_mask = cache, key_mask

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # q: [B, H, T, hd]; k, v: [B, kv_heads, T, hd] -> [B, H, T, hd]
        num_new = q.shape[2]
        if self.cache is not None:
            k, v = self.cache.update(layer_idx, k, v)  # [B, kv_heads, S, head_dim]
        num_total = k.shape[2]
        if self.key_mask is not None:
            mask = self.key_mask[:, None, None, :num_total]  # [B, 1, 1, S]
            causal = causal_mask(num_new, num_total, q.device)
            if causal is not None:
                mask = mask & causal
            # NOTE: a padding query may see no key at all; an all-False row would give NaN
            # outputs that poison later tokens through V (0 * NaN), so let it see everything.
            mask = mask | ~mask.any(-1, keepdim=True)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        if num_total == num_new:
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=num_new > 1, enable_gqa=True
            )
        mask = causal_mask(num_new, num_total, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
