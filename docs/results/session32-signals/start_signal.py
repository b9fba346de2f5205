"""A signal sent to ``dspark serve`` while it starts, as a terminal sends it: the server is
started with SIGINT at its default (a background job of a non-interactive shell starts with
SIGINT ignored, which is what session 31's check had), the signal goes to its process group
AFTER seconds later (to the server process alone with a third argument ``process``, as
``kill PID`` sends it), and the script prints how long it took to exit, its exit status,
the last lines it printed (all of them with ``-v``) and the Ray and Redis processes left.

Run from the repository root: ``python -P docs/results/session32-signals/start_signal.py
SIGINT|SIGTERM AFTER [group|process] [-v]``
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def main() -> None:
    sig, after = getattr(signal, sys.argv[1]), float(sys.argv[2])
    alone, verbose = "process" in sys.argv[3:], "-v" in sys.argv[3:]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.Popen(
        [".venv/bin/dspark", "serve", "--port", "8177"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: (os.setpgrp(), signal.signal(signal.SIGINT, signal.SIG_DFL)))
    time.sleep(after)
    sent = time.time()
    (os.kill if alone else os.killpg)(proc.pid, sig)
    out = proc.communicate(timeout=120)[0]
    print(f"{sys.argv[1]} to the {'process' if alone else 'process group'} after {after:g} s: "
          f"exited in {time.time() - sent:.1f} s, status {proc.returncode}")
    lines = out.splitlines() if verbose else out.splitlines()[-3:]
    print("\n".join("| " + line[:160] for line in lines))
    time.sleep(2)
    left = subprocess.run(["pgrep", "-f", "raylet|gcs_server|redis-server|ray::|default_worker"],
                          capture_output=True, text=True).stdout.split()
    print(f"Ray and Redis processes left (raylet, GCS, Redis, actors, workers): {len(left)}")


if __name__ == "__main__":
    main()
