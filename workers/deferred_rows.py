"""Deferred drafter-cache rows: which committed rows have target features kept but no
drafter K/V written yet, and when they must be written (no tensors are computed here; the
draft worker writes what this returns).

A parallel drafter (DSpark, DFlash) reads the drafter K/V of a request's committed
positions only when it drafts for that request. Writing them costs the drafter's feature
projection for every row of every prompt and every committed token, which a step pays even
when nobody drafts. So rows are deferred:

- *pending*: a live request's rows wait, with their features, until it drafts (all its
  rows are written first) or has ``max_pending`` rows waiting;
- *parked*: when a request finishes, is cancelled or is preempted, its pending rows are
  parked instead of written. Its full blocks stay in the prefix cache, so another request
  may reuse them: a request that reuses a block needs the block's rows (``shared``), and
  they are written with its own when it first drafts (``take``; a request that never
  drafts writes none). A block's rows are dropped when the block is taken for other
  contents (``reused``: no later request can reach it or the blocks after it through the
  prefix cache; the rows of its later blocks stay parked). At most ``max_parked`` rows
  stay parked; the oldest are written beyond that.

The invariant: a block that a request reads through the prefix cache has its drafter K/V
written before the request drafts. Pending or parked rows are attached to the blocks that
hold them (``owners``), so one lookup per reused block finds them. A block a live request
holds is never taken for other contents, so the rows it needs stay attached until it
drafts or they are written (spilled, or taken by another request).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(eq=False)
class PendingRows:
    """Consecutive committed rows of one request with no drafter K/V yet (compared by
    identity: a preempted request's parked rows and its readmission's rows are two)."""

    req_id: str
    features: list[torch.Tensor]  # [n_i, F] per step
    start: int
    """Position of the first row."""
    blocks: list[int]
    """The request's block ids: the block manager's own list, which outlives the request."""
    count: int = 0

    def cut(self, rows: int) -> None:
        """Keep the first ``rows`` rows."""
        self.features = rows_between(self.features, 0, rows)
        self.count = rows


def rows_between(features: list[torch.Tensor], start: int, stop: int) -> list[torch.Tensor]:
    """Rows start..stop-1 of the stacked ``features``, as views of the pieces (no copy)."""
    kept, at = [], 0
    for piece in features:
        rows = piece.shape[0]
        lo, hi = max(start - at, 0), min(stop - at, rows)
        if lo < hi:
            kept.append(piece if (lo, hi) == (0, rows) else piece[lo:hi])
        at += rows
    return kept


class DeferredRows:
    def __init__(self, block_size: int, max_pending: int, max_parked: int,
                 block_ids: Callable[[str], list[int]]) -> None:
        self.block_size, self.max_pending, self.max_parked = block_size, max_pending, max_parked
        self.block_ids = block_ids
        self.pending: dict[str, PendingRows] = {}
        self.parked: dict[PendingRows, None] = {}  # oldest first
        self.owners: dict[int, PendingRows] = {}
        self.needs: dict[str, list[PendingRows]] = {}
        """Other entries with rows in the blocks a live request reuses (``shared``)."""
        self.parked_rows = 0

    def add(self, req_id: str, start: int, features: torch.Tensor) -> PendingRows:
        """Defer ``features`` [n, F], the rows of positions start..start+n-1 of a live
        request; returns its entry (write it when ``full``)."""
        entry = self.pending.get(req_id)
        if entry is None:
            entry = self.pending[req_id] = PendingRows(req_id, [], start, self.block_ids(req_id))
        first = (entry.start + entry.count) // self.block_size
        entry.features.append(features)
        entry.count += features.shape[0]
        last = (entry.start + entry.count - 1) // self.block_size
        for block_id in entry.blocks[first : last + 1]:
            self.owners[block_id] = entry
        return entry

    def _attach(self, entry: PendingRows, parked: bool) -> None:
        if parked:
            self.parked[entry] = None
            self.parked_rows += entry.count
        else:
            self.pending[entry.req_id] = entry
        for block_id in self._blocks(entry):
            self.owners[block_id] = entry

    def _blocks(self, entry: PendingRows) -> list[int]:
        """The blocks holding the entry's rows."""
        size = self.block_size
        return entry.blocks[entry.start // size : (entry.start + entry.count - 1) // size + 1]

    def full(self, entry: PendingRows) -> bool:
        return entry.count >= self.max_pending

    def take(self, req_ids: Sequence[str]) -> list[PendingRows]:
        """The pending entries of these live requests and the entries they need (those not
        written since), to write now."""
        found = {e: None for req_id in req_ids for e in self._unwritten(req_id, drop=True)}
        return [self._detach(e) for e in found]

    def owed(self, req_id: str) -> int:
        """Rows ``take([req_id])`` would return now (its pending rows and the rows of the
        blocks it reuses that are not written yet)."""
        return sum(e.count for e in dict.fromkeys(self._unwritten(req_id, drop=False)))

    def _unwritten(self, req_id: str, drop: bool) -> list[PendingRows]:
        """Its pending entry and the entries it needs, those not written yet (``drop``:
        it needs them no more)."""
        needs = self.needs.pop(req_id, ()) if drop else self.needs.get(req_id, ())
        return [e for e in (self.pending.get(req_id), *needs)
                if e is not None and self._attached(e)]

    def _attached(self, entry: PendingRows) -> bool:
        """Not written yet (pending or parked)."""
        return entry in self.parked or self.pending.get(entry.req_id) is entry

    def park(self, req_id: str) -> list[PendingRows]:
        """The request leaves (finished, cancelled, preempted): its rows are parked; returns
        the oldest parked entries beyond ``max_parked``, to write now."""
        self.needs.pop(req_id, None)
        entry = self.pending.pop(req_id, None)
        if entry is not None:
            self._attach(entry, parked=True)
        return self._spill()

    def shared(self, req_id: str, block_ids: Sequence[int]) -> list[PendingRows]:
        """``req_id`` reads ``block_ids`` (its computed prefix): the other entries with rows
        in them, which it needs written before it drafts (``take``); returns them."""
        own = self.pending.get(req_id)
        found = list(dict.fromkeys(
            e for b in block_ids if (e := self.owners.get(b)) is not None and e is not own))
        if found:
            self.needs.setdefault(req_id, []).extend(found)
        return found

    def reused(self, block_id: int) -> list[PendingRows]:
        """The block manager takes ``block_id`` for other contents: its rows are dropped.
        The rows of the entry's later blocks stay parked as an entry of their own: those
        blocks may stay in the prefix cache and be reached again once another request
        recomputes this one, and are written then (``shared``). Returns the oldest parked
        entries beyond ``max_parked``, to write now."""
        entry = self.owners.get(block_id)
        if entry is None:
            return []
        index = entry.blocks.index(block_id)
        size = self.block_size
        keep = max(0, index * size - entry.start)
        after = (index + 1) * size - entry.start
        tail = None
        if after < entry.count:
            tail = PendingRows(entry.req_id, rows_between(entry.features, after, entry.count),
                               entry.start + after, entry.blocks, entry.count - after)
        self._detach(entry)
        if keep:
            entry.cut(keep)
            self._attach(entry, parked=True)
        if tail is not None:
            self._attach(tail, parked=True)
        return self._spill()

    def _spill(self) -> list[PendingRows]:
        spill = []
        while self.parked_rows > self.max_parked:
            spill.append(self._detach(next(iter(self.parked))))
        return spill

    def _detach(self, entry: PendingRows) -> PendingRows:
        """Forget ``entry`` (pending or parked), which is written or empty."""
        if self.pending.get(entry.req_id) is entry:
            del self.pending[entry.req_id]
        if entry in self.parked:
            del self.parked[entry]
            self.parked_rows -= entry.count
        for b in self._blocks(entry):
            if self.owners.get(b) is entry:
                del self.owners[b]
        return entry
