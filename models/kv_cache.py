"""A contiguous per-request KV cache for incremental decoding of the target.

NOTE: this is the simple single-request cache used by ``generate`` and training-time
tools; the serving engine uses the paged cache in ``dspark.workers``.
"""

from __future__ import annotations

import torch


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
