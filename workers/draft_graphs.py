"""A parallel drafter's call of fixed shape, replayed from CUDA graphs
(``EngineConfig.cuda_graphs``; the target's forwards: ``workers/graphs.py``).

A DSpark or DFlash drafting call is many small kernels (its backbone layers over one block
per request, the context gathered from its paged cache, the LM head, the Markov head's
loop over the slots, the confidence head), so on a GPU it costs its launches, as the
target's forward does. It is padded to a bucket ``(R, 1, W)`` (``graphs.Shape``: R
requests, W context blocks each) and run on static buffers:

- every call drafts the whole block (γ slots) and the caller keeps the first ``num``: the
  same tokens, distributions and confidences (the backbone's last layer gives a slot the
  same hidden whether or not later slots run, and the Markov loop draws slot k from the
  slots before it only);
- padding requests draft from token 0 with no context (their own block only) and are
  dropped; the drafter's cache is only read;
- the context width is the bucket's (its masks hide what lies past each request's
  context), so no host read of the longest context is needed (the eager call reads it).

Only calls without coupled (seeded) requests and with the vanilla or no Markov head
qualify; the attention's buffers and the draft vocabulary's Markov rows are the graph's own
(``DraftWorker._propose_parallel``'s ``buffers``). Its graphs have their own memory pool
(the target's replays never write it), and its outputs are copied out before its next
replay can.
"""

from __future__ import annotations

import torch

from dspark.kernels.paged_attention import slot_table
from dspark.workers.graphs import Bucketed, Shape, bucket, bucket_sizes


class GraphedDrafting(Bucketed):
    """Proposals of a parallel ``DraftWorker`` padded to buckets (module docstring):
    replayed from a CUDA graph captured at a bucket's first call (``capture``), or
    eagerly."""

    label = "drafter's call"

    def __init__(self, worker, max_requests: int, capture: bool, max_graphs: int = 32) -> None:
        super().__init__(capture, max_graphs)
        cfg = worker.config
        self.worker = worker
        self.block_size, self.slots = worker.block_size, cfg.block_size
        self.request_buckets, self.block_buckets = bucket_sizes(
            max_requests, cfg.max_position_embeddings, self.block_size)
        markov = worker.drafter.markov
        self.eligible_head = markov is None or markov.kind == "vanilla"
        device, most = worker.kv.k.device, self.request_buckets[-1]
        self.anchors = torch.zeros(most, dtype=torch.long, device=device)  # [most]
        self.context_lens = torch.zeros(most, dtype=torch.long, device=device)  # [most]
        self.tables = torch.zeros(most, self.block_buckets[-1], dtype=torch.long,
                                  device=device)  # [most, max_blocks]
        self.temps = torch.ones(most, device=device)  # [most]
        self.uniforms = torch.full((most, self.slots), 0.5, device=device)  # [most, K]

    def shape(self, num_req: int, longest: int, noise) -> Shape | None:
        """The bucket of a call for ``num_req`` requests whose longest context is
        ``longest`` positions (None: it runs eagerly)."""
        if not self.eligible_head or (noise is not None and noise.gumbel is not None):
            return None
        requests = bucket(num_req, self.request_buckets)
        blocks = bucket(max(1, -(-longest // self.block_size)), self.block_buckets)
        if requests is None or blocks is None:
            return None
        shape = Shape(requests, 1, blocks)
        return shape if self.has_room(shape) else None

    @torch.no_grad()
    def propose(self, longest: int, anchors, context_lens, block_tables, num: int, temps,
                uniforms, noise) -> tuple | None:
        """(tokens [R, num], probs [R, num, N], confidence logits [R, num] or None) of
        ``DraftWorker.propose``'s arguments; None when the call does not qualify."""
        num_req = anchors.shape[0]
        shape = self.shape(num_req, longest, noise)
        if shape is None:
            return None
        self._fill(shape, anchors, context_lens, block_tables, temps, uniforms)
        tokens, probs, conf = self.run(shape)
        return (tokens[:num_req, :num].clone(), probs[:num_req, :num].clone(),
                None if conf is None else conf[:num_req, :num].clone())

    def _fill(self, shape: Shape, anchors, context_lens, block_tables, temps, uniforms) -> None:
        num_req, rows = anchors.shape[0], shape.requests
        self.anchors[:rows].zero_()
        self.anchors[:num_req].copy_(anchors)
        self.context_lens[:rows].zero_()
        self.context_lens[:num_req].copy_(context_lens)
        tables = self.tables[:rows, : shape.blocks]
        tables.zero_()
        width = min(shape.blocks, block_tables.shape[1])
        tables[:num_req, :width].copy_(block_tables[:, :width])
        self.temps[:rows].fill_(1.0)
        self.temps[:num_req].copy_(temps)
        self.uniforms[:rows].fill_(0.5)
        self.uniforms[:num_req, : uniforms.shape[1]].copy_(uniforms)

    def _body(self, shape: Shape) -> tuple:
        """The padded call on the static buffers: (tokens [R, K], probs [R, K, N],
        confidence logits [R, K] or None) for every padded request."""
        rows, width = shape.requests, shape.blocks * self.block_size
        context_lens = self.context_lens[:rows]
        table = slot_table(self.tables[:rows, : shape.blocks], width, self.block_size)
        visible = torch.arange(width, device=table.device)[None] < context_lens[:, None]
        out = self.worker._propose_parallel(
            self.anchors[:rows], context_lens, table, visible, self.slots, self.temps[:rows],
            self.uniforms[:rows], None, buffers={})
        return out.tokens, out.probs, out.conf_logits
