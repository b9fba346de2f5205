"""Paged KV cache bookkeeping: fixed-size blocks, block tables, reference counts, and
prefix caching of committed tokens (no tensors here; the model runner owns the storage).

Vocabulary:
- *block*: ``block_size`` consecutive KV slots of one request; a request's *block table*
  lists its blocks in position order.
- *committed tokens*: tokens the target has verified; only these may enter the prefix
  cache. *Lookahead slots* hold draft tokens during verification and are rolled back by
  ``truncate`` when drafts are rejected.
- *prefix cache*: a full block of committed tokens is registered under a hash of its tokens
  and of every token before it; a new request whose prompt starts with the same tokens
  reuses the block (its reference count grows) instead of recomputing it.

NOTE: draft tokens are never hashed, so a rejected draft can never be served from the cache.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block holds block_size committed tokens


@dataclass
class BlockTable:
    """One request's blocks and how many of its tokens are committed."""

    block_ids: list[int] = field(default_factory=list)
    num_committed: int = 0
    committed_hashes: list[int] = field(default_factory=list)  # one per full committed block


class BlockManager:
    """Allocates KV blocks to requests; every method keeps the free count exact."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.cached: dict[int, int] = {}  # prefix hash -> block id
        self.tables: dict[str, BlockTable] = {}

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, req_id: str) -> BlockTable:
        return self.tables[req_id]

    # ------------------------------------------------------------------ allocation
    def allocate(self, req_id: str, prompt_ids: Sequence[int], use_cache: bool = True
                 ) -> int | None:
        """Give a new request blocks for its prompt; reuse cached full prefix blocks (unless
        ``use_cache`` is False: a request that scores its whole prompt computes every row).

        Returns the number of prompt tokens already in the cache (to skip in prefill), or
        ``None`` (nothing allocated) when there are not enough free blocks.
        """
        if req_id in self.tables:
            raise ValueError(f"request {req_id!r} already holds blocks")
        hits = self._prefix_hits(prompt_ids) if use_cache else []
        # NOTE: a full-prompt hit still recomputes the last token, whose logits we need
        if hits and len(hits) * self.block_size >= len(prompt_ids):
            hits = hits[:-1]
        fresh = self.blocks_needed(len(prompt_ids)) - len(hits)
        reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if fresh + reclaimed > self.num_free_blocks:
            return None
        table = BlockTable()
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.free_ids.remove(block_id)
            block.ref_count += 1
            table.block_ids.append(block_id)
            table.committed_hashes.append(block.hash)  # type: ignore[arg-type]
        table.num_committed = len(hits) * self.block_size
        for _ in range(fresh):
            table.block_ids.append(self._take_free())
        self.tables[req_id] = table
        return table.num_committed

    def ensure_slots(self, req_id: str, num_tokens: int) -> bool:
        """Grow the table to hold ``num_tokens`` tokens (committed + lookahead); all or
        nothing."""
        table = self.tables[req_id]
        extra = self.blocks_needed(num_tokens) - len(table.block_ids)
        if extra <= 0:
            return True
        if extra > self.num_free_blocks:
            return False
        for _ in range(extra):
            table.block_ids.append(self._take_free())
        return True

    def commit(self, req_id: str, token_ids: Sequence[int]) -> None:
        """Mark the request's first ``len(token_ids)`` tokens as committed (verified) and
        register every newly full block in the prefix cache."""
        table = self.tables[req_id]
        if len(token_ids) < table.num_committed:
            raise ValueError("commit cannot shrink the committed prefix; use truncate")
        if self.blocks_needed(len(token_ids)) > len(table.block_ids):
            raise ValueError(f"request {req_id!r} has no slots for {len(token_ids)} tokens")
        table.num_committed = len(token_ids)
        size = self.block_size
        while (len(table.committed_hashes) + 1) * size <= table.num_committed:
            i = len(table.committed_hashes)
            parent = table.committed_hashes[-1] if table.committed_hashes else 0
            h = hash((parent, tuple(token_ids[i * size : (i + 1) * size])))
            table.committed_hashes.append(h)
            block = self.blocks[table.block_ids[i]]
            if self.enable_prefix_caching and h not in self.cached:
                block.hash = h
                self.cached[h] = block.block_id

    def truncate(self, req_id: str, num_tokens: int) -> None:
        """Free the blocks beyond ``num_tokens`` (rejected lookahead slots)."""
        table = self.tables[req_id]
        if num_tokens < table.num_committed:
            raise ValueError(
                f"cannot truncate to {num_tokens} below {table.num_committed} committed tokens"
            )
        keep = self.blocks_needed(num_tokens)
        while len(table.block_ids) > keep:
            self._release(table.block_ids.pop())

    def free(self, req_id: str) -> None:
        """Release every block of a finished, cancelled or preempted request."""
        table = self.tables.pop(req_id)
        for block_id in reversed(table.block_ids):
            self._release(block_id)

    # ------------------------------------------------------------------ internals
    def _prefix_hits(self, prompt_ids: Sequence[int]) -> list[int]:
        if not self.enable_prefix_caching:
            return []
        hits, parent, size = [], 0, self.block_size
        for i in range(len(prompt_ids) // size):
            h = hash((parent, tuple(prompt_ids[i * size : (i + 1) * size])))
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].hash != h:
                break
            hits.append(block_id)
            parent = h
        return hits

    def _take_free(self) -> int:
        block_id = self.free_ids.popleft()
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]  # its old contents are about to be overwritten
        block.hash = None
        block.ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count < 0:
            raise RuntimeError(f"block {block_id} released more often than taken")
        if block.ref_count == 0:
            # cached blocks go to the back so they survive longest for reuse
            if block.hash is not None:
                self.free_ids.append(block_id)
            else:
                self.free_ids.appendleft(block_id)
