"""The target features kept per KV slot until the drafter reads them (the engine-level
equivalence with writing every committed row at once is in test_lossless.py)."""

from __future__ import annotations

import torch

from dspark.workers.slot_features import SlotFeatures

SIZE = 4


def store(num_slots: int = 64) -> SlotFeatures:
    return SlotFeatures(num_slots, 2, torch.float32, torch.device("cpu"))


def fed(features: SlotFeatures, slots: list[int]) -> None:
    """A forward fed rows at ``slots``: features that name their slot."""
    features.store(torch.tensor(slots), torch.tensor([[float(s), 1.0] for s in slots]))


def unwritten(features, tables, lens):
    slots, positions, counts = features.unwritten(torch.tensor(tables), torch.tensor(lens),
                                                  SIZE)
    # NOTE: the counts split the rows per request, in order
    assert sum(counts.tolist()) == slots.numel() and len(counts) == len(tables)
    return slots.tolist(), positions.tolist()


def test_a_requests_unwritten_context_rows_in_order_until_written():
    f = store()
    fed(f, [40, 41, 42, 43, 20, 21])  # a prompt of 6 in blocks 10 and 5
    assert unwritten(f, [[10, 5]], [5]) == ([40, 41, 42, 43, 20], [0, 1, 2, 3, 4])
    assert f.features[[40, 20], 0].tolist() == [40.0, 20.0]
    f.mark_written(torch.tensor([40, 41, 42]))
    assert unwritten(f, [[10, 5]], [6]) == ([43, 20, 21], [3, 4, 5])
    assert unwritten(f, [[10, 5]], [3]) == ([], [])  # its context is written


def test_a_slot_fed_again_is_unwritten_again():
    # a rejected draft's row was fed at slot 22 and written nowhere; the position is fed
    # again once committed, and a written slot fed again (new contents) is unwritten
    f = store()
    fed(f, [20, 21, 22])
    f.mark_written(torch.tensor([20, 21, 22]))
    fed(f, [22])
    assert unwritten(f, [[5]], [3]) == ([22], [2])


def test_a_shared_block_is_listed_for_every_request_that_reads_it():
    f = store()
    fed(f, [40, 41, 42, 43, 8, 12])
    got = unwritten(f, [[10, 2], [10, 3]], [5, 5])
    assert got == ([40, 41, 42, 43, 8, 40, 41, 42, 43, 12], [0, 1, 2, 3, 4] * 2)
    assert unwritten(f, [[10]], [0]) == ([], [])


def test_leading_written_counts_the_written_prefix_of_cached_blocks():
    f = store()
    fed(f, [40, 41, 42, 43, 20, 21, 22, 23])
    assert f.leading_written([10, 5], SIZE) == 0
    f.mark_written(torch.tensor([40, 41, 42, 43, 20, 22]))
    assert f.leading_written([10, 5], SIZE) == 5
    assert f.leading_written([10], SIZE) == 4
    assert f.leading_written([], SIZE) == 0
