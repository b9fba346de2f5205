"""`dspark bench serve`: an online load benchmark over HTTP against the served app.

Every system (no speculation, MTP-1, DSpark with the local-load budget, DSpark with the
cluster-load budget) is deployed at once on one local Ray cluster, each as its own app on
its own route prefix with one replica. Then, for ``rounds`` rounds, at each concurrency the
systems take turns, driven by closed-loop streaming clients; the order rotates every round
(``turn_order``), so that drift of the machine's speed (other jobs, thermal, caches) hits
every system alike. Then two two-replica apps, one under the load-board router and one
under Ray Serve's power-of-two router, are deployed at once and take turns the same way on
a skewed workload (long and short requests mixed). All of it runs in one invocation.

Per request: TTFT (first content chunk), time per output token after the first (TPOT, the
inter-token latency per token; speculative steps commit several tokens per chunk), and
per-user tokens/s (tokens over the request's whole time). Per cell and round: aggregate
tokens/s and the percentiles. Per cell: the median over rounds of every number, with the
spread (min and max over rounds) of the ``SPREAD`` numbers; ratios are of medians. The
paired ratios take each round's number over the baseline's in the same round (the systems
of a round ran back to back), then the median and spread of those over rounds: a drift of
the machine's speed between rounds, which moves every system of a round alike, cancels.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import httpx

from dspark.bench.closed_loop import turn_order
from dspark.bench.engine_bench import baseline_ratios
from dspark.bench.paired import paired_ratios
from dspark.bench.proc_cpu import app_pids, cpu_seconds
from dspark.bench.replica_engine import engine_numbers, replica_totals
from dspark.cluster.config import DEFAULT_DRAFTER, ServeConfig


@dataclass(frozen=True)
class ServeBenchConfig:
    concurrencies: tuple[int, ...] = (1, 4, 16)
    """Concurrencies of the system comparison (closed-loop clients)."""
    max_tokens: int = 64
    """Output tokens per request, >= 4 (the skewed workload asks 4 times as many of one
    request in four and a quarter as many of the others)."""
    skew_concurrency: int = 8
    """Concurrency of the router comparison (one long request in four)."""
    rounds: int = 3
    """Rounds; in each, at each concurrency, the systems take turns in an order rotated
    every round. A cell reports the median and the spread [min-max] over rounds."""
    skew_rounds: int = 0
    """Rounds of the router comparison, the routers taking turns the same way (0: rounds)."""
    skew_requests: int = 0
    """Requests finished per round of the router comparison (0: 4 * skew_concurrency)."""
    # NOTE: a round's TTFT p90 is one request in ten from its slowest: at 32 requests the
    # fourth-slowest; more requests make a steadier tail
    min_requests: int = 8
    """Requests finished per cell of the system comparison: max(min_requests, 2 * C)."""
    baseline: str = ""
    """System the paired ratios are taken against ('': no-spec when it is served, else the
    first system)."""
    together: bool = False
    """The systems run at the same time, each under its own concurrency-C clients, instead
    of taking turns."""
    # NOTE (together): the machine's changes of speed then hit every system at the same
    # moments; they share the cores, so absolute numbers are lower, and ratios compare like
    # with like

    def __post_init__(self) -> None:
        if not self.concurrencies or min(self.concurrencies) < 1:
            raise ValueError(f"concurrencies must be integers >= 1, got {self.concurrencies}")
        if self.max_tokens < 4:
            raise ValueError(f"max_tokens must be >= 4, got {self.max_tokens}")
        if self.skew_concurrency < 1 or self.rounds < 1:
            raise ValueError(f"skew_concurrency and rounds must be >= 1, got "
                             f"{self.skew_concurrency} and {self.rounds}")
        if self.skew_rounds < 0:
            raise ValueError(f"skew_rounds must be >= 0, got {self.skew_rounds}")
        if self.skew_requests < 0:
            raise ValueError(f"skew_requests must be >= 0, got {self.skew_requests}")
        if self.min_requests < 1:
            raise ValueError(f"min_requests must be >= 1, got {self.min_requests}")

    @property
    def router_rounds(self) -> int:
        return self.skew_rounds or self.rounds

    @property
    def router_requests(self) -> int:
        return self.skew_requests or 4 * self.skew_concurrency


@dataclass(frozen=True)
class ServeSystem:
    label: str
    drafter: str
    budget: str
    metrics: bool = True
    traced: bool = False
    """Requests traced (``sample_ratio`` of them), exported over OTLP/HTTP to a sink in
    this process that decodes nothing."""
    sample_ratio: float = 1.0
    stream_interval: int = 1
    """Tokens per server-sent event after the first (``ServeConfig.stream_interval``)."""
    light_drafter: str = "none"
    """``ServeConfig.light_drafter``: MTP-1 beside the main drafter (``mtp``), or none."""
    gating: bool = True
    """``ServeConfig.draft_gating``: the engine's cost gate picks who drafts (False: every
    decoding request, every step)."""


SYSTEMS = (
    ServeSystem("no-spec", "none", "fixed"),
    ServeSystem("mtp-1", "mtp", "fixed"),
    ServeSystem("dspark-local", DEFAULT_DRAFTER, "algorithm1"),
    ServeSystem("dspark-cluster", DEFAULT_DRAFTER, "cluster"),
    # NOTE: the serving default without metrics, and with every request traced: the cost
    # of observability, side by side (docs/observability.md)
    ServeSystem("dspark-dark", DEFAULT_DRAFTER, "cluster", metrics=False),
    ServeSystem("dspark-traced", DEFAULT_DRAFTER, "cluster", traced=True),
    # NOTE: the same pair with a fixed γ=7 (every request drafts 7 every step, no gate):
    # nothing adapts to timing, so a round's two cells differ by what observing costs
    ServeSystem("dspark-g7-dark", "dspark", "fixed", metrics=False),
    ServeSystem("dspark-g7", "dspark", "fixed"),
    ServeSystem("dspark-g7-traced", "dspark", "fixed", traced=True),
    # NOTE: one request in ten traced, a production setting
    ServeSystem("dspark-g7-sampled", "dspark", "fixed", traced=True, sample_ratio=0.1),
    # NOTE: no speculation and the default streaming 4 tokens per event: what the path to
    # the client costs per event, side by side with the one-token default
    ServeSystem("no-spec-s4", "none", "fixed", stream_interval=4),
    ServeSystem("dspark-cluster-s4", DEFAULT_DRAFTER, "cluster", stream_interval=4),
    # NOTE: DSpark with MTP-1 as its light lane: what ``dspark serve`` runs by default since
    # session 32 (``light_drafter`` auto); ``dspark-cluster`` is DSpark alone
    ServeSystem("dspark-cluster-mtp", DEFAULT_DRAFTER, "cluster", light_drafter="mtp"),
    # NOTE: the default drafting for every request in every step (no gate): what drafting
    # for everyone is worth on the serving path, where a step carries more than in process
    ServeSystem("dspark-cluster-nogate", DEFAULT_DRAFTER, "cluster", gating=False),
)
ROUTERS = ("board", "pow2")

SPREAD = ("per_user_tps", "aggregate_tps", "ttft_p50", "ttft_p90", "tpot_p50")
"""Numbers whose spread over rounds a cell reports (``<name>_min``, ``<name>_max``)."""


@dataclass
class RequestResult:
    ttft: float
    tpot: float | None
    tokens: int
    total: float


async def stream_one(client: httpx.AsyncClient, url: str, body: dict,
                     headers: dict | None = None) -> RequestResult:
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                             headers=headers) as resp:
        if resp.status_code != 200:
            await resp.aread()
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
    end = time.perf_counter()
    first = first or end
    tpot = (last - first) / (tokens - 1) if tokens > 1 and last is not None else None
    return RequestResult(first - start, tpot, tokens, end - start)


async def closed_loop(url: str, model: str, prompts: Sequence[str], concurrency: int,
                      num_requests: int, make_body: Callable[[int], dict],
                      stop: asyncio.Event | None = None) -> dict:
    """``concurrency`` clients stream requests back to back until ``num_requests`` have
    finished, or until ``stop`` is set (by another loop sharing it: then the requests in
    flight finish and no more start)."""
    results: list[RequestResult] = []
    issued = iter(range(num_requests))
    stop = stop or asyncio.Event()

    async def worker(client):
        for i in issued:
            if stop.is_set():
                return
            body = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                    **make_body(i)}
            results.append(await stream_one(client, url, body))
            if len(results) >= num_requests:
                stop.set()

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return summarize(results, wall)


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(results: Sequence[RequestResult], wall: float) -> dict:
    ttft = [r.ttft for r in results]
    tpot = [r.tpot for r in results if r.tpot is not None]
    tokens = sum(r.tokens for r in results)
    return {
        "requests": len(results),
        "output_tokens": tokens,
        "aggregate_tps": tokens / wall,
        "per_user_tps": statistics.mean(r.tokens / r.total for r in results),
        "ttft_p50": pct(ttft, 0.5), "ttft_p90": pct(ttft, 0.9), "ttft_p99": pct(ttft, 0.99),
        "tpot_p50": pct(tpot, 0.5), "tpot_p90": pct(tpot, 0.9),
        "wall_s": wall,
    }


# ---------------------------------------------------------------------- rounds and medians
def median_cells(raw: Sequence[dict], keys: Sequence[str]) -> list[dict]:
    """One cell per distinct ``keys`` (in order of first appearance): the median over its
    rounds of every number, ``<name>_min`` / ``<name>_max`` for the ``SPREAD`` numbers,
    requests and output tokens summed, and the number of rounds."""
    groups: dict[tuple, list[dict]] = {}
    for cell in raw:
        groups.setdefault(tuple(cell[k] for k in keys), []).append(cell)
    out = []
    for runs in groups.values():
        cell = {k: runs[0][k] for k in keys}
        for name, value in runs[0].items():
            if name in keys or name in ("round", "turn") or not isinstance(value, (int, float)):
                continue
            values = [r[name] for r in runs]
            cell[name] = sum(values) if name in ("requests", "output_tokens") else \
                statistics.median(values)
            if name in SPREAD:
                cell[f"{name}_min"], cell[f"{name}_max"] = min(values), max(values)
        cell["rounds"] = len(runs)
        out.append(cell)
    return out


def ratios(cells: Sequence[dict]) -> list[dict]:
    """Per cell: per-user and aggregate ratios against no-spec and MTP-1 at the same C
    (``baseline_ratios``), and TTFT p50 / p90 over no-spec's."""
    index = {(c["system"], c["concurrency"]): c for c in cells}
    rows = baseline_ratios(cells, ("concurrency",))
    for row, cell in zip(rows, cells):
        base = index.get(("no-spec", cell["concurrency"]))
        if base is not None:
            for q in ("ttft_p50", "ttft_p90"):
                row[f"{q}_vs_no-spec"] = cell[q] / base[q] if base[q] else float("nan")
    return rows


PAIRED = (("aggregate_tps", "aggregate tok/s"), ("per_user_tps", "per-user tok/s"),
          ("ttft_p50", "TTFT p50"), ("ttft_p90", "TTFT p90"),
          ("cpu_ms_per_token", "app CPU ms per token"))
"""Numbers of the paired ratios, key and column header (``cpu_ms_per_token``: the app's
processes' CPU time per output token, ``bench/proc_cpu.py``; where measured)."""


def router_ratios(cells: Sequence[dict], baseline: str = "pow2") -> list[dict]:
    """Per router cell: aggregate tok/s and TTFT p50 / p90 over the ``baseline`` router's
    (medians; empty without the baseline)."""
    index = {(c["router"], c["concurrency"]): c for c in cells}
    rows = []
    for cell in cells:
        base = index.get((baseline, cell["concurrency"]))
        if base is None:
            continue
        rows.append({"router": cell["router"], "concurrency": cell["concurrency"],
                     **{f"{q}_vs_{baseline}": cell[q] / base[q] if base[q] else float("nan")
                        for q in ("aggregate_tps", "ttft_p50", "ttft_p90")}})
    return rows


# ---------------------------------------------------------------------- running
def skewed_body(max_tokens: int) -> Callable[[int], dict]:
    """One request in four asks ``4 * max_tokens`` tokens and ignores end of turn; the rest
    ask ``max_tokens // 4``."""
    def body(i: int) -> dict:
        long = i % 4 == 0
        return {"max_tokens": 4 * max_tokens if long else max_tokens // 4,
                "temperature": 0, "ignore_eos": long}
    return body


def serve_prompts(tokenizer, max_tokens: int, per_domain: int) -> list[str]:
    """The held-out math, code and chat prompts that leave room for ``max_tokens`` (and the
    skewed workload's 4 times as many) in the demo target's 512 positions, interleaved."""
    from dspark.bench.acceptance import fitting_texts
    from dspark.training.corpus.build import CorpusConfig, build_corpus

    corpus = build_corpus(CorpusConfig(seed=0))
    limit = 512 - 4 * max_tokens - 8
    groups = [fitting_texts([r["messages"][0]["content"] for r in corpus[d]["heldout"]],
                            tokenizer, limit, per_domain, 0) for d in ("math", "code", "chat")]
    return [p for group in zip(*groups) for p in group]


def deploy(apps: dict[str, ServeConfig], prompts: Sequence[str], num_cpus: float) -> dict[str, str]:
    """Deploy every app (one after another: each replica profiles its step costs alone)
    on its own route prefix, warm each up; returns label -> base URL."""
    from dspark.cluster.serve import app_url, start

    urls = {}
    for label, cfg in apps.items():
        start(cfg, num_cpus=num_cpus, app_name=label, route_prefix=f"/{label}")
        urls[label] = app_url(cfg, f"/{label}")
        asyncio.run(closed_loop(urls[label], cfg.model_name, prompts, 2, 4,
                                lambda i: {"max_tokens": 8, "temperature": 0}))  # warm-up
    return urls


def undeploy(labels: Sequence[str]) -> None:
    from ray import serve

    from dspark.cluster.serve import quiet_serve_logs

    with quiet_serve_logs():
        for label in labels:
            serve.delete(label)


def ray_cpus(phases: Sequence[dict[str, ServeConfig]]) -> float:
    """Logical CPUs for the local Ray cluster: room for the largest phase's apps at once
    (replicas plus a margin for each app's ingress), never fewer than ``dspark serve``'s."""
    from dspark.cluster.serve import local_cpus

    need = max((sum(c.replicas * c.replica_cpus + 0.5 for c in apps.values())
                for apps in phases), default=0.0)
    return max(float(local_cpus()), need)


def run_systems(urls: dict[str, str], model: str, prompts: Sequence[str],
                cfg: ServeBenchConfig, log: Callable[[str], None]) -> list[dict]:
    raw = []
    body = {"max_tokens": cfg.max_tokens, "temperature": 0}
    for rnd in range(cfg.rounds):
        for j, conc in enumerate(cfg.concurrencies):
            order = turn_order(list(urls), rnd + j)
            num = max(cfg.min_requests, 2 * conc)
            pids = {label: app_pids(label) for label in order}
            cpu = {label: cpu_seconds(p) for label, p in pids.items()}
            # NOTE: the systems' cells run one after another (unless ``together``), so
            # each replica's counters move in its own cell only
            totals = {} if cfg.together else {label: replica_totals(urls[label])
                                              for label in order}
            if cfg.together:
                cells = asyncio.run(together([urls[label] for label in order], model,
                                             prompts, conc, num, body))
            else:
                cells = [asyncio.run(closed_loop(urls[label], model, prompts, conc, num,
                                                 lambda i: body)) for label in order]
            for turn, (label, cell) in enumerate(zip(order, cells)):
                if pids[label]:  # NOTE: Linux only (/proc)
                    cell["cpu_ms_per_token"] = (1000 * (cpu_seconds(pids[label]) - cpu[label])
                                                / max(cell["output_tokens"], 1))
                if totals:
                    cell.update(engine_numbers(totals[label], replica_totals(urls[label]),
                                               cell["wall_s"]))
                raw.append({"round": rnd, "turn": turn, "system": label, "concurrency": conc,
                            **cell})
                log(f"[{rnd + 1}/{cfg.rounds}] {label:15s} C={conc:2d} per-user "
                    f"{cell['per_user_tps']:6.1f} aggregate {cell['aggregate_tps']:7.1f} tok/s"
                    f"  TTFT p50 {1000 * cell['ttft_p50']:5.0f} p90 {1000 * cell['ttft_p90']:5.0f}"
                    f" ms  TPOT p50 {1000 * cell['tpot_p50']:5.1f} ms")
    return raw


async def together(urls: Sequence[str], model: str, prompts: Sequence[str], concurrency: int,
                   num_requests: int, body: dict) -> list[dict]:
    """Closed loops on every app at once, each with ``concurrency`` clients; all stop
    starting requests when the first has finished ``num_requests``."""
    stop = asyncio.Event()
    return list(await asyncio.gather(*(closed_loop(url, model, prompts, concurrency,
                                                   num_requests, lambda i: body, stop)
                                       for url in urls)))


def run_routers(urls: dict[str, str], model: str, prompts: Sequence[str],
                cfg: ServeBenchConfig, log: Callable[[str], None]) -> list[dict]:
    raw = []
    conc, rounds = cfg.skew_concurrency, cfg.router_rounds
    for rnd in range(rounds):
        for turn, label in enumerate(turn_order(list(urls), rnd)):
            cell = asyncio.run(closed_loop(urls[label], model, prompts, conc,
                                           cfg.router_requests, skewed_body(cfg.max_tokens)))
            raw.append({"round": rnd, "turn": turn, "router": label.removeprefix("router-"),
                        "concurrency": conc, **cell})
            log(f"[{rnd + 1}/{rounds}] {label:15s} C={conc:2d} per-user "
                f"{cell['per_user_tps']:6.1f} aggregate {cell['aggregate_tps']:7.1f} tok/s  "
                f"TTFT p50 {1000 * cell['ttft_p50']:5.0f} p90 {1000 * cell['ttft_p90']:5.0f} ms")
    return raw


class OtlpSink:
    """An OTLP/HTTP endpoint on loopback that accepts every export and keeps nothing (what
    a collector costs the app, without a collector's work in this process)."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the http.server API)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def run_serve_benchmark(base: ServeConfig, prompts: Sequence[str], cfg: ServeBenchConfig,
                        log: Callable[[str], None] = print,
                        systems: Sequence[ServeSystem] = SYSTEMS,
                        routers: Sequence[str] = ROUTERS) -> dict:
    """Both phases on one local Ray cluster (``start`` makes it on the first deploy).

    NOTE: each app has its own key prefix on the board (``cluster`` = its label), so a
    router reads only its own replicas and a cluster budget only its own group."""
    sink = OtlpSink() if any(s.traced for s in systems) else None
    system_apps = {s.label: replace(base, drafter=s.drafter, budget=s.budget, replicas=1,
                                    cluster=s.label, metrics=s.metrics,
                                    otlp_traces_endpoint=sink.url if s.traced else None,
                                    trace_sample_ratio=s.sample_ratio,
                                    stream_interval=s.stream_interval,
                                    light_drafter=s.light_drafter, draft_gating=s.gating)
                   for s in systems}
    router_apps = {f"router-{r}": replace(base, drafter=DEFAULT_DRAFTER, budget="cluster",
                                          replicas=2, router=r, cluster=f"router-{r}")
                   for r in routers}
    num_cpus = ray_cpus([system_apps, router_apps])
    raw, router_raw = [], []
    for apps, run, out in ((system_apps, run_systems, raw), (router_apps, run_routers,
                                                              router_raw)):
        if not apps:
            continue
        urls = deploy(apps, prompts, num_cpus)
        out += run(urls, base.model_name, prompts, cfg, log)
        undeploy(list(apps))
    if sink is not None:
        sink.close()
    cells = median_cells(raw, ("system", "concurrency"))
    router_cells = median_cells(router_raw, ("router", "concurrency"))
    labels = [s.label for s in systems]
    baseline = cfg.baseline or ("no-spec" if "no-spec" in labels else labels[0] if labels
                                else "")
    return {"cells": cells, "ratios": ratios(cells), "rounds": raw,
            "paired": paired_ratios(raw, "system", baseline, PAIRED),
            "routers": router_cells, "router_ratios": router_ratios(router_cells),
            "router_rounds": router_raw,
            "router_paired": paired_ratios(router_raw, "router", "pow2", PAIRED),
            "config": {**asdict(cfg), "serve": asdict(base)}}
