"""Ctrl-C under load (`dspark serve`, as a terminal sends it: SIGINT to the whole process
group): new requests are refused with 503 ``shutting_down`` while the server drains, every
stream in flight ends with either its finish reason or an error chunk naming the shutdown,
and ``[DONE]``; none is cut; the server exits cleanly (``cluster.drain``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from dspark.router.redis_server import free_port

DSPARK = Path(sys.executable).parent / "dspark"


def left_in_session(sid: int) -> str:
    return subprocess.run(["ps", "-o", "pid=,args=", "-s", str(sid)], capture_output=True,
                          text=True).stdout.strip()


def stream(url: str, max_tokens: int, out: dict) -> None:
    body = {"model": "dspark-demo", "prompt": "Once upon a time", "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True, "temperature": 0}
    events: list = []
    out["events"] = events
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as resp:
            out["status"] = resp.status_code
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
    except httpx.HTTPError as exc:
        out["cut"] = repr(exc)


def outcome(out: dict) -> str:
    """finished, shut_down (error chunk + [DONE]) or lost."""
    events = out.get("events", [])
    if out.get("cut") or not events or events[-1] != "[DONE]":
        return "lost"
    chunks = [json.loads(e) for e in events[:-1]]
    if any(c.get("error", {}).get("code") == "shutting_down" for c in chunks):
        return "shut_down"
    if any(ch.get("finish_reason") for c in chunks for ch in c.get("choices", [])):
        return "finished"
    return "lost"


def test_ctrl_c_under_load_refuses_new_requests_and_ends_every_stream(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    stderr = tmp_path / "stderr.txt"
    proc = subprocess.Popen(
        [str(DSPARK), "serve", "--port", str(port), "--drain-timeout-s", "1.5"],
        stdout=subprocess.PIPE, stderr=open(stderr, "w"), text=True, env=env,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    outs = [{} for _ in range(3)]
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (proc.stdout.readline() or "").startswith("curl "):
            assert proc.poll() is None, stderr.read_text()
        # two streams too long for the drain (450 tokens: several seconds here), one short
        # enough to finish within it
        clients = [threading.Thread(target=stream, args=(url, n, out), daemon=True)
                   for n, out in zip((450, 450, 8), outs)]
        for c in clients:
            c.start()
        deadline = time.time() + 120
        while not all(len(o.get("events", [])) >= 2 for o in outs[:2]):
            assert time.time() < deadline, ("streams never started", outs)
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        deadline = time.time() + 30
        while True:  # the ingress sees the drain within a fraction of a second
            resp = httpx.post(f"{url}/v1/completions", timeout=30, json={
                "model": "dspark-demo", "prompt": "Hi", "max_tokens": 4})
            if resp.status_code == 503:
                break
            assert resp.status_code == 200 and time.time() < deadline, resp.text
        assert resp.json()["error"]["code"] == "shutting_down"
        assert resp.headers["retry-after"] == "5"
        for c in clients:
            c.join(timeout=120)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    results = [outcome(o) for o in outs]
    assert results[:2] == ["shut_down", "shut_down"], (outs, stderr.read_text()[-3000:])
    assert results[2] in ("finished", "shut_down"), outs[2]
    assert code == 0, stderr.read_text()[-3000:]
    deadline = time.time() + 30
    while left_in_session(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert left_in_session(proc.pid) == ""


def test_a_request_waiting_past_the_deadline_gets_503_and_its_work_is_cancelled():
    import asyncio

    from dspark.cluster.drain import IngressDrain
    from dspark.cluster.openai_errors import APIError

    async def scenario():
        drain = IngressDrain("no-such-app", "r1")
        assert await drain.until_expired(asyncio.sleep(0, result="done")) == "done"
        slow = asyncio.ensure_future(asyncio.sleep(60))
        drain.deadline = time.time() + 0.3
        assert drain.refusing and not drain.expired
        with drain.holding():
            assert drain.active == 1
            try:
                await drain.until_expired(slow)
            except APIError as exc:
                return exc, slow, drain.active
        raise AssertionError("no 503 at the deadline")

    exc, slow, active = asyncio.run(scenario())
    assert (exc.status, exc.code, exc.headers) == (503, "shutting_down", {"Retry-After": "5"})
    assert slow.cancelled() and active == 1
