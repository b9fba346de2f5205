"""Faults injected into a running ``dspark serve`` under load, every request accounted for.

    python -m dspark.bench.faults [--requests N] [--concurrency C] [--max-tokens T]
        [--faults redis,replica,ep_member,drop,burst,sigterm] [--json out.json]

Each server starts as a user starts it (the ``dspark serve`` CLI, a subprocess in its own
session on a free loopback port, ready at its ``curl`` line) and first serves every prompt
once without faults: the baseline texts. Per fault, ``--requests`` streamed greedy chat
requests from ``--concurrency`` clients, the fault injected once a quarter of them have
finished. ep_member runs on a second server (one expert-parallel group of two); sigterm
runs last. docs/reliability.md says what each fault does and when it has recovered.

Every request is one of ``KINDS``: ``ok`` (a finish reason and ``[DONE]``, the baseline's
text), ``error`` (clear: an OpenAI error body, or an error chunk then ``[DONE]``),
``lost`` (no response, or a stream cut with neither a finish reason nor an error nor
``[DONE]``), ``hung`` (no end within ``request_timeout_s``), ``wrong`` (a finished text
other than the baseline's), ``dropped`` (closed by the client; what it got agrees with
the baseline's) or ``unsent`` (sigterm: not sent once the server refused new requests or
no longer listened). Prints one table and one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from dspark.bench.streams import MODEL, PROMPTS, Reply, json_body, stream_chat, wait_until
from dspark.router.redis_server import free_port

FAULTS = ("redis", "replica", "ep_member", "drop", "burst", "sigterm")
KINDS = ("ok", "error", "lost", "hung", "wrong", "dropped", "unsent")
DROP_AFTER = 2
"""Content chunks a dropping client reads before it closes the connection."""
LONG = {"max_tokens": 400, "ignore_eos": True}
"""A request that runs for seconds: the dropped streams (their KV blocks stay taken unless
the server aborts them)."""
LONGEST = {"max_tokens": 480, "ignore_eos": True}
"""The sigterm fault's stream, longer than the drain: as long as the demo model's 512
positions allow after a short prompt (at 100 tokens/s it outlasts the 2 s drain
twice over)."""


@dataclass(frozen=True)
class FaultBenchConfig:
    requests: int = 24
    """Streamed requests per fault (burst: 3x the server's capacity instead)."""
    concurrency: int = 4
    """Client threads sending them."""
    max_tokens: int = 16
    """Output tokens per request (greedy)."""
    faults: tuple[str, ...] = FAULTS
    """The faults to run (sigterm always runs last)."""
    recover_timeout_s: float = 120.0
    """How long a fault may take to recover before it counts as not recovered."""
    request_timeout_s: float = 120.0
    """A request with no end this long after it was sent is hung."""
    start_timeout_s: float = 300.0
    """How long a server may take to print its ready line."""

    def __post_init__(self) -> None:
        if not self.faults or not set(self.faults) <= set(FAULTS):
            raise ValueError(f"faults must be some of {list(FAULTS)}, got {list(self.faults)}")
        if min(self.requests, self.concurrency, self.max_tokens) < 1:
            raise ValueError(f"requests, concurrency and max_tokens must be >= 1, got {self}")


def serve_config(ep_size: int = 1):
    """The served settings: one replica (ep_size > 1: one group of ``ep_size``) and small
    limits, so that a burst of 3x the capacity stays short."""
    from dspark.cluster.config import ServeConfig

    return ServeConfig(model_name=MODEL, replicas=ep_size, ep_size=ep_size, max_num_seqs=4,
                       max_waiting_per_replica=4, max_ongoing_requests=8,
                       max_queued_requests=4, drain_timeout_s=2.0, threads=1)


class Server:
    """``dspark serve`` as a subprocess in its own session (``with``: started, then stopped
    with everything it started, whatever happened)."""

    def __init__(self, name: str, serve, cfg: FaultBenchConfig) -> None:
        self.name, self.serve, self.cfg = name, serve, cfg
        default = asdict(type(serve)())  # NOTE: a flag for each setting not the default
        self.args = [arg for key, value in asdict(serve).items() if value != default[key]
                     for arg in ("--" + key.replace("_", "-"), str(value))]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: queue.Queue[str] = queue.Queue()
        self.known: set[tuple[int, float]] = set()
        """(pid, start time) of every descendant seen."""
        self.stderr = Path(os.environ.get("TMPDIR", "/tmp")) / f"dspark-faults-{self.port}.err"

    def __enter__(self) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "dspark.cluster.cli", "serve", "--port",
             str(self.port), *self.args], stdout=subprocess.PIPE,
            stderr=open(self.stderr, "w"), text=True, env=env, start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            self._wait_ready(started + self.cfg.start_timeout_s)
        except BaseException:
            self.__exit__()
            raise
        self.ready_s = round(time.monotonic() - started, 1)
        return self

    def _pump(self) -> None:
        for line in self.proc.stdout:  # NOTE: read to the end: a full pipe would block it
            self.lines.put(line)

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                if self.lines.get(timeout=0.5).startswith("curl "):
                    return
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
        raise RuntimeError(f"the {self.name} server is not ready: "
                           f"{self.stderr.read_text()[-2000:]}")

    def procs(self, *words: str) -> list:
        """The server's live processes whose title holds every word: its session's, and its
        descendants' now or earlier (Redis runs in a session of its own; orphans count)."""
        import psutil

        with suppress(psutil.Error):
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self.known.add((p.pid, p.create_time()))
        out = []
        for p in psutil.process_iter(["name", "cmdline", "status", "create_time"]):
            title = f"{p.info['name']} {' '.join(p.info['cmdline'] or ())}"
            with suppress(OSError):  # NOTE: gone meanwhile
                ours = ((p.pid, p.info["create_time"]) in self.known
                        or os.getsid(p.pid) == self.proc.pid)
                if (ours and all(w in title for w in words)
                        and p.info["status"] != psutil.STATUS_ZOMBIE):
                    out.append(p)
        return out

    def __exit__(self, *exc) -> None:
        """Ctrl-C (SIGINT to the group), then SIGKILL to whatever of it is left."""
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=self.serve.drain_timeout_s + 90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        try:
            wait_until(lambda: not self.procs(), 30, "the session empty", poll_s=0.2)
        except TimeoutError:
            for p in self.procs():
                with suppress(Exception):  # NOTE: gone meanwhile
                    p.kill()
        self.stderr.unlink(missing_ok=True)  # NOTE: a start that failed raised its tail


class Bench:
    """One server under faults: its baseline, its load, its recovery checks."""

    def __init__(self, server: Server, cfg: FaultBenchConfig) -> None:
        self.server, self.cfg, self.replicas = server, cfg, server.serve.replicas
        self.refusing = threading.Event()
        self.expected: dict[str, str] = {}

    def baseline(self) -> dict[str, str]:
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            replies = list(pool.map(self.ask, PROMPTS))
        bad = [(p, r.kind, r.code) for p, r in zip(PROMPTS, replies) if r.kind != "ok"]
        if bad:
            raise RuntimeError(f"the {self.server.name} server's baseline failed: {bad}")
        self.expected = {p: r.text for p, r in zip(PROMPTS, replies)}
        return self.expected

    def ask(self, prompt: str, drop_after: int | None = None, extra: dict | None = None
            ) -> Reply:
        """One request; none once the server has refused one as shutting down."""
        if self.refusing.is_set():
            return Reply("unsent", code="not sent: the server refused new requests")
        reply = stream_chat(self.server.url, prompt, self.cfg.max_tokens,
                            self.cfg.request_timeout_s, drop_after, extra)
        if reply.code == "503 shutting_down":
            self.refusing.set()
        elif self.refusing.is_set() and (reply.code or "").startswith("cut: ConnectError"):
            return Reply("unsent", code="not sent: the server no longer listened")
        return reply

    def judge(self, prompt: str, reply: Reply) -> str:
        """The reply's kind, with its text checked against the baseline's."""
        want, kind = self.expected[prompt], reply.kind
        got = reply.text  # NOTE: a dropped one's (ignore_eos) may go on past the baseline's end
        if kind == "ok" and got != want or kind == "dropped" and got[:len(want)] != want[:len(got)]:
            return "wrong"
        return kind

    def probe(self) -> bool:
        """A request succeeds with the baseline's text."""
        return self.judge(PROMPTS[0], self.ask(PROMPTS[0])) == "ok"

    def get(self, path: str) -> tuple[int, dict]:
        """(status, JSON body) of a GET; (0, {}) when nothing answers."""
        import httpx

        try:
            resp = httpx.get(f"{self.server.url}{path}", timeout=10)
        except httpx.HTTPError:
            return 0, {}
        return resp.status_code, json_body(resp)

    def idle(self) -> bool:
        """Every KV block free, nothing running or queued (``/v1/load``)."""
        load = self.get("/v1/load")[1]
        return (bool(load) and load.get("free_blocks") == load.get("total_blocks")
                and load.get("running") == 0 and load.get("queued") == 0)

    def until(self, condition, since: float) -> float | None:
        """Seconds from ``since`` until ``condition()``; None past ``recover_timeout_s``."""
        with suppress(TimeoutError):
            wait_until(condition, max(since + self.cfg.recover_timeout_s - time.monotonic(), 0.0),
                  "recovery", poll_s=0.25)
            return round(time.monotonic() - since, 1)
        return None

    def load(self, inject=None, recovered=None, drop: bool = False) -> dict:
        """The load (``drop``: every other request is ``LONG`` and dropped
        after ``DROP_AFTER`` chunks), ``inject()`` once a quarter has finished and the
        engine runs, ``recovered`` watched from then: {"prompts", "replies", "recover_s"}."""
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(self.cfg.requests)]
        done, out = threading.Semaphore(0), {"prompts": prompts, "recover_s": None}

        def injector():
            for _ in range(max(1, len(prompts) // 4)):
                done.acquire()
            # NOTE: and the engine runs one (Serve resends what no replica has accepted)
            wait_until(lambda: self.get("/v1/load")[1].get("running"), 60, "a request running", 0.05)
            at = time.monotonic()
            inject()
            out["recover_s"] = self.until(recovered, at)

        def one(i):
            reply = self.ask(prompts[i], *((DROP_AFTER, LONG) if drop and i % 2 else ()))
            done.release()
            return reply

        watcher = threading.Thread(target=injector, daemon=True)
        if inject is not None:
            watcher.start()
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            out["replies"] = list(pool.map(one, range(len(prompts))))
        if inject is not None:
            watcher.join(timeout=self.cfg.recover_timeout_s + 60)
        return out


def row(fault: str, bench: Bench, out: dict, **extra) -> dict:
    """One fault's line: the count of each kind, the codes, the recovery (``out``: a
    ``Bench.load``'s; a prompt None is not checked against the baseline)."""
    prompts, replies, recover_s = out["prompts"], out["replies"], out["recover_s"]
    kinds = [bench.judge(p, r) if p is not None else r.kind for p, r in zip(prompts, replies)]
    counts = {k: kinds.count(k) for k in KINDS}
    return {"fault": fault, "sent": len(kinds) - counts["unsent"], **counts,
            "recovered": recover_s is not None, "recover_s": recover_s,
            "codes": dict(sorted(Counter(r.code for r in replies if r.code).items())), **extra}


def fault_redis(bench: Bench) -> dict:
    victim = bench.server.procs("redis-server")[0]
    port = ":" + " ".join(victim.info["cmdline"]).rsplit(":", 1)[-1].split()[0] + " "
    seen, marks = set(), {}
    outages = bench.get("/health")[1].get("board", {}).get("outages", 0)

    def recovered() -> bool:
        """A new Redis on the port, /health ok, and a request served as before.

        NOTE: the router's reader may never see an outage shorter than its refresh on a
        busy machine (redis-py reconnects a dead pooled connection when it takes it), so
        the outages /health counted are reported, not waited for."""
        code, body = bench.get("/health")
        seen.add(status := f"{code} {body.get('status')}")
        fresh = [p for p in bench.server.procs("redis-server") if p.pid != victim.pid]
        if fresh:  # NOTE: its title names its port once it has started: the last one counts
            marks.setdefault("new_redis_s", round(time.monotonic() - marks["killed"], 1))
            marks["same_port"] = port in " ".join(fresh[0].info["cmdline"] or ()) + " "
        marks["outages_seen"] = body.get("board", {}).get("outages", 0) - outages
        return status == "200 ok" and bool(fresh) and bench.probe()

    def inject():
        marks["killed"] = time.monotonic()
        victim.kill()

    out = bench.load(inject, recovered)
    marks.pop("killed", None)
    return row("redis", bench, out, health_seen=sorted(seen), **marks)


def fault_shard(bench: Bench) -> dict:
    """SIGKILL one TargetShard process: the replica, or one member of the group (ep_member:
    a group restarts whole, so every member is replaced, not only the one killed)."""
    before = bench.server.procs("ServeReplica:", "TargetShard")
    victim, grouped = before[-1], bench.server.serve.ep_size > 1
    gone = {p.pid for p in before} if grouped else {victim.pid}

    def recovered() -> bool:
        now = {p.pid for p in bench.server.procs("ServeReplica:", "TargetShard")}
        return len(now) == bench.replicas and not now & gone and bench.probe()

    return row("ep_member" if grouped else "replica", bench, bench.load(victim.kill, recovered),
               shards_before=len(before))


def fault_drop(bench: Bench) -> dict:
    out = bench.load(drop=True)
    out["recover_s"] = bench.until(bench.idle, time.monotonic())
    load = bench.get("/v1/load")[1]
    return row("drop", bench, out,
               blocks_free=f"{load.get('free_blocks')}/{load.get('total_blocks')}")


def fault_burst(bench: Bench) -> dict:
    serve = bench.server.serve  # NOTE: what one replica and the ingress's queue hold
    n = 3 * (min(serve.max_ongoing_requests, serve.max_num_seqs + serve.max_waiting_per_replica)
             + serve.max_queued_requests)
    out = {"prompts": [PROMPTS[i % len(PROMPTS)] for i in range(n)]}
    gate = threading.Barrier(n)

    def one(prompt):
        gate.wait(timeout=60)
        return bench.ask(prompt)

    with ThreadPoolExecutor(n) as pool:
        out["replies"] = list(pool.map(one, out["prompts"]))
    out["recover_s"] = bench.until(lambda: bench.idle() and bench.probe(), time.monotonic())
    refused = [r for r in out["replies"] if r.kind == "error"]
    return row("burst", bench, out, capacity=n // 3,
               refused_without_retry_after=sum(r.retry_after is None for r in refused))


def fault_sigterm(bench: Bench) -> dict:
    """SIGTERM during the load, with one stream longer than the drain running; then
    requests until one is refused (the clients stop sending after that)."""
    proc, after, long_reply = bench.server.proc, [], []
    long = threading.Thread(target=lambda: long_reply.append(bench.ask(PROMPTS[1], extra=LONGEST)))
    long.start()
    wait_until(lambda: bench.get("/v1/load")[1].get("running"), 30, "the long stream running", 0.1)

    def inject():
        proc.send_signal(signal.SIGTERM)
        while not bench.refusing.is_set() and proc.poll() is None and len(after) < 100:
            after.append(bench.ask(PROMPTS[0]))

    out = bench.load(inject, lambda: proc.poll() is not None)
    long.join(timeout=bench.cfg.request_timeout_s)
    gone = bench.until(lambda: not bench.server.procs(), time.monotonic()) is not None
    out["recover_s"] = out["recover_s"] if gone and proc.returncode == 0 else None
    out["prompts"] += [PROMPTS[0]] * len(after) + [None]
    out["replies"] += after + (long_reply or [Reply("hung", code="the long stream never ended")])
    left = [f"{p.pid} {p.info['name']}" for p in bench.server.procs()]
    return row("sigterm", bench, out, exit_code=proc.returncode, left=left,
               long_stream=out["replies"][-1].code or out["replies"][-1].kind)


def run_server(name: str, serve, faults: list[str], cfg: FaultBenchConfig,
               started: threading.Event | None = None) -> dict:
    """Start one server, take its baseline, run ``faults`` in order, stop it (``started``
    is set once it is up, or has failed to start)."""
    jobs = {"redis": fault_redis, "replica": fault_shard, "ep_member": fault_shard,
            "drop": fault_drop, "burst": fault_burst, "sigterm": fault_sigterm}
    started = started or threading.Event()
    try:
        with Server(name, serve, cfg) as server:
            started.set()
            bench = Bench(server, cfg)
            out = {"args": server.args, "ready_s": server.ready_s,
                   "baseline": bench.baseline(), "faults": []}
            for fault in faults:
                try:
                    out["faults"].append(jobs[fault](bench))
                except Exception as exc:  # NOTE: a fault's failure is a result, not the end
                    out["faults"].append({"fault": fault, "failed": repr(exc)})
    finally:
        started.set()
    return out


def run(cfg: FaultBenchConfig) -> dict:
    """Every fault of ``cfg``: ep_member on a server of its own (one group of two), the
    rest on one server of one replica, sigterm last."""
    result = {"config": asdict(cfg), "servers": {}}
    if "ep_member" in cfg.faults:
        result["servers"]["ep"] = run_server("ep", serve_config(2), ["ep_member"], cfg)
    main = [f for f in FAULTS if f in cfg.faults and f != "ep_member"]
    if main:
        result["servers"]["main"] = run_server("main", serve_config(), main, cfg)
    baselines = [s["baseline"] for s in result["servers"].values()]
    # NOTE: greedy text is the same whatever the expert parallelism
    result["baselines_agree"] = all(b == baselines[0] for b in baselines)
    result["faults"] = [r for s in result["servers"].values() for r in s["faults"]]
    return result


def table(rows: list[dict]) -> str:
    head = ("fault", "sent", "ok", "clear error", "lost", "hung", "wrong", "dropped",
            "recovered in")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        took = f"{r['recover_s']} s" if r.get("recovered") else "not recovered"
        cells = [r.get(k, "") for k in ("sent", "ok", "error", "lost", "hung", "wrong",
                                        "dropped")] if "failed" not in r else [r["failed"]]
        lines.append("| " + " | ".join(str(c) for c in (r["fault"], *cells, took)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dspark bench faults",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    docs = {"requests": "streamed requests per fault", "concurrency": "client threads",
            "max_tokens": "output tokens per request (greedy)"}
    for f in fields(FaultBenchConfig)[:3]:  # requests, concurrency, max_tokens
        parser.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default,
                            help=docs[f.name])
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
    cfg = FaultBenchConfig(args.requests, args.concurrency, args.max_tokens, faults)
    text = json.dumps(result := run(cfg), indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(table(result["faults"]))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
