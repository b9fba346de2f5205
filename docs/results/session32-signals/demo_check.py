"""The README's run command as a user runs it, from a clone: ``bash scripts/demo.sh`` with
redis-server and redis-cli hidden from PATH (``shared/tools/path-without`` beside the
checkout), started as a terminal starts it (SIGINT at its default); waits for "ready",
streams one chat completion, sends Ctrl-C (SIGINT to the process group) and prints how long
stopping took and the Ray and Redis processes left.

Run from the repository root: ``python3 docs/results/session32-signals/demo_check.py CLONE``
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

PATH_WITHOUT = os.path.abspath("../shared/tools/path-without")


def main() -> None:
    clone = sys.argv[1]
    hidden = subprocess.check_output([PATH_WITHOUT, "redis-server", "redis-cli"], text=True)
    env = dict(os.environ, PATH=hidden.strip())
    started = time.time()
    proc = subprocess.Popen(
        ["bash", "scripts/demo.sh"], cwd=clone, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: (os.setpgrp(), signal.signal(signal.SIGINT, signal.SIG_DFL)))
    url = None
    while url is None and time.time() - started < 600:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(("starting dspark", "ready in")):
            print("|", line.rstrip())
        if line.startswith("ready in"):
            url = line.split(": ", 1)[1].split()[0]
    print(f"ready after {time.time() - started:.1f} s (the script's install check included)")
    body = json.dumps({"model": "dspark-demo", "stream": True, "max_tokens": 64, "messages": [
        {"role": "user", "content": "What is 7 * 8?"}]}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    events = [line for line in urllib.request.urlopen(request, timeout=60).read().decode()
              .splitlines() if line.startswith("data: ")]
    print(f"streamed {len(events)} events, the last {events[-1]!r}")
    sent = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=120)
    print(f"Ctrl-C: stopped in {time.time() - sent:.1f} s, status {proc.returncode}")
    time.sleep(2)
    left = subprocess.run(["pgrep", "-f", "raylet|gcs_server|redis-server"],
                          capture_output=True, text=True).stdout.split()
    print(f"Ray and Redis processes left: {len(left)}")


if __name__ == "__main__":
    main()
