"""`dspark bench serve`: an online load benchmark over HTTP against the served app.

Each system (no speculation, MTP-1, DSpark with the local-load budget, DSpark with the
cluster-load budget) is deployed in turn on one local Ray cluster and driven by closed-loop
streaming clients at each concurrency; then two replicas are driven with a skewed workload
(long and short requests mixed) under the load-board router and under Ray Serve's
power-of-two router. All of it runs in one invocation, so the ratios compare like with like.

Per request: TTFT (first content chunk), time per output token after the first (TPOT, the
inter-token latency per token; speculative steps commit several tokens per chunk), and
per-user tokens/s (tokens over the request's whole time). Per cell: aggregate tokens/s.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx

from dspark.bench.engine_bench import baseline_ratios, ratio_columns
from dspark.cluster.config import ServeConfig


@dataclass(frozen=True)
class ServeSystem:
    label: str
    drafter: str
    budget: str


SYSTEMS = (
    ServeSystem("no-spec", "none", "fixed"),
    ServeSystem("mtp-1", "mtp", "fixed"),
    ServeSystem("dspark-local", "dspark", "algorithm1"),
    ServeSystem("dspark-cluster", "dspark", "cluster"),
)


@dataclass
class RequestResult:
    ttft: float
    tpot: float | None
    tokens: int
    total: float


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
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
                      num_requests: int, make_body: Callable[[int], dict]) -> dict:
    results: list[RequestResult] = []
    counter = iter(range(num_requests))

    async def worker(client):
        for i in counter:
            body = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                    **make_body(i)}
            results.append(await stream_one(client, url, body))

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


def run_serve_benchmark(base: ServeConfig, prompts: Sequence[str], concurrencies: Sequence[int],
                        max_tokens: int, skew_concurrency: int,
                        log: Callable[[str], None] = print,
                        systems: Sequence[ServeSystem] = SYSTEMS,
                        routers: Sequence[str] = ("board", "pow2")) -> dict:
    from ray import serve

    from dspark.cluster.serve import start

    cells = []
    for system in systems:
        cfg = replace(base, drafter=system.drafter, budget=system.budget, replicas=1)
        start(cfg, app_name=system.label, route_prefix=f"/{system.label}")
        url = f"http://{cfg.host}:{cfg.port}/{system.label}"
        asyncio.run(closed_loop(url, cfg.model_name, prompts, 2, 4,
                                lambda i: {"max_tokens": 8, "temperature": 0}))  # warm-up
        for conc in concurrencies:
            cell = asyncio.run(closed_loop(
                url, cfg.model_name, prompts, conc, max(8, 2 * conc),
                lambda i: {"max_tokens": max_tokens, "temperature": 0}))
            cells.append({"system": system.label, "concurrency": conc, **cell})
            log(f"{system.label:15s} C={conc:2d} per-user {cell['per_user_tps']:6.1f} "
                f"aggregate {cell['aggregate_tps']:7.1f} tok/s  TTFT p50 "
                f"{1000 * cell['ttft_p50']:6.0f} ms  TPOT p50 {1000 * cell['tpot_p50']:5.1f} ms")
        serve.delete(system.label)
    router_cells = []
    for router in routers:
        label = f"router-{router}"
        cfg = replace(base, drafter="dspark", budget="cluster", replicas=2, router=router)
        start(cfg, app_name=label, route_prefix=f"/{label}")
        url = f"http://{cfg.host}:{cfg.port}/{label}"

        def skewed(i: int) -> dict:  # one request in four is long
            long = i % 4 == 0
            return {"max_tokens": 4 * max_tokens if long else max_tokens // 4,
                    "temperature": 0, "ignore_eos": long}

        cell = asyncio.run(closed_loop(url, cfg.model_name, prompts, skew_concurrency,
                                       4 * skew_concurrency, skewed))
        router_cells.append({"router": router, "concurrency": skew_concurrency, **cell})
        log(f"{label:15s} C={skew_concurrency:2d} per-user {cell['per_user_tps']:6.1f} "
            f"aggregate {cell['aggregate_tps']:7.1f} tok/s  TTFT p90 "
            f"{1000 * cell['ttft_p90']:6.0f} ms")
        serve.delete(label)
    return {"cells": cells, "routers": router_cells, "ratios": ratios(cells),
            "config": {"concurrencies": list(concurrencies), "max_tokens": max_tokens,
                       "skew_concurrency": skew_concurrency, "serve": asdict(base)}}


def ratios(cells: Sequence[dict]) -> list[dict]:
    return baseline_ratios(cells, ("concurrency",))


def markdown(result: dict) -> str:
    ratio = {(r["system"], r["concurrency"]): r for r in result["ratios"]}
    lines = ["| system | C | per-user tok/s | aggregate tok/s | × no-spec (user / agg) | "
             "× MTP-1 (user / agg) | TTFT p50 / p90 ms | TPOT p50 / p90 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["cells"]:
        r = ratio[(c["system"], c["concurrency"])]
        lines.append(
            f"| {c['system']} | {c['concurrency']} | {c['per_user_tps']:.1f} | "
            f"{c['aggregate_tps']:.1f} | {ratio_columns(r)} | {1000 * c['ttft_p50']:.0f} / "
            f"{1000 * c['ttft_p90']:.0f} | {1000 * c['tpot_p50']:.1f} / "
            f"{1000 * c['tpot_p90']:.1f} |")
    lines += ["", "Skewed workload (one request in four is 4× long), two replicas:", "",
              "| router | C | per-user tok/s | aggregate tok/s | TTFT p50 / p90 / p99 ms |",
              "|---|---:|---:|---:|---:|"]
    for c in result["routers"]:
        lines.append(f"| {c['router']} | {c['concurrency']} | {c['per_user_tps']:.1f} | "
                     f"{c['aggregate_tps']:.1f} | {1000 * c['ttft_p50']:.0f} / "
                     f"{1000 * c['ttft_p90']:.0f} / {1000 * c['ttft_p99']:.0f} |")
    return "\n".join(lines) + "\n"


def write_results(result: dict, out_dir: str | Path, command: str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serve.json").write_text(json.dumps(dict(result, command=command), indent=1))
    (out_dir / "serve.md").write_text(f"Command: `{command}`\n\n" + markdown(result))
    return [out_dir / "serve.json", out_dir / "serve.md"]
