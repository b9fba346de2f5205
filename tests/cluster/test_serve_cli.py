"""`dspark serve` as a user runs it: it prints a URL and a curl; the pasted curl streams a
completion; Ctrl-C stops Ray, Redis and the HTTP server and leaves no process behind. Here
with an API key from the environment (``--api-key env:NAME``): the curl sends it, a request
without it gets 401; the load board's password is never printed."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from dspark.router.redis_server import free_port

DSPARK = Path(sys.executable).parent / "dspark"


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_serve_prints_a_working_curl_and_ctrl_c_leaves_nothing_running(tmp_path):
    port = free_port()
    # no RAY_* of the suite's own cluster: the server starts a cluster of its own
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               DSPARK_API_KEY="sk-cli-test")
    proc = subprocess.Popen(
        [str(DSPARK), "serve", "--port", str(port), "--api-key", "env:DSPARK_API_KEY"],
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "stderr.txt", "w"), text=True, env=env, start_new_session=True,
    )
    try:
        lines = []
        deadline = time.time() + 240
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("curl "):
                break
        assert lines and lines[-1].startswith("curl "), (lines, (tmp_path / "stderr.txt").read_text())
        assert f"http://127.0.0.1:{port}" in lines[0]
        assert "redis://:***@127.0.0.1:" in lines[0]  # the board's password is not shown
        redis_port = int(lines[0].split("@127.0.0.1:")[1].split("/")[0])
        # the pasted curl, as a shell runs it: $DSPARK_API_KEY from the environment
        out = subprocess.run(["bash", "-c", lines[-1]], capture_output=True, text=True,
                             timeout=120, env=env)
        events = [ln for ln in out.stdout.splitlines() if ln.startswith("data: ")]
        assert len(events) > 3 and events[-1] == "data: [DONE]", out
        assert '"object":"chat.completion.chunk"' in events[0]
        keyless = subprocess.run(shlex.split(lines[-1].replace(
            '-H "Authorization: Bearer $DSPARK_API_KEY" ', "")), capture_output=True,
            text=True, timeout=60)
        assert '"code":"invalid_api_key"' in keyless.stdout, keyless
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        code = proc.wait(timeout=120)
    assert code == 0
    assert not port_open(port) and not port_open(redis_port)
    deadline = time.time() + 30  # nothing of the server's session survives it
    while survivors(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert survivors(proc.pid) == "", f"processes left behind:\n{survivors(proc.pid)}"


def survivors(sid: int) -> str:
    return subprocess.run(["ps", "-o", "pid=,args=", "-s", str(sid)], capture_output=True,
                          text=True).stdout.strip()
