"""The bookkeeping of deferred drafter-cache rows: which rows are written, when, and which
are dropped (the engine-level equivalence with eager writing is in test_lossless.py)."""

from __future__ import annotations

import torch

from dspark.workers.deferred_rows import DeferredRows

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


def test_parked_rows_are_written_for_a_request_that_shares_their_blocks_only():
    tables = {"a": [10, 11, 12], "b": [10, 11, 20]}
    deferred = make(tables)
    deferred.add("a", 0, rows(range(10)))
    assert deferred.park("a") == []
    assert deferred.shared("b", [20]) == []
    assert written(deferred.shared("b", [10, 11])) == [("a", p) for p in range(10)]
    assert deferred.parked_rows == 0 and not deferred.parked and not deferred.owners


def test_a_reused_block_drops_its_rows_and_writes_the_later_blocks():
    tables = {"a": [10, 11, 12, 13]}
    deferred = make(tables)
    deferred.add("a", 2, rows(range(2, 15)))  # blocks 10 (2, 3), 11, 12, 13 (12..14)
    deferred.park("a")
    tail = deferred.reused(11)
    assert written(tail) == [("a", p) for p in range(8, 15)]
    assert tail[0].start == 8
    # positions 2, 3 stay parked in block 10; 11, 12, 13 own nothing any more
    assert set(deferred.owners) == {10} and deferred.parked_rows == 2
    assert deferred.reused(12) == []
    assert written(deferred.shared("b", [10])) == [("a", 2), ("a", 3)]


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
    readmission's prefix hit writes the parked ones."""
    tables = {"a": [7, 8]}
    deferred = make(tables)
    deferred.add("a", 0, rows(range(6)))
    deferred.park("a")
    tables["a"] = [7, 8, 9]
    assert written(deferred.shared("a", [7])) == [("a", p) for p in range(6)]
    deferred.add("a", 6, rows([6, 7]))
    assert deferred.shared("a", [7, 8]) == []  # its own pending rows wait
