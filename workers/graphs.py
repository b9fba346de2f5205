"""Verify forwards of fixed shape, replayed from CUDA graphs (``EngineConfig.cuda_graphs``).

On a GPU a decode or verify forward of a large MoE target costs its kernel launches, not
its arithmetic: one forward of a 5.1 B-parameter target took 26-30 ms eager and 3.8-7.5 ms
replayed from a captured graph at 1-64 tokens on an H200 (docs/engine.md, "GPU"). A graph
replays fixed shapes from fixed addresses, while the engine's verify batch changes every
step (its requests, their query rows, their context widths). So a batch is *padded to a
bucket* and run on static buffers:

- *bucket* ``(R, Q, W)``: R requests (the batch's, rounded up to ``REQUEST_BUCKETS``), Q
  query rows each (its longest run, rounded up to ``QUERY_BUCKETS``: 1 for a decode step,
  1 + ℓ with drafts), W blocks of context each (its widest, rounded up to a power of two);
- *padding rows*: a request's rows beyond its own run, and every row of a padding request.
  They write their keys and values to the *scratch block* (one block past the cache's
  ``num_blocks``, which the block manager never hands out), so no request's KV changes;
  every row sees key 0 of its table, so no attention row is empty; their outputs are
  dropped;
- the forward reads everything it needs from the static buffers (the tables, positions,
  key lengths, which rows are real): the layout is computed inside the graph, so a replay
  serves any batch of its bucket;
- the graph ends at the final normed hidden states: the LM head runs on the real rows
  after the replay (one product, and no [rows, vocabulary] output kept per bucket).

The routed experts must not sync with the host inside a capture: on a GPU the ``auto``
expert path runs the grouped products only where torch has their kernel (bf16 on sm90 and
sm100), and elsewhere dense experts while a graph is warmed up and captured
(``sync_free_experts``; eager forwards take the sparse path there). A capture that fails stops the engine with the bucket named:
torch's stream and allocator are not left fit to go on.

Only batches whose rows all yield logits qualify (decoding and verifying requests: no
prefill chunk, no prompt scoring); others, and buckets past ``max_graphs``, run eagerly.
On the CPU the same padded forward runs eagerly (``capture=False``): the tests check it
against the eager forward there, and the GPU check (``bench/gpu_check.sh``) the captured
one.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dspark.kernels.paged_attention import PagedLayout, paged_attention, slot_table
from dspark.models.target import sync_free_experts

logger = logging.getLogger(__name__)

REQUEST_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
QUERY_BUCKETS = (1, 2, 4, 8, 16)


def bucket(value: int, sizes) -> int | None:
    """The smallest size >= value (None: past the largest)."""
    return next((s for s in sizes if s >= value), None)


def bucket_sizes(max_requests: int, max_positions: int, block_size: int
                 ) -> tuple[list[int], list[int]]:
    """The request buckets up to one that holds ``max_requests``, and the context-block
    buckets (powers of two) up to ``max_positions``."""
    requests = [b for b in REQUEST_BUCKETS if b < max_requests] + [
        bucket(max_requests, REQUEST_BUCKETS) or max_requests]
    max_blocks = -(-max_positions // block_size)
    return requests, sorted({min(1 << i, max_blocks) for i in range(max_blocks.bit_length() + 1)})


@dataclass(frozen=True)
class Shape:
    """A bucket: requests, query rows per request, context blocks per request."""

    requests: int
    queries: int
    blocks: int

    @property
    def rows(self) -> int:
        return self.requests * self.queries


@contextmanager
def capture_errors(shape: Shape):
    """A capture that fails says which bucket and what to do. NOTE: not caught: a failed
    capture leaves torch's current stream and its allocator's capture state behind, so the
    process cannot go on with graphs (or safely without)."""
    try:
        yield
    except Exception as exc:
        raise RuntimeError(f"capturing a CUDA graph for {shape} failed ({exc}); serve "
                           "without cuda_graphs") from exc


class Bucketed:
    """What the padded runners share (``GraphedForward``, ``GraphedDrafting``): one graph
    per bucket, captured at its first call (``capture``; into one memory pool per runner)
    or none (eager), at most ``max_graphs``; ``_body(shape)`` is the padded call on the
    runner's static buffers."""

    label = "call"

    def __init__(self, capture: bool, max_graphs: int) -> None:
        self.capture, self.max_graphs = capture, max_graphs
        self.graphs: dict[Shape, tuple] = {}
        """Shape -> (graph or None, its outputs)."""
        self.pool = None
        self.replays = 0
        """Calls served padded (replayed or eager)."""

    def has_room(self, shape: Shape) -> bool:
        return shape in self.graphs or len(self.graphs) < self.max_graphs

    def run(self, shape: Shape) -> tuple:
        """The outputs of ``_body(shape)`` on what the static buffers hold now."""
        if shape not in self.graphs:
            self.graphs[shape] = self._build(shape)
        graph, outputs = self.graphs[shape]
        if graph is not None:
            graph.replay()
        else:
            outputs = self._body(shape)
        self.replays += 1
        return outputs

    def _body(self, shape: Shape) -> tuple:
        raise NotImplementedError

    def _build(self, shape: Shape) -> tuple:
        """The bucket's graph and its outputs (no graph: ``capture`` is off): two warm-up
        calls on a side stream (the weight copies, Triton's compiles, the allocator's
        pools), then the capture, which runs nothing (the caller replays it)."""
        if not self.capture:
            return None, None
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with sync_free_experts():
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._body(shape)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with capture_errors(shape), torch.cuda.graph(graph, pool=self.pool,
                                                         capture_error_mode="thread_local"):
                outputs = self._body(shape)
        logger.info("captured a CUDA graph of the %s for %s (%d graphs)", self.label, shape,
                    len(self.graphs) + 1)
        return graph, outputs


class StaticAttention:
    """The paged backend of one padded batch: each layer writes its rows' K/V to
    ``write_slots`` and attends through a uniform layout (every request ``Q`` rows)."""

    def __init__(self, kv, write_slots: torch.Tensor, layout: PagedLayout) -> None:
        self.kv, self.slots, self.layout = kv, write_slots, layout

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # q: [1, H, N, hd]; k, v: [1, kv_heads, N, hd] -> [1, H, N, hd]
        self.kv.write(layer_idx, self.slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
        out = paged_attention(q[0].transpose(0, 1), self.kv.k[layer_idx],
                              self.kv.v[layer_idx], self.layout)
        return out.transpose(1, 0)[None]


class StaticBuffers:
    """The inputs every bucket reads, allocated once at their largest: a bucket's views of
    them keep their addresses from replay to replay."""

    def __init__(self, max_requests: int, max_queries: int, max_blocks: int, device) -> None:
        rows = max_requests * max_queries
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)  # [rows]
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)  # [rows]
        self.real = torch.zeros(rows, dtype=torch.bool, device=device)  # [rows]
        self.tables = torch.zeros(max_requests, max_blocks, dtype=torch.long,
                                  device=device)  # [max_requests, max_blocks]
        self.seq_lens = torch.ones(max_requests, dtype=torch.long, device=device)


class GraphedForward(Bucketed):
    """Runs qualifying verify batches padded to their bucket (module docstring): replayed
    from a CUDA graph captured at the bucket's first batch (``capture``), or eagerly."""

    label = "target's forward"

    def __init__(self, runner, max_requests: int, capture: bool, max_graphs: int = 48) -> None:
        super().__init__(capture, max_graphs)
        cfg = runner.target.config
        self.runner = runner
        self.block_size = runner.block_size
        self.scratch_block = runner.scratch_block
        self.request_buckets, self.block_buckets = bucket_sizes(
            max_requests, cfg.max_position_embeddings, self.block_size)
        self.buffers = StaticBuffers(self.request_buckets[-1], QUERY_BUCKETS[-1],
                                     self.block_buckets[-1], runner.device)

    def shape(self, batch) -> Shape | None:
        """The bucket of ``batch`` (None: it runs eagerly)."""
        if not batch.all_logits or not batch.q_lens:
            return None
        requests = bucket(len(batch.q_lens), self.request_buckets)
        queries = bucket(max(batch.q_lens), QUERY_BUCKETS)
        blocks = bucket(-(-max(batch.key_lens) // self.block_size), self.block_buckets)
        if requests is None or queries is None or blocks is None:
            return None
        shape = Shape(requests, queries, blocks)
        return shape if self.has_room(shape) else None

    @torch.no_grad()
    def forward(self, batch) -> tuple | None:
        """(logits, hidden, features, slots) of ``batch``'s rows, as ``ModelRunner.forward``
        gives them; None when it does not qualify."""
        shape = self.shape(batch)
        if shape is None:
            return None
        dest = self._fill(batch, shape)  # [N] each real row's padded row
        hidden, features, slots = self.run(shape)
        hidden = hidden.index_select(0, dest)
        # NOTE: the LM head runs on the real rows after the replay: one product, and no
        # [rows, vocabulary] output kept per bucket
        return (self.runner.target.lm_head(hidden), hidden,
                None if features is None else features.index_select(0, dest),
                slots.index_select(0, dest))

    def _fill(self, batch, shape: Shape) -> torch.Tensor:
        """Copy ``batch`` into the static buffers, padded to ``shape``; returns the padded
        row of each real row ([N])."""
        buf, num_req, device = self.buffers, len(batch.q_lens), batch.input_ids.device
        rows = shape.rows
        if all(n == shape.queries for n in batch.q_lens):
            dest = torch.arange(batch.num_tokens, device=device)  # NOTE: already in place
        else:
            req_of = torch.repeat_interleave(
                torch.arange(num_req, device=device), batch.cu_q[1:] - batch.cu_q[:-1],
                output_size=batch.num_tokens)  # [N]
            col = torch.arange(batch.num_tokens, device=device) - batch.cu_q[:-1][req_of]
            dest = req_of * shape.queries + col
        buf.real[:rows].zero_()
        buf.real.index_fill_(0, dest, True)
        buf.input_ids[:rows].zero_()
        buf.input_ids.index_copy_(0, dest, batch.input_ids)
        buf.positions[:rows].zero_()
        buf.positions.index_copy_(0, dest, batch.positions)
        tables = buf.tables[: shape.requests, : shape.blocks]
        tables.fill_(self.scratch_block)
        width = min(shape.blocks, batch.block_tables.shape[1])
        tables[:num_req, :width].copy_(batch.block_tables[:, :width])
        buf.seq_lens[: shape.requests].fill_(1)
        buf.seq_lens[:num_req].copy_(batch.seq_lens)
        return dest

    def _body(self, shape: Shape):
        """The padded forward on the static buffers: (final normed hidden, features,
        write slots), one row per padded row; the logits are the caller's."""
        buf, bs, runner = self.buffers, self.block_size, self.runner
        rows, device = shape.rows, buf.input_ids.device
        positions = buf.positions[:rows]
        tables = buf.tables[: shape.requests, : shape.blocks]
        seq_lens = buf.seq_lens[: shape.requests]
        req_of = torch.arange(shape.requests, device=device).repeat_interleave(shape.queries)
        real_slots = tables[req_of, positions // bs] * bs + positions % bs
        write_slots = torch.where(buf.real[:rows], real_slots,
                                  torch.full_like(real_slots, self.scratch_block * bs))
        slots = slot_table(tables, shape.blocks * bs, bs)  # [R, S]
        keys = torch.arange(shape.blocks * bs, device=device)
        qpos = positions.view(shape.requests, shape.queries)
        visible = (keys <= qpos[..., None]) & (keys < seq_lens[:, None, None])  # [R, Q, S]
        col = torch.arange(shape.queries, device=device).repeat(shape.requests)
        layout = PagedLayout(slots, req_of, col, visible[:, None], True)
        out = runner.target(buf.input_ids[:rows][None], positions=positions[None],
                            feature_layers=runner.feature_layers, compute_logits=False,
                            attention=StaticAttention(runner.kv, write_slots, layout))
        features = out.layer_features[0] if runner.feature_layers else None
        return out.hidden_states[0], features, write_slots
