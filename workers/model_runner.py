"""The model runner: the target's forward over a flattened, variable-length batch with paged
KV, and the profiled step-cost table SPS(B). It makes no policy decisions.

Vocabulary:
- *verify batch*: every scheduled request's fed tokens, contiguous (a prefill chunk, or the
  anchor plus the ℓ_r drafts kept by the verification budget), with a per-token position;
- *logit rows*: the rows whose next-token distribution is needed (all rows of a decoding
  request, the last row of a prefill chunk that completes its prompt);
- *features*: what the drafter reads per row (raw residuals of its feature layers, or the
  final normed hidden for MTP).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dspark.kernels.paged_attention import paged_attention, slot_table
from dspark.models.target import TargetModel, apply_rope
from dspark.workers.budget import StepCostTable


@dataclass
class VerifyBatch:
    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    cu_q: torch.Tensor  # [R + 1]
    block_tables: torch.Tensor  # [R, max_blocks]
    seq_lens: torch.Tensor  # [R] tokens with KV after this forward
    max_q: int
    logit_rows: torch.Tensor  # [M] row indices into N

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


@dataclass
class RunnerOutput:
    logits: torch.Tensor  # [M, V]
    features: torch.Tensor | None  # [N, F] the drafter's input features, or None


class PagedKV:
    """Paged key/value storage of several layers: ``[layers, num_slots, kv_heads, head_dim]``."""

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # slots: [N]; k, v: [N, kv_heads, head_dim]
        self.k[layer, slots] = k.to(self.k.dtype)
        self.v[layer, slots] = v.to(self.v.dtype)


def token_slots(batch_tables: torch.Tensor, req_of: torch.Tensor, positions: torch.Tensor,
                block_size: int) -> torch.Tensor:
    """Slot of every row: [N]."""
    return batch_tables[req_of, positions // block_size] * block_size + positions % block_size


class ModelRunner:
    def __init__(
        self,
        target: TargetModel,
        num_blocks: int,
        block_size: int,
        feature_layers: Sequence[int] = (),
        features_from_hidden: bool = False,
    ) -> None:
        cfg = target.config
        self.target, self.block_size = target, block_size
        self.feature_layers = tuple(feature_layers)
        self.num_forwards = 0
        self.features_from_hidden = features_from_hidden
        param = target.lm_head.weight
        self.device = param.device
        self.kv = PagedKV(
            cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
            cfg.head_dim, param.dtype, param.device,
        )

    @torch.no_grad()
    def forward(self, batch: VerifyBatch) -> RunnerOutput:
        self.num_forwards += 1
        target = self.target
        num_req = batch.cu_q.numel() - 1
        q_lens = batch.cu_q[1:] - batch.cu_q[:-1]  # [R]
        req_of = torch.repeat_interleave(torch.arange(num_req, device=self.device), q_lens)
        slots = token_slots(batch.block_tables, req_of, batch.positions, self.block_size)
        width = int(batch.seq_lens.max())  # NOTE: the one host sync of the forward
        table = slot_table(batch.block_tables, width, self.block_size)  # [R, S]
        cos, sin = target.model.rotary_emb(batch.positions[None])  # [1, 1, N, hd]
        x = target.model.embed_tokens(batch.input_ids)  # [N, d]
        captured = {-1: x} if -1 in self.feature_layers else {}
        for i, layer in enumerate(target.model.layers):
            h = layer.input_layernorm(x)
            x = x + self._attention(layer.self_attn, i, h, cos, sin, slots, table, batch)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if i in self.feature_layers:
                captured[i] = x
        hidden = target.model.norm(x)  # [N, d]
        logits = target.lm_head(hidden[batch.logit_rows])  # [M, V]
        if self.features_from_hidden:
            features = hidden
        elif self.feature_layers:
            features = torch.cat([captured[i] for i in self.feature_layers], -1)
        else:
            features = None
        return RunnerOutput(logits=logits, features=features)

    def _attention(self, attn, layer_idx, h, cos, sin, slots, table, batch):
        num = h.shape[0]
        q = attn.q_norm(attn.q_proj(h).view(num, attn.num_heads, attn.head_dim))
        k = attn.k_norm(attn.k_proj(h).view(num, attn.num_kv_heads, attn.head_dim))
        v = attn.v_proj(h).view(num, attn.num_kv_heads, attn.head_dim)
        q = apply_rope(q.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)  # [N, H, hd]
        k = apply_rope(k.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)  # [N, kv, hd]
        self.kv.write(layer_idx, slots, k, v)
        out = paged_attention(
            q, self.kv.k[layer_idx], self.kv.v[layer_idx], table, batch.seq_lens,
            batch.cu_q, batch.positions, batch.max_q,
        )  # [N, H, hd]
        return attn.o_proj(out.reshape(num, -1).to(h.dtype))


def dummy_batch(
    num_tokens: int, num_req: int, context: int, block_size: int, vocab: int, device
) -> VerifyBatch:
    """``num_tokens`` fed tokens split over ``num_req`` requests that each already hold
    ``context`` tokens of KV, laid out in consecutive blocks (for profiling only)."""
    sizes = [num_tokens // num_req + (1 if r < num_tokens % num_req else 0) for r in range(num_req)]
    blocks_per = -(-(context + max(sizes)) // block_size)
    tables = torch.arange(num_req * blocks_per, device=device).view(num_req, blocks_per)
    positions = torch.cat([torch.arange(context, context + n, device=device) for n in sizes])
    cu = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], device=device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (num_tokens,), generator=gen).to(device)
    return VerifyBatch(
        input_ids=ids,
        positions=positions,
        cu_q=cu,
        block_tables=tables,
        seq_lens=torch.tensor([context + n for n in sizes], device=device),
        max_q=max(sizes),
        logit_rows=torch.arange(num_tokens, device=device),
    )


def profile_step_costs(
    runner: ModelRunner,
    batch_sizes: Sequence[int],
    max_requests: int,
    context: int,
    num_blocks: int,
    repeats: int = 3,
) -> StepCostTable:
    """SPS(B): verify forwards per second at each verify batch size B (median of repeats).

    Must run before any request holds KV: the dummy requests overwrite blocks from 0 on.
    """
    vocab = runner.target.config.vocab_size
    sizes, rates = [], []
    for num_tokens in sorted(set(batch_sizes)):
        num_req = max(1, min(max_requests, num_tokens))
        sizes_per = -(-num_tokens // num_req)
        if num_req * -(-(context + sizes_per) // runner.block_size) > num_blocks:
            break  # not enough KV to lay this batch out
        batch = dummy_batch(num_tokens, num_req, context, runner.block_size, vocab, runner.device)
        runner.forward(batch)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            runner.forward(batch)
            if runner.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        sizes.append(num_tokens)
        rates.append(1.0 / sorted(times)[len(times) // 2])
    return StepCostTable(tuple(sizes), tuple(rates))
