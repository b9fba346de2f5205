"""The target features of every KV slot, kept until the drafter reads them.

A parallel drafter (DSpark, DFlash) reads the drafter K/V of a request's committed
positions only when it drafts for that request. Writing them costs the drafter's feature
projection for every row of every prompt and every committed token, which a step would pay
even when nobody drafts. So the drafter K/V is written late, from features kept here:

- every verify forward stores the features of all its fed rows at their KV slots (one
  copy per step, whatever the number of requests; the slots are the target K/V's own) and
  marks those slots unwritten;
- before the drafter drafts for some requests, the unwritten slots of their context are
  found with one mask over their slot tables, projected in one batched call and marked
  written (``DraftWorker.flush``).

A slot's features follow its target K/V: both are written by the forward that feeds the
position, and a position a request reads is one it (or the request whose cached block it
reuses) committed, so its features and its written flag belong to the tokens there. Rows of
rejected drafts are stored too (the forward fed them) and marked unwritten; the position is
fed again when it is committed, before any request reads it. A block reused for other
contents needs nothing: its new owner feeds every position it reads, which resets the flag.
A prefix-cache hit reads a block another request filled: its features are the ones that
request stored, written or not.

No Python work per request per step: a step in which nobody drafts costs one copy.
"""

from __future__ import annotations

import torch

from dspark.kernels.paged_attention import slot_table
from dspark.kernels.transfer import device_tensor


class SlotFeatures:
    def __init__(self, num_slots: int, feature_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.features = torch.zeros(num_slots, feature_dim, dtype=dtype, device=device)
        self.written = torch.zeros(num_slots, dtype=torch.bool, device=device)
        """The drafter K/V at this slot holds the projection of its features."""

    def store(self, slots: torch.Tensor, features: torch.Tensor) -> None:
        """The features [N, F] of a forward's fed rows at their slots [N]."""
        self.features.index_copy_(0, slots, features.to(self.features.dtype))
        self.written.index_fill_(0, slots, False)

    def unwritten(self, block_tables: torch.Tensor, context_lens: torch.Tensor,
                  block_size: int, width: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The slots and positions [M] of the context rows (positions < context_lens[r] of
        each request's table [R, max_blocks]) whose drafter K/V is not written, request by
        request in position order, and how many of them each request has [R]. A slot two
        requests share (a cached block) is listed once per request. ``width``: the longest
        context where the caller knows it (else it is read back: a sync on a GPU)."""
        if width is None:
            width = int(context_lens.max()) if context_lens.numel() else 0
        if width == 0:
            empty = torch.zeros(0, dtype=torch.long, device=self.written.device)
            return empty, empty, torch.zeros_like(context_lens)
        grid = slot_table(block_tables, width, block_size)  # [R, S]
        pos = torch.arange(width, device=grid.device)
        need = (pos[None] < context_lens[:, None]) & ~self.written[grid]
        rows, positions = need.nonzero(as_tuple=True)
        return grid[rows, positions], positions, need.sum(1)

    def mark_written(self, slots: torch.Tensor) -> None:
        self.written[slots] = True

    def leading_written(self, block_ids: list[int], block_size: int) -> int:
        """Positions from 0 whose drafter K/V is written in these blocks (a request's
        prefix-cache hits, in order)."""
        if not block_ids:
            return 0
        flags = self.written[slot_table(device_tensor([block_ids], self.written.device),
                                        len(block_ids) * block_size, block_size)[0]]
        # NOTE: the first unwritten position (argmax: the first maximum), else the count;
        # one read-back (a sync on a GPU)
        return int(torch.cat([~flags, flags.new_ones(1)]).int().argmax())
