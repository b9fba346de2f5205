"""SIGTERM to ``dspark serve``: the guard's watcher (in a child process of its own) and
``kill_descendants``; then the real server, signalled while it starts, alone and with its
whole process group (Ray's GCS and raylet share that group; its actors do not), and with
its group once ready."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dspark.cluster.start_guard import STATUS
from dspark.router.redis_server import free_port

DSPARK = Path(sys.executable).parent / "dspark"

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dspark.cluster.start_guard import SigtermGuard, Terminated
    marker, live, stubborn = Path(sys.argv[1]), sys.argv[2] == "live", sys.argv[3] == "stubborn"
    guard = SigtermGuard(lambda: live, lambda: marker.write_text("on_exit"), grace_s=0.5)
    guard.install()
    ready = False
    while True:
        # NOTE: "ready" inside the loop: the parent signals as soon as it reads the line,
        # and the handler can run before the next bytecode, still on the print's line
        try:
            if not ready:
                ready = True
                print("ready", flush=True)
            time.sleep(30)
        except Terminated:  # NOTE: stubborn: a main thread that never finishes (it waits
            if not stubborn:  # on Ray)
                guard.close()
                sys.exit(7)
""")


def run_child(tmp_path, live: str, stubborn: str) -> tuple[int, Path]:
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-P", "-c", CHILD, str(marker), live, stubborn],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60), marker


def test_a_main_thread_stuck_on_a_gone_cluster_is_ended_by_the_watcher(tmp_path):
    code, marker = run_child(tmp_path, "gone", "stubborn")
    assert code == STATUS and marker.read_text() == "on_exit"


def test_a_main_thread_that_finishes_keeps_its_own_status(tmp_path):
    code, marker = run_child(tmp_path, "gone", "finishes")
    assert code == 7 and not marker.exists()


def test_a_live_cluster_is_the_main_threads_to_stop(tmp_path):
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-P", "-c", CHILD, str(marker), "live",
                             "stubborn"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):  # NOTE: 4 x the grace: still waits
            proc.wait(timeout=2.0)
        assert not marker.exists()
    finally:
        proc.kill()
        proc.wait(timeout=30)


KILLER = textwrap.dedent("""
    import subprocess, sys, time
    from dspark.cluster.start_guard import kill_descendants
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # NOTE: no pipe of ours
    kept = subprocess.Popen(["sleep", "60"], **quiet)
    tree = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60 & wait"], **quiet)
    deadline = time.time() + 30
    while len(subprocess.run(["ps", "-o", "pid=", "--ppid", str(tree.pid)],
                             capture_output=True, text=True).stdout.split()) < 2:
        assert time.time() < deadline
        time.sleep(0.05)
    grandchildren = subprocess.run(["ps", "-o", "pid=", "--ppid", str(tree.pid)],
                                   capture_output=True, text=True).stdout.split()
    killed = kill_descendants({kept.pid})
    print(killed, tree.wait(timeout=30), kept.poll(), kept.pid, *grandchildren, flush=True)
""")


def test_kill_descendants_kills_children_and_grandchildren_but_the_kept():
    # NOTE: in a child process: here it would kill the suite's own Ray cluster
    out = subprocess.run([sys.executable, "-P", "-c", KILLER], capture_output=True,
                         text=True, timeout=120)
    killed, tree_status, kept_status, kept, *grandchildren = out.stdout.split()
    assert int(killed) == 3 and int(tree_status) == -signal.SIGKILL, out
    assert kept_status == "None", out  # NOTE: still running when the others were killed
    deadline = time.time() + 30
    while any(running(int(pid)) for pid in grandchildren) and time.time() < deadline:
        time.sleep(0.05)
    assert len(grandchildren) == 2 and not any(running(int(pid)) for pid in grandchildren)
    with contextlib.suppress(ProcessLookupError):  # NOTE: orphaned by the child's exit
        os.kill(int(kept), signal.SIGKILL)


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.parametrize("to", ["process", "group"])
@pytest.mark.parametrize("once", ["gcs_server", "ray::ServeReplica"])  # NOTE: in ``ray.init``;
# connected (Ray's crash handler took SIGTERM there), deploying the app
def test_sigterm_while_starting_stops_the_server_and_leaves_nothing(tmp_path, to, once):
    proc, stderr = start_server(tmp_path)
    try:
        deadline = time.time() + 240
        while once not in session(proc.pid) and time.time() < deadline:
            assert proc.poll() is None, stderr.read_text()
            time.sleep(0.05)
        assert once in session(proc.pid), stderr.read_text()
        (os.killpg if to == "group" else os.kill)(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        code = proc.returncode
        assert "ready in" not in out, "signalled too late: the server was up"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = stderr.read_text()
    assert code == STATUS, text
    assert "dspark serve: stopped" in text and "SIGTERM" in text, text
    assert "Aborted" not in text and "SIGTERM received" not in text, text  # NOTE: Ray's abort
    assert_nothing_left(proc.pid)


def test_sigterm_to_the_group_of_a_ready_server_ends_it_in_seconds(tmp_path):
    # NOTE: the GCS and raylet end with the group; the drain's calls to Ray would wait
    # 60 s for them and then end the process with status 1
    proc, stderr = start_server(tmp_path)
    try:
        line = proc.stdout.readline()  # NOTE: the server's first line says it is ready
        assert line.startswith("ready in"), (line, stderr.read_text())
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=45)  # NOTE: not the 60 s Ray waits for a GCS that is gone
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # NOTE: the watcher ends it (143), or the main thread stopped first, finding the GCS gone
    assert code in (STATUS, 0), stderr.read_text()
    assert "Failed to connect to GCS" not in stderr.read_text()
    assert_nothing_left(proc.pid)


def start_server(tmp_path) -> tuple[subprocess.Popen, Path]:
    """``dspark serve`` in a session of its own, on a cluster of its own (none of the
    suite's RAY_* variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    stderr = tmp_path / "stderr.txt"
    proc = subprocess.Popen([str(DSPARK), "serve", "--port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=open(stderr, "w"), text=True,
                            env=env, start_new_session=True)
    return proc, stderr


def assert_nothing_left(sid: int) -> None:
    deadline = time.time() + 30
    while session(sid) and time.time() < deadline:
        time.sleep(0.2)
    assert session(sid) == "", f"processes left behind:\n{session(sid)}"


def session(sid: int) -> str:
    return subprocess.run(["ps", "-ww", "-o", "pid=,args=", "-s", str(sid)], capture_output=True,
                          text=True).stdout.strip()
