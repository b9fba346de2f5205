"""Batched drafting for every drafter, with the drafter's own paged cache of context K/V.

Vocabulary:
- *context* of request r: the drafter's K/V of positions 0..n_r-1, where n_r is the
  request's committed token count; the drafter cache shares the target's block tables and
  slots, so a position's drafter K/V lives in the same slot as its target K/V.
- *extend*: after a step, write the drafter K/V of the positions the target just committed
  (their target features; for EAGLE-3 / MTP-1 each paired with the token that follows it).
- *propose*: draft up to n tokens after each request's anchor (the newest committed token),
  with the distribution each was drawn from and, for DSpark, the confidence logits.

NOTE: only committed positions are ever written (rejected drafts never reach the drafter
cache), so a prefix-cached block's drafter K/V is valid for every request sharing it: the
K/V of a position depends only on the tokens up to it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dspark.kernels.markov_sample import markov_sample, sample_rows
from dspark.kernels.paged_attention import gather_kv, paged_attention, slot_table
from dspark.models.autoregressive_drafter import AutoregressiveDrafter
from dspark.models.drafter_checkpoint import Drafter
from dspark.models.target import apply_rope
from dspark.workers.budget import StepCostTable
from dspark.workers.model_runner import PagedKV, token_slots


@dataclass
class DraftOutput:
    tokens: torch.Tensor  # [R, n]
    probs: torch.Tensor  # [R, n, V] draft distribution of each token
    conf_logits: torch.Tensor | None  # [R, n] raw confidence logits (DSpark), else None


@dataclass
class ExtendBatch:
    """Committed rows to write into the drafter cache, grouped per request."""

    req_ids: list[str]
    features: torch.Tensor  # [N, F]
    next_ids: torch.Tensor  # [N] the token after each row's position
    positions: torch.Tensor  # [N]
    cu: torch.Tensor  # [R + 1]
    block_tables: torch.Tensor  # [R, max_blocks]
    max_q: int


class DraftWorker:
    def __init__(self, drafter: Drafter, num_blocks: int, block_size: int) -> None:
        cfg = drafter.config
        self.drafter, self.config, self.block_size = drafter, cfg, block_size
        self.autoregressive = isinstance(drafter, AutoregressiveDrafter)
        num_layers = 1 if self.autoregressive else cfg.num_layers
        param = drafter.lm_head.weight
        self.kv = PagedKV(
            num_layers, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim,
            param.dtype, param.device,
        )
        self.last_h: dict[str, torch.Tensor] = {}  # autoregressive: [d] per request
        self._buffers: dict[str, torch.Tensor] = {}

    def ready(self, req_id: str) -> bool:
        """Can propose for this request (autoregressive drafters need its last output)."""
        return not self.autoregressive or req_id in self.last_h

    def forget(self, req_id: str) -> None:
        self.last_h.pop(req_id, None)

    # ------------------------------------------------------------------ extend
    @torch.no_grad()
    def extend(self, batch: ExtendBatch) -> None:
        num_req = len(batch.req_ids)
        if num_req == 0:
            return
        lens = batch.cu[1:] - batch.cu[:-1]
        req_of = torch.repeat_interleave(torch.arange(num_req, device=lens.device), lens)
        slots = token_slots(batch.block_tables, req_of, batch.positions, self.block_size)
        cos, sin = self.drafter.rotary_emb(batch.positions[None])  # [1, 1, N, hd]
        if not self.autoregressive:
            fused = self.drafter.hidden_norm(self.drafter.fc(batch.features.float()))  # [N, d]
            for i, layer in enumerate(self.drafter.layers):
                k, v = layer.self_attn.project_kv(fused[None], cos, sin)  # [1, kv, N, hd]
                self.kv.write(i, slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
            return
        d = self.drafter
        h0 = d.fc(batch.features.float())  # [N, d]
        u = d.layer.attn_input(d.embed_tokens(batch.next_ids), h0)  # [N, 2d]
        q, k, v = self._qkv(u, cos, sin)
        self.kv.write(0, slots, k, v)
        seq_lens = batch.positions[batch.cu[1:] - 1] + 1  # [R]
        width = int(seq_lens.max())
        table = slot_table(batch.block_tables, width, self.block_size)
        out = paged_attention(
            q, self.kv.k[0], self.kv.v[0], table, seq_lens, batch.cu, batch.positions,
            batch.max_q,
        )  # [N, H, hd]
        h = d.layer.finish(h0, d.layer.self_attn.o_proj(out.reshape(out.shape[0], -1)))
        last = h[batch.cu[1:] - 1]  # [R, d]
        for r, req_id in enumerate(batch.req_ids):
            self.last_h[req_id] = last[r]

    def _qkv(self, u, cos, sin):
        """u: [N, in] -> q [N, H, hd], k and v [N, kv, hd] (normed and rotated)."""
        attn = self.drafter.layer.self_attn
        num = u.shape[0]
        q = attn.q_norm(attn.q_proj(u).view(num, attn.num_heads, attn.head_dim))
        q = apply_rope(q.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
        k, v = attn.project_kv(u[None], cos, sin)  # [1, kv, N, hd]
        return q, k[0].transpose(0, 1), v[0].transpose(0, 1)

    # ------------------------------------------------------------------ propose
    @torch.no_grad()
    def propose(
        self,
        req_ids: list[str],
        anchors: torch.Tensor,  # [R] newest committed token of each request
        context_lens: torch.Tensor,  # [R] committed positions (the anchor's position)
        block_tables: torch.Tensor,  # [R, max_blocks]
        num_tokens: int,  # drafts per request, <= block size
        temperatures: torch.Tensor,  # [R]
        uniforms: torch.Tensor,  # [R, block size] per-request draws in [0, 1)
    ) -> DraftOutput:
        width = int(context_lens.max())
        table = slot_table(block_tables, width, self.block_size)  # [R, S]
        ctx_visible = torch.arange(width, device=anchors.device)[None] < context_lens[:, None]
        if self.autoregressive:
            return self._propose_autoregressive(
                req_ids, context_lens, table, ctx_visible, num_tokens, temperatures, uniforms
            )
        return self._propose_parallel(
            anchors, context_lens, table, ctx_visible, num_tokens, temperatures, uniforms
        )

    def _propose_parallel(self, anchors, context_lens, table, ctx_visible, num, temps, uniforms):
        d, cfg = self.drafter, self.config
        num_req, block = anchors.shape[0], cfg.block_size
        block_ids = torch.full((num_req, block), cfg.mask_token_id, device=anchors.device)
        block_ids[:, 0] = anchors
        block_pos = context_lens[:, None] + torch.arange(block, device=anchors.device)
        # queries see the context before their anchor and every slot of their block
        mask = torch.cat(
            [ctx_visible[:, None, :].expand(-1, block, -1),
             torch.ones(num_req, block, block, dtype=torch.bool, device=anchors.device)], -1
        )[:, None]  # [R, 1, K, S + K]
        h = self._run_blocks(block_ids, block_pos, table, mask)[:, :num]  # [R, n, d]
        base = d.lm_head(h)  # [R, n, V]
        markov = d.markov
        if markov is None or markov.kind == "vanilla":
            w1 = markov.w1.weight if markov is not None else None
            w2 = markov.w2.weight if markov is not None else None
            tokens, probs = markov_sample(base, anchors, w1, w2, temps, uniforms[:, :num])
        else:
            tokens, probs = self._sample_stateful(base, h, anchors, temps, uniforms)
        conf = None
        if d.confidence is not None:
            prev = torch.cat([anchors[:, None], tokens[:, :-1]], 1)  # [R, n]
            prev_embed = markov.w1(prev) if markov is not None else None
            conf = d.confidence(h, prev_embed)  # [R, n]
        return DraftOutput(tokens, probs, conf)

    def _run_blocks(self, block_ids, block_pos, table, mask) -> torch.Tensor:
        """The draft backbone over the blocks, with each layer's keys/values gathered from
        the paged cache straight into one buffer whose tail takes the block's own K/V (the
        same computation as ``ParallelDrafter.run_blocks`` without concatenating)."""
        d = self.drafter
        num_req, block = block_ids.shape
        width = table.shape[1]
        x = d.embed_tokens(block_ids)  # [R, K, d]
        cos, sin = d.rotary_emb(block_pos)
        for i, layer in enumerate(d.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_norm(attn.q_proj(h).view(num_req, block, attn.num_heads, attn.head_dim))
            q = apply_rope(q.transpose(1, 2), cos, sin)  # [R, H, K, hd]
            k, v = attn.project_kv(h, cos, sin)  # [R, kv, K, hd]
            keys = self._buffer("k", num_req, width + block, k)
            values = self._buffer("v", num_req, width + block, v)
            torch.index_select(self.kv.k[i], 0, table.reshape(-1),
                               out=self._flat("k", num_req, width))
            torch.index_select(self.kv.v[i], 0, table.reshape(-1),
                               out=self._flat("v", num_req, width))
            keys[:, :, :width] = self._flat("k", num_req, width).view(
                num_req, width, *k.shape[1:2], k.shape[-1]).transpose(1, 2)
            values[:, :, :width] = self._flat("v", num_req, width).view(
                num_req, width, *v.shape[1:2], v.shape[-1]).transpose(1, 2)
            keys[:, :, width:] = k
            values[:, :, width:] = v
            out = torch.nn.functional.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, enable_gqa=True
            )
            x = x + attn.o_proj(out.transpose(1, 2).reshape(num_req, block, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return d.norm(x)

    def _buffer(self, name, num_req, length, like) -> torch.Tensor:
        """A reusable [R, kv, length, hd] buffer (grown on demand)."""
        key = f"buf_{name}"
        shape = (num_req, like.shape[1], length, like.shape[-1])
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < math.prod(shape):
            buf = like.new_empty(math.prod(shape) * 2)
            self._buffers[key] = buf
        return buf[: math.prod(shape)].view(shape)

    def _flat(self, name, num_req, width) -> torch.Tensor:
        """A reusable [R * S, kv, hd] gather target."""
        key = f"flat_{name}"
        kv_shape = self.kv.k.shape[2:]
        numel = num_req * width * math.prod(kv_shape)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self.kv.k.new_empty(numel * 2)
            self._buffers[key] = buf
        return buf[:numel].view(num_req * width, *kv_shape)

    def _sample_stateful(self, base, h, anchors, temps, uniforms):
        """Gated and RNN Markov heads: the same loop through ``MarkovHead.step``."""
        markov, prev = self.drafter.markov, anchors
        state = markov.init_state(anchors.shape[0], h[:, 0])
        tokens, probs = [], []
        for k in range(base.shape[1]):
            bias, state = markov.step(prev, h[:, k], state)
            token, prob = sample_rows(base[:, k] + bias, temps, uniforms[:, k])
            tokens.append(token)
            probs.append(prob)
            prev = token
        return torch.stack(tokens, 1), torch.stack(probs, 1)

    def _propose_autoregressive(self, req_ids, context_lens, table, ctx_visible, num, temps,
                                uniforms):
        d = self.drafter
        h = torch.stack([self.last_h[r] for r in req_ids])  # [R, d]
        ctx_k, ctx_v = gather_kv(self.kv.k[0], table), gather_kv(self.kv.v[0], table)
        new_k, new_v = [], []
        tokens, probs = [], []
        for i in range(num):
            token, prob = sample_rows(d.logits(h), temps, uniforms[:, i])  # [R], [R, V]
            tokens.append(token)
            probs.append(prob)
            if i + 1 == num:
                break
            pos = (context_lens + i)[None]  # [1, R]: one new pair per request
            cos, sin = d.rotary_emb(pos)
            u = d.layer.attn_input(d.embed_tokens(token), h)  # [R, 2d]
            q, k, v = self._qkv(u, cos, sin)  # q [R, H, hd], k/v [R, kv, hd]
            new_k.append(k)
            new_v.append(v)
            keys = torch.cat([ctx_k, torch.stack(new_k, 2)], 2)  # [R, kv, S + i + 1, hd]
            values = torch.cat([ctx_v, torch.stack(new_v, 2)], 2)
            extra = torch.ones(h.shape[0], i + 1, dtype=torch.bool, device=h.device)
            mask = torch.cat([ctx_visible, extra], 1)[:, None, None, :]  # [R, 1, 1, S']
            out = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, None], keys, values, attn_mask=mask, enable_gqa=True
            )  # [R, H, 1, hd]
            h = d.layer.finish(h, d.layer.self_attn.o_proj(out.reshape(h.shape[0], -1)))
        return DraftOutput(torch.stack(tokens, 1), torch.stack(probs, 1), None)


def profile_draft_costs(
    worker: DraftWorker,
    num_requests: Sequence[int],
    context: int,
    num_tokens: int,
    num_blocks: int,
    repeats: int = 3,
) -> StepCostTable:
    """Drafting calls per second against the number of requests drafted for (median of
    ``repeats``). Like the verify profile, it must run before any request holds KV."""
    device = worker.drafter.lm_head.weight.device
    vocab = worker.config.vocab_size
    sizes, rates = [], []
    per_req = -(-(context + 1) // worker.block_size)
    for num in sorted(set(num_requests)):
        if num * per_req > num_blocks:
            break
        req_ids = [f"profile-{i}" for i in range(num)]
        for r in req_ids:
            worker.last_h[r] = torch.zeros(worker.config.hidden_size, device=device)
        tables = torch.arange(num * per_req, device=device).view(num, per_req)
        args = (
            req_ids,
            torch.randint(5, vocab, (num,), device=device),
            torch.full((num,), context, device=device),
            tables,
            num_tokens,
            torch.zeros(num, device=device),
            torch.zeros(num, worker.config.block_size, device=device),
        )
        worker.propose(*args)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            worker.propose(*args)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        for r in req_ids:
            worker.forget(r)
        sizes.append(num)
        rates.append(1.0 / sorted(times)[len(times) // 2])
    return StepCostTable(tuple(sizes), tuple(rates))
