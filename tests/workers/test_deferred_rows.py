"""The bookkeeping of deferred drafter-cache rows: which rows are written, when, and which
are dropped (the engine-level equivalence with eager writing is in test_lossless.py)."""

from __future__ import annotations

import torch

from dspark.workers.deferred_rows import DeferredRows, rows_between

SIZE = 4


def rows(positions):
    """Features that name their own position."""
    return torch.tensor([[float(p)] for p in positions])


def written(entries):
    return sorted((e.req_id, int(f)) for e in entries for f in torch.cat(e.features)[:, 0])


def make(tables, max_pending=100, max_parked=100):
    return DeferredRows(SIZE, max_pending, max_parked, lambda req_id: tables[req_id])


def test_rows_wait_until_taken_and_fill_their_limit():
    tables = {"a": [10, 11, 12]}
    deferred = make(tables, max_pending=6)
    entry = deferred.add("a", 0, rows(range(5)))
    assert not deferred.full(entry)
    entry = deferred.add("a", 5, rows([5]))
    assert deferred.full(entry)
    assert written(deferred.take(["a", "b"])) == [("a", p) for p in range(6)]
    assert deferred.take(["a"]) == [] and deferred.owners == {}


def test_parked_rows_are_written_when_a_request_that_shares_their_blocks_drafts():
    tables = {"a": [10, 11, 12], "b": [10, 11, 20]}
    deferred = make(tables)
    deferred.add("a", 0, rows(range(10)))
    assert deferred.park("a") == []
    assert deferred.shared("b", [20]) == [] and deferred.take(["b"]) == []
    assert len(deferred.shared("b", [10, 11])) == 1  # needed, not written yet
    assert deferred.parked_rows == 10
    assert written(deferred.take(["b"])) == [("a", p) for p in range(10)]
    assert deferred.parked_rows == 0 and not deferred.parked and not deferred.owners


def test_a_request_that_leaves_without_drafting_writes_no_shared_rows():
    tables = {"a": [10, 11, 12], "b": [10, 11, 20], "c": [10, 30]}
    deferred = make(tables)
    deferred.add("a", 0, rows(range(10)))
    deferred.park("a")
    deferred.shared("b", [10, 11])
    deferred.shared("c", [10])
    assert deferred.park("b") == [] and deferred.take(["b"]) == []  # b never drafted
    assert deferred.parked_rows == 10
    assert written(deferred.take(["c"])) == [("a", p) for p in range(10)]
    deferred.shared("b", [10])  # readmitted: the rows were written meanwhile
    assert deferred.take(["b"]) == []


def test_a_reused_block_drops_its_rows_and_parks_the_later_blocks_apart():
    tables = {"a": [10, 11, 12, 13]}
    deferred = make(tables)
    deferred.add("a", 2, rows(range(2, 15)))  # blocks 10 (2, 3), 11, 12, 13 (12..14)
    deferred.park("a")
    assert deferred.reused(11) == []  # nothing is written
    # positions 2, 3 stay parked in block 10, 8..14 in blocks 12 and 13; 11 owns nothing
    assert set(deferred.owners) == {10, 12, 13} and deferred.parked_rows == 9
    # a request that recomputed block 11 reaches block 12 again: 8..14 are written when
    # it drafts
    assert len(deferred.shared("b", [10, 20, 12])) == 2
    tail = deferred.take(["b"])
    assert written(tail) == [("a", p) for p in [2, 3, *range(8, 15)]]
    assert sorted(e.start for e in tail) == [2, 8]
    assert deferred.reused(13) == [] and deferred.parked_rows == 0


def test_rows_parked_apart_spill_beyond_the_limit():
    tables = {"a": [10, 11, 12]}
    deferred = make(tables, max_parked=8)
    deferred.add("a", 0, rows(range(9)))  # 0..3 in block 10, 4..7 in 11, 8 in 12
    assert written(deferred.park("a")) == [("a", p) for p in range(9)]  # 9 > 8: spilled
    deferred.add("a", 0, rows(range(8)))
    deferred.park("a")
    assert deferred.reused(10) == [] and deferred.parked_rows == 4


def test_the_oldest_parked_rows_spill_beyond_the_limit():
    tables = {"a": [1, 2], "b": [3, 4], "c": [5, 6]}
    deferred = make(tables, max_parked=10)
    for req_id in "abc":
        deferred.add(req_id, 0, rows(range(5)))
    assert deferred.park("a") == [] and deferred.park("b") == []
    assert written(deferred.park("c")) == [("a", p) for p in range(5)]
    assert deferred.parked_rows == 10


def test_a_readmitted_request_reads_its_own_parked_rows():
    """A preempted request's parked rows and its readmission's rows are two entries: the
    readmission's prefix hit needs the parked ones, written with its own when it drafts."""
    tables = {"a": [7, 8]}
    deferred = make(tables)
    deferred.add("a", 0, rows(range(6)))
    deferred.park("a")
    tables["a"] = [7, 8, 9]
    assert len(deferred.shared("a", [7])) == 1
    deferred.add("a", 6, rows([6, 7]))
    assert written(deferred.take(["a"])) == [("a", p) for p in range(8)]
    assert not deferred.owners and not deferred.needs


def test_rows_between_takes_rows_across_pieces_without_copying():
    pieces = [rows(range(0, 2)), rows(range(2, 5)), rows([5])]
    for start, stop in [(0, 6), (1, 4), (2, 5), (4, 6), (3, 3)]:
        got = rows_between(pieces, start, stop)
        assert [int(f) for piece in got for f in piece[:, 0]] == list(range(start, stop))
        assert all(any(p.data_ptr() <= g.data_ptr() < p.data_ptr() + p.numel() * 4
                       for p in pieces) for g in got)  # views into the pieces


def test_owed_counts_what_take_would_write():
    rows = DeferredRows(4, 64, 64, lambda req_id: [0, 1, 2, 3])
    assert rows.owed("a") == 0
    rows.add("a", 0, torch.zeros(5, 2))
    rows.add("a", 5, torch.zeros(1, 2))
    assert rows.owed("a") == 6 == sum(e.count for e in rows.take(["a"]))
    assert rows.owed("a") == 0
