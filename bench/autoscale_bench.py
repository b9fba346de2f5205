"""The board autoscaling policy against Serve's request-based one, on the same ramp.

    python -m dspark.bench.autoscale_bench [--rounds 3] [--out docs/results/autoscaling]

In each of ``--rounds`` rounds (the policies' order alternating, so neither always runs
first on a fresh cluster), each policy gets a fresh app (DSpark, 1 to ``--max-replicas``
replicas) on one local Ray cluster, then the same ramp: ``--idle-s`` idle, ``--burst-s`` of ``--clients`` closed-loop
streaming clients, ``--idle-s`` idle again. Every half second the running replicas are
sampled. Per policy it reports:

- time to scale up: from the burst's start to the first added replica running;
- requests whose time to first token passed ``--slo-s`` (and their share);
- replica-seconds over the ramp (the cost);
- time to scale back down to the minimum after the burst.

Each figure is the median over rounds with [min–max]; every round's row is kept too.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import replace
from pathlib import Path


def _running(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or "TargetShard" not in status.deployments:
        return 0
    return sum(n for state, n in status.deployments["TargetShard"].replica_states.items()
               if str(state).endswith("RUNNING"))


def _client(url: str, model: str, stop: threading.Event, out: list, lock) -> None:
    import httpx

    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 96, "stream": True,
            "ignore_eos": True, "temperature": 0}
    while not stop.is_set():
        start = time.monotonic()
        ttft = None
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if ttft is None and line.startswith("data: {"):
                        ttft = time.monotonic() - start
                ok = r.status_code == 200
        except Exception:
            ok = False
        with lock:
            out.append({"start": start, "ttft": ttft, "ok": ok})


def ramp(url: str, app: str, model: str, args) -> dict:
    samples, requests, lock = [], [], threading.Lock()
    t0 = time.monotonic()
    stop_sampling = threading.Event()

    def sample():
        while not stop_sampling.is_set():
            samples.append((time.monotonic() - t0, _running(app)))
            stop_sampling.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(args.idle_s)  # NOTE: the ramp's idle phase is the experiment, not a wait
    burst_start = time.monotonic() - t0
    stop = threading.Event()
    clients = [threading.Thread(target=_client, args=(url, model, stop, requests, lock),
                                daemon=True) for _ in range(args.clients)]
    for c in clients:
        c.start()
    time.sleep(args.burst_s)
    stop.set()
    for c in clients:
        c.join(timeout=120)
    burst_end = time.monotonic() - t0
    time.sleep(args.idle_s)
    stop_sampling.set()
    sampler.join()
    lo = args.min_replicas
    up = next((t - burst_start for t, n in samples if t >= burst_start and n > lo), None)
    down = next((t - burst_end for t, n in samples if t >= burst_end and n <= lo), None)
    seconds = sum(n * 0.5 for _, n in samples)
    late = [r for r in requests if r["ttft"] is None or r["ttft"] > args.slo_s]
    return {"time_to_scale_up_s": up, "time_to_scale_down_s": down,
            "replica_seconds": seconds, "requests": len(requests),
            "past_slo": len(late), "past_slo_share": len(late) / max(1, len(requests)),
            "max_replicas_seen": max((n for _, n in samples), default=0),
            "samples": samples, "burst": [burst_start, burst_end]}


def run(args) -> dict:
    import ray
    from ray import serve

    from dspark.cluster.config import ServeConfig
    from dspark.cluster.serve import start
    from dspark.router.redis_server import EmbeddedRedis, free_port

    redis = EmbeddedRedis().start()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    base = ServeConfig(port=free_port(), redis_url=redis.url, threads=1, replica_cpus=0.5,
                       max_num_seqs=4, replicas=args.min_replicas,
                       min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                       upscale_delay_s=2.0, downscale_delay_s=10.0, autoscaling_horizon_s=5.0)
    rounds: list[dict] = []
    try:
        for k in range(args.rounds):
            order = POLICIES if k % 2 == 0 else POLICIES[::-1]
            results = {}
            for policy in order:
                app = f"scale-{policy}-{k}"
                cfg = replace(base, autoscaling=policy, cluster=app, model_name=app)
                start(cfg, app_name=app, route_prefix=f"/{app}")
                url = f"http://127.0.0.1:{base.port}/{app}"
                results[policy] = ramp(url, app, app, args)
                serve.delete(app)
                print(f"[{k + 1}/{args.rounds}] {policy}: " + _row(results[policy]), flush=True)
            rounds.append(results)
    finally:
        serve.shutdown()
        ray.shutdown()
        redis.stop()
    return {"rounds": rounds, "config": vars(args)}


POLICIES = ("requests", "board")
METRICS = ("time_to_scale_up_s", "max_replicas_seen", "requests", "past_slo_share",
           "replica_seconds", "time_to_scale_down_s")


def _row(r: dict) -> str:
    return ", ".join(f"{m} {r[m]}" if not isinstance(r[m], float) else f"{m} {r[m]:.2f}"
                     for m in METRICS)


def summary(rounds: list[dict]) -> dict[str, dict[str, tuple]]:
    """Per policy and metric: (median, min, max, rounds where it never happened)."""
    import statistics

    out: dict[str, dict[str, tuple]] = {}
    for policy in POLICIES:
        out[policy] = {}
        for m in METRICS:
            values = [r[policy][m] for r in rounds]
            seen = [v for v in values if v is not None]
            out[policy][m] = ((statistics.median(seen), min(seen), max(seen)) if seen
                              else (None, None, None)) + (len(values) - len(seen),)
    return out


def markdown(result: dict, command: str) -> str:
    cfg = result["config"]
    rounds = result["rounds"]
    lines = [f"Command: `{command}`", "",
             f"Ramp: {cfg['idle_s']:g} s idle, {cfg['burst_s']:g} s of {cfg['clients']} "
             f"streaming clients, {cfg['idle_s']:g} s idle; replicas "
             f"{cfg['min_replicas']}–{cfg['max_replicas']}; SLO: first token within "
             f"{cfg['slo_s']:g} s. {len(rounds)} rounds, the policies' order alternating; "
             "median [min–max] over rounds (\"never\": rounds where it did not happen "
             f"within the {cfg['idle_s']:g} s after the burst).", "",
             "| policy | time to scale up | most replicas | requests served | past the SLO | "
             "replica-seconds | time back to the minimum |", "|---|---:|---:|---:|---:|---:|---:|"]

    def cell(stat: tuple, fmt: str, unit: str = "") -> str:
        med, lo, hi, never = stat
        if med is None:
            return "never"
        text = f"{med:{fmt}}{unit} [{lo:{fmt}}–{hi:{fmt}}]"
        return text + (f", never in {never}" if never else "")

    for name, stats in summary(rounds).items():
        share = tuple(None if v is None else 100 * v for v in stats["past_slo_share"][:3]) + (
            stats["past_slo_share"][3],)
        lines.append(
            f"| {name} | {cell(stats['time_to_scale_up_s'], '.1f', ' s')} | "
            f"{cell(stats['max_replicas_seen'], 'g')} | {cell(stats['requests'], 'g')} | "
            f"{cell(share, '.0f', ' %')} | {cell(stats['replica_seconds'], '.0f')} | "
            f"{cell(stats['time_to_scale_down_s'], '.1f', ' s')} |")
    lines += ["", "Every round:", "", "| round | policy | up | most | served | past SLO | "
              "replica-s | back down |", "|---:|---|---:|---:|---:|---:|---:|---:|"]

    def sec(x):
        return "never" if x is None else f"{x:.1f} s"

    for k, results in enumerate(rounds, start=1):
        for name, r in results.items():
            lines.append(f"| {k} | {name} | {sec(r['time_to_scale_up_s'])} | "
                         f"{r['max_replicas_seen']} | {r['requests']} | "
                         f"{100 * r['past_slo_share']:.0f} % | {r['replica_seconds']:.0f} | "
                         f"{sec(r['time_to_scale_down_s'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clients", type=int, default=12, help="streaming clients in the burst")
    parser.add_argument("--idle-s", type=float, default=15.0, help="idle before and after")
    parser.add_argument("--burst-s", type=float, default=45.0, help="length of the burst")
    parser.add_argument("--slo-s", type=float, default=2.0, help="time-to-first-token SLO")
    parser.add_argument("--min-replicas", type=int, default=1, help="fewest replicas")
    parser.add_argument("--max-replicas", type=int, default=3, help="most replicas")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both policies")
    parser.add_argument("--out", default="runs/autoscaling", help="results directory")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    result = run(args)
    command = ("python -m dspark.bench.autoscale_bench " + " ".join(argv)).strip()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ramp.json").write_text(json.dumps({**result, "command": command}, indent=1))
    text = markdown(result, command)
    (out / "ramp.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
