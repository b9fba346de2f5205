"""CPU seconds spent by a served app's own processes (Linux ``/proc``).

Ray titles a Serve replica's process ``ray::ServeReplica:<app>:<deployment>``; an app's
ingress and target shards are its own processes (the HTTP proxy is shared by every app and
is not counted). The CPU time of every thread of those processes (the engine thread, the
asyncio loop, the span exporter, the metrics flush) is what the app cost the machine. On a
CPU-bound server that is its throughput, read without the wall clock: a slower stretch of
the machine (another tenant, the host taking the core) lengthens the wall time of a run but
not the CPU time of the work done in it.
"""

from __future__ import annotations

import os
from pathlib import Path


def app_pids(app: str, proc: Path = Path("/proc")) -> list[int]:
    """PIDs of the processes titled ``ray::ServeReplica:<app>:...``."""
    prefix = f"ray::ServeReplica:{app}:".encode()
    pids = []
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "cmdline").read_bytes().startswith(prefix):
                pids.append(int(entry.name))
        except OSError:  # the process ended while we looked
            continue
    return pids


def cpu_seconds(pids: list[int], proc: Path = Path("/proc")) -> float:
    """User + system CPU seconds of these processes so far (ended ones count 0)."""
    ticks = 0
    for pid in pids:
        try:
            stat = (proc / str(pid) / "stat").read_text()
        except OSError:
            continue
        # NOTE: fields after the ")" that closes the command name; utime, stime are 14, 15
        fields = stat[stat.rindex(")") + 2:].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")
