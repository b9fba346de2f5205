"""A step's stage boundaries, on the host's clock and, on a GPU, on the device's.

On a GPU the host only queues a stage's kernels: the host time of the drafting call or of
the verify forward is the time it took to launch them, and their run is waited for later,
by whichever stage next reads a value back (the budget reads the drafter's confidences,
sampling reads the target's tokens). The engine's cost model learns what drafting and
verification cost from these stages, so on CUDA each boundary also records an event on
the stream, and ``span`` gives the device time between two boundaries once the step's own
read-backs have run past them (no sync is added). ``sync`` (``EngineConfig.phase_sync``, a
diagnostic) waits for the device at every boundary instead, so that every stage's host
time is its whole cost.
"""

from __future__ import annotations

import time

import torch


class PhaseClock(list):
    """The ``perf_counter`` of each boundary (a list of floats: ``clock[i]``), and on CUDA
    an event per boundary."""

    def __init__(self, device: torch.device, sync: bool = False) -> None:
        super().__init__()
        self.cuda = device.type == "cuda"
        self.sync = sync and self.cuda
        self.events: list[torch.cuda.Event] = []
        self.mark()

    def mark(self) -> None:
        """A boundary: now."""
        if self.sync:
            torch.cuda.synchronize()
        elif self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        self.append(time.perf_counter())

    def span(self, start: int, end: int) -> float:
        """Seconds from boundary ``start`` to ``end``: on the device where both events have
        run (the stream's work between them), else on the host."""
        if self.events and self.events[end].query():
            return self.events[start].elapsed_time(self.events[end]) / 1000.0
        return self[end] - self[start]
