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
cache), ``LastPairsAttention`` of the model runner (EAGLE-3 / MTP-1 extend) and ``DraftPairs``
(EAGLE-3 / MTP-1 drafting).

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
import torch.nn.functional as F

from dspark.kernels.attention import attention
from dspark.kernels.markov_sample import markov_sample
from dspark.kernels.paged_attention import gather_kv, slot_table
from dspark.kernels.transfer import device_tensor
from dspark.models.autoregressive_drafter import AutoregressiveDrafter
from dspark.models.drafter_checkpoint import Drafter
from dspark.models.linear import linear
from dspark.workers.draft_graphs import GraphedDrafting
from dspark.workers.draft_vocab import DraftVocab
from dspark.workers.model_runner import LastPairsAttention, PagedKV, token_slots
from dspark.workers.sampling import DraftNoise, draft_noise, draw_drafts
from dspark.workers.slot_features import SlotFeatures
from dspark.workers.step import DraftProposal, SeqRows, StepSeq


@dataclass
class DraftOutput:
    tokens: torch.Tensor  # [R, n]
    probs: torch.Tensor  # [R, n, V] draft distribution of each token ([R, n, N] over vocab)
    conf_logits: torch.Tensor | None  # [R, n] raw confidence logits (DSpark), else None
    vocab: DraftVocab | None = None
    """The draft vocabulary ``probs`` is over (None: the whole vocabulary)."""


@dataclass
class ExtendBatch:
    """Committed rows to write into the drafter cache, grouped per request."""

    req_ids: list[str]
    features: torch.Tensor  # [N, F]
    next_ids: torch.Tensor  # [N] the token after each row's position
    positions: torch.Tensor  # [N]
    cu: torch.Tensor  # [R + 1]
    block_tables: torch.Tensor  # [R, max_blocks]
    q_lens: list[int]  # [R] rows of each request, on the host


class DraftWorker:
    """Holds the drafter's paged cache; prepares extend and propose inputs per step.

    Every drafter extends lazily in the engine (``lazy``): every fed row's target features
    are stored at its KV slot, and a request's unwritten context rows, prompt rows
    included, are written in one batched call when it drafts (``SlotFeatures``). A step in
    which nobody drafts then writes no drafter K/V and does no work per request, so it
    costs about what a plain step costs. An autoregressive drafter's (EAGLE-3, MTP-1) write
    is its layer over the unwritten pairs, which also gives the hidden its drafts start
    from; its pair before the anchor is run again whenever it drafts (``flush``)."""

    def __init__(self, drafter: Drafter, num_blocks: int, block_size: int,
                 lazy: bool = False, vocab: int = 0) -> None:
        """``lazy``: the drafter's rows are written when read (``SlotFeatures``); else
        every committed row is written at once. ``vocab``: a parallel drafter drafts
        among this many of its ranking's tokens (``DraftVocab``; 0: all)."""
        cfg = drafter.config
        self.drafter, self.config, self.block_size = drafter, cfg, block_size
        self.autoregressive = isinstance(drafter, AutoregressiveDrafter)
        self.from_hidden = cfg.method == "mtp"
        """It reads the target's final normed hidden (MTP-1), not feature layers."""
        self.vocab = None if self.autoregressive else DraftVocab.of(drafter, vocab)
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
        self.graphs: GraphedDrafting | None = None
        """Proposals padded to buckets (``enable_graphs``); None: all eager."""
        self.lazy = lazy
        self.slots = SlotFeatures(num_blocks * block_size, cfg.feature_dim, param.dtype,
                                  param.device) if lazy else None
        self.upto: dict[str, int | list[int]] = {}
        """Positions of each live request known written (its context when it last drafted,
        or its leading prefix-cache hits; their block ids until counted); what it owes is
        counted from there."""

    def ready(self, req_id: str) -> bool:
        """Can propose for this request (an autoregressive drafter that writes at once
        needs its last output; a lazy one computes it when it drafts)."""
        return self.lazy or not self.autoregressive or req_id in self.last_h

    def features_of(self, features: torch.Tensor | None, hidden: torch.Tensor
                    ) -> torch.Tensor:
        """What this drafter reads of a verify forward's rows (``RunnerOutput``'s
        ``features`` and ``hidden``)."""
        return hidden if self.from_hidden else features

    def forget(self, req_id: str) -> None:
        """A request leaves (finished, cancelled or preempted): its state is dropped (its
        stored features stay with its blocks, which may stay in the prefix cache)."""
        self.last_h.pop(req_id, None)
        self.upto.pop(req_id, None)

    def admit(self, preempted: Sequence[str], admitted: Sequence[str], blocks) -> None:
        """After the scheduler: preempted requests leave (their blocks may stay cached);
        an admitted request starts on its prefix-cache hits (``blocks``: the block
        manager), whose unwritten rows are written when it first drafts, which a full hit
        allows in this very step (``flush``)."""
        for req_id in preempted:
            self.forget(req_id)
        for req_id in admitted:
            table = blocks.table(req_id)
            if table.num_committed >= blocks.block_size:
                self.share(req_id, table.block_ids[: table.num_committed // blocks.block_size])

    def share(self, req_id: str, block_ids: list[int]) -> None:
        """``req_id`` starts on ``block_ids`` (its prefix-cache hits): the rows written
        there count as written for it (counted when first asked, ``owed``)."""
        if self.lazy:
            self.upto[req_id] = block_ids

    # ------------------------------------------------------------------ extend
    @torch.no_grad()
    def extend(self, batch: ExtendBatch) -> None:
        if not batch.req_ids:
            return
        d = self.drafter
        if not self.autoregressive:
            num_req = len(batch.req_ids)
            lens = batch.cu[1:] - batch.cu[:-1]  # [R]
            req_of = torch.repeat_interleave(torch.arange(num_req, device=lens.device), lens,
                                             output_size=sum(batch.q_lens))
            slots = token_slots(batch.block_tables, req_of, batch.positions, self.block_size)
            self._write_context(batch.features, batch.positions, slots)
            return
        seq_lens = batch.positions[batch.cu[1:] - 1] + 1  # [R]
        # NOTE: every pair writes its K/V; only each request's last pair's output is read
        # (its drafts start from it), so only that pair queries and runs the MLP
        attention = LastPairsAttention(self.kv, batch.block_tables, batch.cu, batch.positions,
                                       seq_lens, batch.q_lens)
        h0 = d.fc(batch.features[None].float())  # [1, N, d]
        last = d.step(h0, batch.next_ids[None], batch.positions[None], attention,
                      attention.last)[0]  # [R, d]
        for r, req_id in enumerate(batch.req_ids):
            self.last_h[req_id] = last[r]

    # ------------------------------------------------------------------ a step
    def caps(self, decoding: Sequence[StepSeq], rooms: Sequence[int]) -> list[int]:
        """Drafts each decoding request could propose this step at most (0: it cannot
        draft): its lookahead room (``Scheduler.lookahead_room``), its remaining
        max_tokens, and the drafter's block."""
        caps, block = [], self.config.block_size
        for s, room in zip(decoding, rooms):
            remaining = s.request.max_tokens - len(s.request.output_ids)
            # NOTE: a prefix-cache hit can leave a request decoding before the drafter has seen
            # any of its rows; it drafts from the next step on
            ready = self.ready(s.request.req_id)
            caps.append(max(0, min(room, remaining - 1, block)) if ready else 0)
        return caps

    @torch.no_grad()
    def propose_step(self, seqs: list[StepSeq], caps: list[int], tables: torch.Tensor
                     ) -> DraftProposal:
        """Draft up to ``caps[i]`` tokens for each of ``seqs`` (every cap >= 1), after
        writing their pending rows."""
        start = time.perf_counter()
        rows = self.flush(seqs, tables)
        self.last_flush = (rows, time.perf_counter() - start)
        device, cfg = tables.device, self.config
        noise = draft_noise([s.state.sampling for s in seqs], [s.first_position for s in seqs],
                            cfg.block_size, cfg.vocab_size, device, max(caps))
        args = (device_tensor([s.known[0] for s in seqs], device),
                device_tensor([s.start for s in seqs], device),
                tables.index_select(0, device_tensor([s.row for s in seqs], device)),
                max(caps),
                device_tensor([s.state.params.temperature for s in seqs], device),
                noise.uniforms, noise)
        longest = max(s.start for s in seqs)
        padded = self.graphs.propose(longest, *args) if self.graphs else None
        out = (DraftOutput(*padded, self.vocab) if padded is not None
               else self.propose([s.request.req_id for s in seqs], *args, longest=longest))
        return DraftProposal(seqs, caps, out.tokens, out.probs, out.conf_logits, out.vocab)

    def enable_graphs(self, max_requests: int, capture: bool) -> None:
        """A parallel drafter's calls padded to buckets (``GraphedDrafting``): replayed
        from CUDA graphs (``capture``) or eagerly; an autoregressive one stays eager."""
        if not self.autoregressive:
            self.graphs = GraphedDrafting(self, max_requests, capture)

    def extend_step(self, layout: list[SeqRows], new_tokens: dict[str, list[int]],
                    features: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor
                    ) -> None:
        """After the verify forward (its fed rows' ``features`` and ``slots``): a lazy
        worker stores the features (``SlotFeatures``); else the drafter K/V of the
        positions committed this step is written."""
        if self.lazy:
            self.slots.store(slots, features)
            return
        rows, next_ids, positions, cu, req_ids, table_rows = [], [], [], [0], [], []
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
                features=features[device_tensor(rows, dev, torch.long)],
                next_ids=device_tensor(next_ids, dev, torch.long),
                positions=device_tensor(positions, dev, torch.long),
                cu=device_tensor(cu, dev),
                block_tables=tables[device_tensor(table_rows, dev)],
                q_lens=[b - a for a, b in zip(cu, cu[1:])],
            ))

    def flush(self, seqs: Sequence[StepSeq], tables: torch.Tensor) -> int:
        """Write the unwritten context rows of these requests (a lazy worker; ``tables``:
        the step's block tables) in one batched call; returns the rows written."""
        if not self.lazy or not seqs:
            return 0
        dev = tables.device
        rows = tables.index_select(0, device_tensor([s.row for s in seqs], dev))
        starts = device_tensor([s.start for s in seqs], dev)
        if self.autoregressive:
            # NOTE: the pair before the anchor is run whatever its flag: its output is the
            # hidden this request's drafts start from
            last = token_slots(rows, torch.arange(len(seqs), device=dev), starts - 1,
                               self.block_size)
            self.slots.written.index_fill_(0, last, False)
        slots, positions, counts = self.slots.unwritten(rows, starts, self.block_size,
                                                         max(s.start for s in seqs))
        for s in seqs:
            self.upto[s.request.req_id] = s.start
        num = slots.numel()
        if num and self.autoregressive:
            self._write_pairs(seqs, slots, positions, counts, rows)
        elif num:
            self._write_context(self.slots.features[slots], positions, slots)
        if num:
            self.slots.mark_written(slots)
        return num

    def _write_pairs(self, seqs: Sequence[StepSeq], slots: torch.Tensor,
                     positions: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor
                     ) -> None:
        """An autoregressive drafter's unwritten pairs (each position's stored features
        with the committed token after it), request by request in position order, through
        its layer (``extend``), which leaves each request's last output in ``last_h``."""
        pos, per = positions.tolist(), counts.tolist()
        next_ids, at = [], 0
        for s, n in zip(seqs, per):
            ids = s.request.all_ids
            next_ids += [ids[p + 1] for p in pos[at : at + n]]
            at += n
        dev = rows.device
        self.extend(ExtendBatch(
            req_ids=[s.request.req_id for s in seqs],
            features=self.slots.features[slots],
            next_ids=device_tensor(next_ids, dev, torch.long),
            positions=positions,
            cu=F.pad(counts.cumsum(0), (1, 0)),
            block_tables=rows,
            q_lens=list(per),
        ))

    def _write_context(self, features: torch.Tensor, positions: torch.Tensor,
                       slots: torch.Tensor) -> None:
        """A parallel drafter's context K/V of rows [N] (their target features, positions
        and slots) into its cache, in one call."""
        k, v = self.drafter.context_kv_stacked(features[None], positions[None])
        self.kv.write_layers(slots, k[:, 0].transpose(1, 2), v[:, 0].transpose(1, 2))

    def owed(self, req_id: str, context: int) -> int:
        """Rows a proposal for this request would write first (``flush``), as its record
        says (its context is ``context`` positions)."""
        if not self.lazy:
            return 0
        upto = self.upto.get(req_id, 0)
        if isinstance(upto, list):
            upto = self.upto[req_id] = self.slots.leading_written(upto, self.block_size)
        return max(0, context - upto)

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
        longest: int | None = None,
    ) -> DraftOutput:
        """``noise``: coupled rows draw slot k as the Gumbel-max of their distribution under
        ``noise.gumbel[r, k]`` instead of inverting the CDF at ``uniforms[r, k]``;
        ``longest``: ``context_lens.max()`` where the caller knows it (no read-back)."""
        width = int(context_lens.max()) if longest is None else longest
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
                          noise, buffers=None):
        """``buffers``: the attention's reused buffers (None: the worker's; a captured
        graph brings its own, and then nothing is taken from a cache between calls)."""
        d, cfg = self.drafter, self.config
        num_req, block = anchors.shape[0], cfg.block_size
        block_ids, block_pos = d.draft_blocks(anchors, context_lens)  # [R, K] each
        # queries see the context before their anchor and every slot of their block
        mask = torch.cat(
            [ctx_visible[:, None, :].expand(-1, block, -1),
             torch.ones(num_req, block, block, dtype=torch.bool, device=anchors.device)], -1
        )[:, None]  # [R, 1, K, S + K]
        context = PagedContext(self.kv, table, mask,
                               self._buffers if buffers is None else buffers)
        # NOTE: the whole block is the trained one (a slot's hidden sees every slot of its
        # block); the last layer's queries are the ``num`` slots drafted (``rows``)
        h = d.run_blocks(block_ids, block_pos, context, num if num < block else None)
        markov, vocab = d.markov, None
        if noise is None and (markov is None or markov.kind == "vanilla"):
            vocab, prev = self.vocab, anchors
            if vocab is not None:  # NOTE: slots draft among the draft vocabulary only
                logits, w2 = linear(h, vocab.head), vocab.w2
                w1, prev = (vocab.markov_rows(anchors, fresh=buffers is not None)
                            if markov is not None else (None, prev))
            else:
                logits = d.lm_head(h)
                w1 = markov.w1.weight if markov is not None else None
                w2 = markov.w2.weight if markov is not None else None
            tokens, probs = markov_sample(logits, prev, w1, w2, temps, uniforms[:, :num])
            if vocab is not None:
                tokens = vocab.ids[tokens]
        else:
            tokens, probs = self._sample_stateful(d.lm_head(h), h, anchors, temps, uniforms,
                                                  noise)
        conf = None
        if d.confidence is not None:
            prev = torch.cat([anchors[:, None], tokens[:, :-1]], 1)  # [R, n]
            prev_embed = markov.w1(prev) if markov is not None else None
            conf = d.confidence(h, prev_embed)  # [R, n]
        return DraftOutput(tokens, probs, conf, vocab)

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
        return attention(q, keys, values, self.mask[:, :, : q.shape[2]])

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
