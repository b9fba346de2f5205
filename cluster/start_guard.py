"""SIGTERM to ``dspark serve``: stop as Ctrl-C stops, whatever Ray is doing.

Python runs a signal handler in the main thread, between two bytecodes. When the main
thread waits inside a Ray call, the handler waits with it; and a SIGTERM sent to the
process group (``kill -TERM -PGID``, a service manager stopping the group) ends Ray's own
processes too, so that call waits for a GCS that is gone: 60 s, then Ray ends the process
with status 1. Ray's core worker also installs a crash handler for SIGTERM when
``ray.init`` connects, which aborts the process (status -6) without any clean-up.

``SigtermGuard`` takes SIGTERM back: its handler raises ``Terminated`` during the start-up
(a ``KeyboardInterrupt``, so ``start`` stops what it started on the way out; once ready,
``dspark serve`` sets its own handler, which drains). A watcher thread, woken by the
signal's wakeup byte at once (whichever Python handler runs), then watches the cluster's
GCS: while it answers, the main thread is stopping the cluster; once it has not answered
for ``grace_s`` (the signal reached the GCS and the raylet, which share the process group,
or ``ray.init`` never started them) and the main thread has not finished, the watcher ends
what is left (``on_exit``) and the process with status 143. Ray starts its node processes
to end with their parent."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

STATUS = 128 + signal.SIGTERM
"""The exit status of a server the watcher stopped."""


class Terminated(KeyboardInterrupt):
    """A SIGTERM while starting (``SigtermGuard``'s handler)."""


class SigtermGuard:
    """SIGTERM handling for ``dspark serve`` (module doc). ``cluster_live()`` says whether
    the cluster this process started answers; ``on_exit`` ends what is left of it before the
    watcher ends the process."""

    POLL_S = 0.2

    def __init__(self, cluster_live: Callable[[], bool], on_exit: Callable[[], None],
                 grace_s: float = 3.0) -> None:
        self.cluster_live, self.on_exit, self.grace_s = cluster_live, on_exit, grace_s
        self.taken, self.closed = threading.Event(), threading.Event()
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)

    def install(self) -> SigtermGuard:
        """Take SIGTERM (from the main thread) and start the watcher."""
        self.handle()
        signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="dspark-sigterm", daemon=True).start()
        return self

    def handle(self) -> None:
        """Take SIGTERM again (after ``ray.init``, whose core worker took it)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._raise)

    def close(self) -> None:
        """The server has stopped (from the main thread): the watcher ends."""
        self.closed.set()
        signal.set_wakeup_fd(-1)
        self._write.close()

    def _raise(self, signum, _frame) -> None:
        self.taken.set()
        raise Terminated(signal.Signals(signum).name)

    def _watch(self) -> None:
        while True:
            woken = self._read.recv(64)
            if not woken or self.closed.is_set():
                return
            if signal.SIGTERM in woken:
                break
        remember_descendants()  # NOTE: before the raylet, if signalled too, is gone
        gone = None  # NOTE: since when the GCS has not answered
        while not self.closed.wait(self.POLL_S):
            if self.cluster_live():
                gone = None
                continue
            gone = gone or time.monotonic()
            if time.monotonic() - gone > self.grace_s:  # NOTE: the main thread waits on
                # Ray for what is gone
                print("dspark serve: stopped (SIGTERM; Ray's processes had ended)",
                      file=sys.stderr, flush=True)
                self.on_exit()
                os._exit(STATUS)


_SEEN: set[int] = set()
"""Processes descending from this one when a SIGTERM arrived (``remember_descendants``)."""


def remember_descendants() -> None:
    """Note the processes descending from this one now: a raylet that a signal to the
    process group ends leaves its workers to the system, no longer this process's."""
    _SEEN.update(descendants())


def kill_descendants(keep: set[int] = frozenset()) -> int:
    """SIGKILL every process descending from this one but those in ``keep`` and theirs, and
    those remembered (Linux's /proc; elsewhere none); returns how many. Ray's actors run in
    process groups of their own under the raylet, so a signal to this process's group does
    not reach them."""
    found = (set(descendants(keep)) | _SEEN) - set(keep) - {os.getpid()}
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # NOTE: gone already
            continue
    return len(found)


def descendants(keep: set[int] = frozenset()) -> list[int]:
    """The processes descending from this one, but those in ``keep`` and theirs."""
    parents = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # NOTE: not a process, or gone meanwhile
            continue
    found, frontier = [], [os.getpid()]
    while frontier:
        children = [pid for pid, parent in parents.items()
                    if parent in frontier and pid not in keep]
        found += children
        frontier = children
    return found
