"""Paged KV bookkeeping: no leaks, prefix reuse of committed tokens only, rollback."""

from __future__ import annotations

import random

import pytest

from dspark.workers.block_manager import BlockManager


def test_prompt_allocation_and_free_return_every_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    assert bm.allocate("a", list(range(9))) == 0  # 9 tokens -> 3 blocks
    assert bm.num_free_blocks == 7
    bm.free("a")
    assert bm.num_free_blocks == 10


def test_lookahead_slots_are_rolled_back_by_truncate():
    bm = BlockManager(num_blocks=10, block_size=4)
    bm.allocate("a", list(range(6)))  # 2 blocks
    assert bm.ensure_slots("a", 6 + 8)  # 7 draft tokens + anchor -> 4 blocks
    assert bm.num_free_blocks == 6
    bm.commit("a", list(range(9)))  # 3 tokens accepted
    bm.truncate("a", 9)  # rejected slots freed in the same step
    assert len(bm.table("a").block_ids) == 3 and bm.num_free_blocks == 7
    with pytest.raises(ValueError, match="committed"):
        bm.truncate("a", 8)


def test_allocation_is_all_or_nothing_when_blocks_run_out():
    bm = BlockManager(num_blocks=3, block_size=4)
    assert bm.allocate("a", list(range(8))) == 0
    assert bm.allocate("b", list(range(100, 109))) is None  # needs 3, 1 free
    assert "b" not in bm.tables and bm.num_free_blocks == 1
    assert not bm.ensure_slots("a", 17)  # needs 3 more
    assert len(bm.table("a").block_ids) == 2 and bm.num_free_blocks == 1


def test_committed_prefix_blocks_are_shared_and_ref_counted():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(10))
    bm.allocate("a", prompt)
    bm.commit("a", prompt)  # blocks 0-3 and 4-7 are full and committed
    assert bm.allocate("b", prompt + [42]) == 8  # two cached blocks reused
    shared = bm.table("a").block_ids[:2]
    assert bm.table("b").block_ids[:2] == shared
    assert all(bm.blocks[i].ref_count == 2 for i in shared)
    bm.free("a")
    assert all(bm.blocks[i].ref_count == 1 for i in shared)
    bm.free("b")
    assert bm.num_free_blocks == 8
    # freed cached blocks stay reusable until their slots are handed out again
    assert bm.allocate("c", prompt) == 8


def test_draft_tokens_never_enter_the_prefix_cache():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", [1, 2, 3])
    bm.ensure_slots("a", 3 + 5)  # drafts written into lookahead slots
    bm.commit("a", [1, 2, 3, 9])  # only the anchor's successor was accepted
    bm.truncate("a", 4)
    bm.free("a")
    # a prompt equal to prompt + the *rejected* drafts finds only the committed block
    assert bm.allocate("b", [1, 2, 3, 9, 7, 7, 7, 7, 5]) == 4


def test_full_prompt_hit_still_recomputes_the_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", list(range(8)))
    bm.commit("a", list(range(8)))
    assert bm.allocate("b", list(range(8))) == 4


def test_random_mix_of_finishing_cancelling_and_truncating_leaks_nothing():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=4)
    live: dict[str, list[int]] = {}
    for step in range(400):
        action = rng.random()
        if action < 0.3 and len(live) < 12:
            rid = f"r{step}"
            prompt = [rng.randrange(5) for _ in range(rng.randrange(1, 20))]
            if bm.allocate(rid, prompt) is not None:
                bm.commit(rid, prompt)
                live[rid] = prompt
        elif action < 0.8 and live:
            rid = rng.choice(sorted(live))
            tokens = live[rid]
            if bm.ensure_slots(rid, len(tokens) + 8):
                accepted = rng.randrange(0, 8)
                tokens = tokens + [rng.randrange(5) for _ in range(accepted + 1)]
                bm.commit(rid, tokens)
                bm.truncate(rid, len(tokens))
                live[rid] = tokens
        elif live:  # finished or cancelled
            rid = rng.choice(sorted(live))
            bm.free(rid)
            del live[rid]
    for rid in list(bm.tables):
        bm.free(rid)
    assert bm.num_free_blocks == 64
    assert all(b.ref_count == 0 for b in bm.blocks)
