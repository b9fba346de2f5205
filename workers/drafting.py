"""Batched drafting for every drafter, with the drafter's own paged cache of context K/V.

Vocabulary:
- *context* of request r: the drafter's K/V of positions 0..n_r-1, where n_r is the
  request's committed token count; the drafter cache shares the target's block tables and
  slots, so a position's drafter K/V lives in the same slot as its target K/V.
- *extend*: after a step, write the drafter K/V of the positions the target just committed
  (their target features; for EAGLE-3 / MTP-1 each paired with the token that follows it).
- *propose*: draft up to n tokens after each request's anchor (the newest committed token),
  with the distribution each was drawn from and, for DSpark, the confidence logits.

The worker prepares inputs and attention backends and calls the drafter's one forward
(``ParallelDrafter.run_blocks`` / ``context_kv``, ``AutoregressiveDrafter.step``); it
copies no layer loop. Its backends: ``PagedContext`` (parallel drafting over the paged
cache), ``PagedAttention`` of the model runner (EAGLE-3 / MTP-1 extend) and ``DraftPairs``
(EAGLE-3 / MTP-1 drafting).

NOTE: only committed positions are ever written (rejected drafts never reach the drafter
cache), so a prefix-cached block's drafter K/V is valid for every request sharing it: the
K/V of a position depends only on the tokens up to it.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dspark.kernels.markov_sample import markov_sample
from dspark.kernels.paged_attention import gather_kv, slot_table
from dspark.models.autoregressive_drafter import AutoregressiveDrafter
from dspark.models.drafter_checkpoint import Drafter
from dspark.workers.deferred_rows import DeferredRows, PendingRows
from dspark.workers.model_runner import PagedAttention, PagedKV, token_slots
from dspark.workers.sampling import DraftNoise, draft_noise, draw_drafts
from dspark.workers.step import DraftProposal, SeqRows, StepSeq


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
    """Holds the drafter's paged cache; prepares extend and propose inputs per step.

    Parallel drafters (DSpark, DFlash) extend lazily when they know the requests' block
    ids (``block_ids``): committed rows, prompt rows included, wait with their target
    features until they are read (the request drafts, or another request reuses their
    blocks through the prefix cache) and are then written in one batched call
    (``DeferredRows``). A step in which nobody drafts then writes no drafter K/V, so it
    costs about what a plain step costs."""

    max_pending_rows = 512
    """Rows one live request may keep waiting (its features: rows x F floats)."""

    def __init__(self, drafter: Drafter, num_blocks: int, block_size: int,
                 block_ids: Callable[[str], list[int]] | None = None) -> None:
        """``block_ids``: a live request's block ids (the block manager's list)."""
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
        self.last_flush = (0, 0.0)
        """(rows, seconds) the last ``propose_step`` wrote before proposing."""
        self._buffers: dict[str, torch.Tensor] = {}
        self.lazy = not self.autoregressive and block_ids is not None
        # NOTE: parked rows sit in freed blocks, so they never outnumber the cache's slots
        self.rows = DeferredRows(block_size, self.max_pending_rows, num_blocks * block_size,
                                 block_ids or (lambda req_id: []))

    def ready(self, req_id: str) -> bool:
        """Can propose for this request (autoregressive drafters need its last output)."""
        return not self.autoregressive or req_id in self.last_h

    def forget(self, req_id: str) -> None:
        """A request leaves (finished, cancelled or preempted): its state is dropped, its
        deferred rows parked (its full blocks stay in the prefix cache)."""
        self.last_h.pop(req_id, None)
        self._write(self.rows.park(req_id))

    def reused(self, block_id: int) -> None:
        """The block manager takes ``block_id`` for other contents (``DeferredRows``)."""
        self._write(self.rows.reused(block_id))

    def share(self, req_id: str, block_ids: Sequence[int]) -> None:
        """``req_id`` reuses ``block_ids`` (its cached or computed prefix): their deferred
        rows are written before it drafts (with its own, ``flush``), not before."""
        self.rows.shared(req_id, block_ids)

    # ------------------------------------------------------------------ extend
    @torch.no_grad()
    def extend(self, batch: ExtendBatch) -> None:
        if not batch.req_ids:
            return
        d = self.drafter
        if not self.autoregressive:
            num_req = len(batch.req_ids)
            lens = batch.cu[1:] - batch.cu[:-1]  # [R]
            req_of = torch.repeat_interleave(torch.arange(num_req, device=lens.device), lens)
            slots = token_slots(batch.block_tables, req_of, batch.positions, self.block_size)
            ctx_kvs = d.context_kv(batch.features[None], batch.positions[None])
            for i, (k, v) in enumerate(ctx_kvs):  # [1, kv, N, hd] each
                self.kv.write(i, slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
            return
        seq_lens = batch.positions[batch.cu[1:] - 1] + 1  # [R]
        attention = PagedAttention(self.kv, batch.block_tables, batch.cu, batch.positions,
                                   seq_lens, batch.max_q)
        h0 = d.fc(batch.features[None].float())  # [1, N, d]
        h = d.step(h0, batch.next_ids[None], batch.positions[None], attention)  # [1, N, d]
        last = h[0, batch.cu[1:] - 1]  # [R, d]
        for r, req_id in enumerate(batch.req_ids):
            self.last_h[req_id] = last[r]

    # ------------------------------------------------------------------ a step
    def caps(self, decoding: Sequence[StepSeq], rooms: Sequence[int]) -> list[int]:
        """Drafts each decoding request could propose this step at most (0: it cannot
        draft): its lookahead room (``Scheduler.lookahead_room``) and its remaining
        max_tokens."""
        caps = []
        for s, room in zip(decoding, rooms):
            remaining = s.request.max_tokens - len(s.request.output_ids)
            # NOTE: a prefix-cache hit can leave a request decoding before the drafter has seen
            # any of its rows; it drafts from the next step on
            ready = self.ready(s.request.req_id)
            caps.append(max(0, min(room, remaining - 1)) if ready else 0)
        return caps

    @torch.no_grad()
    def propose_step(self, seqs: list[StepSeq], caps: list[int], tables: torch.Tensor
                     ) -> DraftProposal:
        """Draft up to ``caps[i]`` tokens for each of ``seqs`` (every cap >= 1), after
        writing their pending rows."""
        start = time.perf_counter()
        rows = self.flush([s.request.req_id for s in seqs])
        self.last_flush = (rows, time.perf_counter() - start)
        device, cfg = tables.device, self.config
        noise = draft_noise([s.state.sampling for s in seqs], [s.first_position for s in seqs],
                            cfg.block_size, cfg.vocab_size, device, max(caps))
        out = self.propose(
            [s.request.req_id for s in seqs],
            torch.tensor([s.known[0] for s in seqs], device=device),
            torch.tensor([s.start for s in seqs], device=device),
            tables.index_select(0, torch.tensor([s.row for s in seqs], device=device)),
            max(caps),
            torch.tensor([s.state.params.temperature for s in seqs], device=device),
            noise.uniforms,
            noise,
        )
        return DraftProposal(seqs, caps, out.tokens, out.probs, out.conf_logits)

    def extend_step(self, layout: list[SeqRows], new_tokens: dict[str, list[int]],
                    features: torch.Tensor, tables: torch.Tensor) -> None:
        """Write the drafter K/V of the positions committed this step (a lazy worker keeps
        decoding requests' rows pending instead)."""
        rows, next_ids, positions, cu, req_ids, table_rows = [], [], [], [0], [], []
        waiting: list[tuple[StepSeq, int, int]] = []  # (seq, first row, rows)
        offset = 0
        for lay in layout:
            s = lay.seq
            req = s.request
            new = new_tokens.get(req.req_id, [])
            if s.prefill:
                num = len(lay.fed)
                following = req.all_ids[s.start + 1 : s.start + num + 1] + new[:1]
            else:
                num, following = len(new), new
            if self.lazy:
                if num:
                    waiting.append((s, offset, num))
                offset += len(lay.fed)
                continue
            rows += range(offset, offset + num)
            next_ids += following[:num]
            positions += range(s.start, s.start + num)
            cu.append(len(rows))
            req_ids.append(req.req_id)
            table_rows.append(s.row)
            offset += len(lay.fed)
        dev = tables.device
        if req_ids:
            self.extend(ExtendBatch(
                req_ids=req_ids,
                features=features[torch.tensor(rows, device=dev)],
                next_ids=torch.tensor(next_ids, device=dev),
                positions=torch.tensor(positions, device=dev),
                cu=torch.tensor(cu, device=dev),
                block_tables=tables[torch.tensor(table_rows, device=dev)],
                max_q=max(b - a for a, b in zip(cu, cu[1:])),
            ))
        if waiting:
            self._keep_pending(waiting, features)

    def _keep_pending(self, waiting: list[tuple[StepSeq, int, int]], features: torch.Tensor
                      ) -> None:
        idx = torch.tensor([i for _, a, n in waiting for i in range(a, a + n)],
                           device=features.device)
        kept = features.index_select(0, idx)  # one copy; the verify output is not held
        full = []
        for (s, _, _), rows in zip(waiting, kept.split([n for _, _, n in waiting])):
            entry = self.rows.add(s.request.req_id, s.start, rows)
            if self.rows.full(entry):
                full.append(s.request.req_id)
        self.flush(full)

    def flush(self, req_ids: Sequence[str]) -> int:
        """Write the deferred rows of these live requests, and the rows of the blocks they
        reuse; returns the rows written."""
        return self._write(self.rows.take(req_ids))

    def owed(self, req_id: str) -> int:
        """Rows a proposal for this request would write first (``flush``)."""
        return self.rows.owed(req_id) if self.lazy else 0

    def _write(self, entries: list[PendingRows]) -> int:
        """Write deferred rows into the drafter cache, in one batched call; returns the
        rows written."""
        entries = [e for e in entries if e.count]
        if not entries:
            return 0
        dev = self.kv.k.device
        counts = [e.count for e in entries]
        cu = torch.tensor([0, *itertools.accumulate(counts)], device=dev)
        width = max(len(e.blocks) for e in entries)
        tables = torch.tensor([e.blocks + [0] * (width - len(e.blocks)) for e in entries],
                              device=dev)
        self.extend(ExtendBatch(
            req_ids=[e.req_id for e in entries],
            features=torch.cat([f for e in entries for f in e.features]),
            next_ids=torch.zeros(int(cu[-1]), dtype=torch.long, device=dev),  # unused
            positions=torch.cat([torch.arange(e.start, e.start + e.count, device=dev)
                                 for e in entries]),
            cu=cu,
            block_tables=tables,
            max_q=max(counts),
        ))
        return int(cu[-1])

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
        noise: DraftNoise | None = None,
    ) -> DraftOutput:
        """``noise``: coupled rows draw slot k as the Gumbel-max of their distribution under
        ``noise.gumbel[r, k]`` instead of inverting the CDF at ``uniforms[r, k]``."""
        width = int(context_lens.max())
        table = slot_table(block_tables, width, self.block_size)  # [R, S]
        ctx_visible = torch.arange(width, device=anchors.device)[None] < context_lens[:, None]
        if noise is not None and noise.gumbel is None:
            noise = None
        if self.autoregressive:
            return self._propose_autoregressive(
                req_ids, context_lens, table, ctx_visible, num_tokens, temperatures, uniforms,
                noise)
        return self._propose_parallel(
            anchors, context_lens, table, ctx_visible, num_tokens, temperatures, uniforms, noise
        )

    def _propose_parallel(self, anchors, context_lens, table, ctx_visible, num, temps, uniforms,
                          noise):
        d, cfg = self.drafter, self.config
        num_req, block = anchors.shape[0], cfg.block_size
        block_ids, block_pos = d.draft_blocks(anchors, context_lens)  # [R, K] each
        # queries see the context before their anchor and every slot of their block
        mask = torch.cat(
            [ctx_visible[:, None, :].expand(-1, block, -1),
             torch.ones(num_req, block, block, dtype=torch.bool, device=anchors.device)], -1
        )[:, None]  # [R, 1, K, S + K]
        context = PagedContext(self.kv, table, mask, self._buffers)
        h = d.run_blocks(block_ids, block_pos, context)[:, :num]  # [R, n, d]
        base = d.lm_head(h)  # [R, n, V]
        markov = d.markov
        if noise is None and (markov is None or markov.kind == "vanilla"):
            w1 = markov.w1.weight if markov is not None else None
            w2 = markov.w2.weight if markov is not None else None
            tokens, probs = markov_sample(base, anchors, w1, w2, temps, uniforms[:, :num])
        else:
            tokens, probs = self._sample_stateful(base, h, anchors, temps, uniforms, noise)
        conf = None
        if d.confidence is not None:
            prev = torch.cat([anchors[:, None], tokens[:, :-1]], 1)  # [R, n]
            prev_embed = markov.w1(prev) if markov is not None else None
            conf = d.confidence(h, prev_embed)  # [R, n]
        return DraftOutput(tokens, probs, conf)

    def _sample_stateful(self, base, h, anchors, temps, uniforms, noise=None):
        """Gated and RNN Markov heads, and any head with coupled rows: the slot-by-slot loop
        through ``MarkovHead.step`` (no bias without a Markov head)."""
        markov, prev = self.drafter.markov, anchors
        state = markov.init_state(anchors.shape[0], h[:, 0]) if markov is not None else None
        tokens, probs = [], []
        for k in range(base.shape[1]):
            logits = base[:, k]
            if markov is not None:
                bias, state = markov.step(prev, h[:, k], state)
                logits = logits + bias
            token, prob = draw_drafts(logits, temps, uniforms[:, k], noise, k)
            tokens.append(token)
            probs.append(prob)
            prev = token
        return torch.stack(tokens, 1), torch.stack(probs, 1)

    def _propose_autoregressive(self, req_ids, context_lens, table, ctx_visible, num, temps,
                                uniforms, noise):
        d = self.drafter
        h = torch.stack([self.last_h[r] for r in req_ids])  # [R, d]
        attention = DraftPairs(gather_kv(self.kv.k[0], table), gather_kv(self.kv.v[0], table),
                               ctx_visible)
        tokens, probs = [], []
        for i in range(num):
            token, prob = draw_drafts(d.logits(h), temps, uniforms[:, i], noise, i)
            tokens.append(token)
            probs.append(prob)
            if i + 1 == num:
                break
            pos = (context_lens + i)[:, None]  # [R, 1]: one new pair per request
            h = d.step(h[:, None], token[:, None], pos, attention)[:, 0]  # [R, d]
        return DraftOutput(torch.stack(tokens, 1), torch.stack(probs, 1), None)


class PagedContext:
    """The parallel drafter's attention backend over the paged drafter cache: each layer's
    context K/V are gathered from the cache straight into one reusable buffer whose tail
    takes the block's own K/V (no concatenation, no allocation per layer); ``mask`` decides
    visibility. Block K/V are never written to the cache."""

    def __init__(
        self,
        kv: PagedKV,
        table: torch.Tensor,  # [R, S] slot of each context position
        mask: torch.Tensor,  # [R, 1, K, S + K] bool, True = visible
        buffers: dict[str, torch.Tensor],  # reused across calls (grown on demand)
    ) -> None:
        self.kv, self.table, self.mask, self.buffers = kv, table, mask, buffers

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # q: [R, H, K, hd]; k, v: [R, kv, K, hd] of the blocks -> [R, H, K, hd]
        num_req, width = self.table.shape
        keys = self._buffer("k", width + k.shape[2], k)  # [R, kv, S + K, hd]
        values = self._buffer("v", width + k.shape[2], v)
        for name, cache, out in (("k", self.kv.k, keys), ("v", self.kv.v, values)):
            flat = self._flat(name, num_req * width)  # [R * S, kv, hd]
            torch.index_select(cache[layer_idx], 0, self.table.reshape(-1), out=flat)
            out[:, :, :width] = flat.view(num_req, width, *flat.shape[1:]).transpose(1, 2)
        keys[:, :, width:] = k
        values[:, :, width:] = v
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask,
                                              enable_gqa=True)

    def _buffer(self, name: str, length: int, like: torch.Tensor) -> torch.Tensor:
        """A reusable [R, kv, length, hd] buffer."""
        shape = (like.shape[0], like.shape[1], length, like.shape[-1])
        return self._reuse(f"buf_{name}", math.prod(shape), like).view(shape)

    def _flat(self, name: str, rows: int) -> torch.Tensor:
        """A reusable [rows, kv, hd] gather target."""
        kv_shape = self.kv.k.shape[2:]
        return self._reuse(f"flat_{name}", rows * math.prod(kv_shape), self.kv.k).view(
            rows, *kv_shape)

    def _reuse(self, key: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = like.new_empty(numel * 2)
            self.buffers[key] = buf
        return buf[:numel]


class DraftPairs:
    """The autoregressive drafter's attention backend while drafting: one new pair per
    request per call sees its request's context (gathered once) and the pairs drafted
    before it. Drafts' K/V stay here: they are never written to the paged cache."""

    def __init__(
        self,
        ctx_k: torch.Tensor,  # [R, kv, S, hd]
        ctx_v: torch.Tensor,  # [R, kv, S, hd]
        ctx_visible: torch.Tensor,  # [R, S] bool, False past a request's context
    ) -> None:
        self.keys, self.values, self.visible = ctx_k, ctx_v, ctx_visible

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # q: [R, H, 1, hd]; k, v: [R, kv, 1, hd] -> [R, H, 1, hd]
        self.keys = torch.cat([self.keys, k], 2)  # [R, kv, S + i + 1, hd]
        self.values = torch.cat([self.values, v], 2)
        extra = torch.ones(q.shape[0], 1, dtype=torch.bool, device=q.device)
        self.visible = torch.cat([self.visible, extra], 1)  # [R, S + i + 1]
        return F.scaled_dot_product_attention(
            q, self.keys, self.values, attn_mask=self.visible[:, None, None, :], enable_gqa=True
        )
