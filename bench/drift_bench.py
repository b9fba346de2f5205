"""``dspark bench drift``: the calibration-drift monitor on the serving engine, measured.

Three phases, each a closed loop of fresh held-out requests through the engine (T=1,
every draft verified, so each round observes all K positions as ``dspark eval`` does):

1. **calibrated**: the committed drafter with its STS temperatures. The monitor's online
   ECE is compared with the offline ECE of ``dspark eval`` (``--offline``).
2. **miscalibrated**: the budget and the monitor use the temperatures times
   ``miscalibration`` (a deliberately over-confident head, for this benchmark only), with
   the opt-in refit on. The monitor must flag drift and refit.
3. **refitted**: new requests with the refitted temperatures and a fresh monitor: the
   online ECE out of sample, against the threshold.

Losslessness is not at stake in any phase (verification decides every token); the budget's
choices, and so throughput, are.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dspark.bench.closed_loop import run_cell
from dspark.bench.engine_bench import domain_prompts
from dspark.models.generation import SamplingParams


@dataclass(frozen=True)
class DriftBenchConfig:
    requests: int = 160
    """Requests per phase."""
    concurrency: int = 16
    max_tokens: int = 64
    temperature: float = 1.0
    miscalibration: float = 0.25
    """Factor on the STS temperatures in the miscalibrated phase (< 1: over-confident)."""
    threshold: float = 0.05
    """The monitor's drift threshold (online ECE)."""
    window: int = 4096
    check_every: int = 256
    threads: int = 2

    def __post_init__(self) -> None:
        for name in ("requests", "concurrency", "max_tokens", "window", "check_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.miscalibration:
            raise ValueError(f"miscalibration must be > 0, got {self.miscalibration}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")


def _phase(engine, monitor, prompts, stop_ids, cfg: DriftBenchConfig, offset: int) -> dict:
    engine.on_round = monitor.on_round
    start = time.perf_counter()
    initial = monitor.temperatures

    def params(i: int) -> SamplingParams:
        return SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens)

    rotated = prompts[offset:] + prompts[:offset]  # NOTE: each phase starts elsewhere
    _, tokens, wall, _ = run_cell(engine, rotated, stop_ids, cfg.concurrency, cfg.requests,
                                  params)
    monitor.check()
    snap = monitor.snapshot().to_dict()
    return {"tokens": tokens, "seconds": round(time.perf_counter() - start, 2),
            "initial_temperatures": list(initial),
            "ece": snap["ece"], "drifted": snap["drifted"], "samples": snap["total_samples"],
            "rounds": snap["num_rounds"], "temperatures": snap["temperatures"],
            "mean_predicted": snap["overall_predicted"], "mean_observed": snap["overall_observed"],
            "ece_per_position": snap["ece_per_position"], "refits": snap["refits"]}


def run_drift_benchmark(cfg: DriftBenchConfig, target_dir: str, drafter_dir: str) -> dict:
    import torch

    from dspark.models.drafter_checkpoint import load_drafter
    from dspark.models.generation import load_for_generation
    from dspark.workers.calibration_monitor import CalibrationMonitor, MonitorConfig
    from dspark.workers.engine import Engine, EngineConfig

    torch.set_num_threads(cfg.threads)
    target, tok = load_for_generation(target_dir)
    drafter = load_drafter(Path(drafter_dir), target)
    prompts = domain_prompts(tok, target.config.max_position_embeddings, cfg.max_tokens, 48, 1)
    engine = Engine(target, drafter, EngineConfig(budget="fixed", max_num_seqs=cfg.concurrency))
    sts = tuple(drafter.config.sts_temperatures)

    def monitor(temps, refit):
        return CalibrationMonitor(temps, MonitorConfig(
            window=cfg.window, threshold=cfg.threshold, check_every=cfg.check_every,
            refit=refit), on_refit=engine.set_confidence_temperatures)

    third = len(prompts) // 3
    calibrated = _phase(engine, monitor(sts, False), prompts, tok.stop_ids, cfg, 0)
    wrong = tuple(t * cfg.miscalibration for t in sts)
    engine.set_confidence_temperatures(wrong)
    miscalibrated = _phase(engine, monitor(wrong, True), prompts, tok.stop_ids, cfg, third)
    refitted_temps = tuple(miscalibrated["temperatures"])
    engine.set_confidence_temperatures(refitted_temps)
    refitted = _phase(engine, monitor(refitted_temps, False), prompts, tok.stop_ids, cfg,
                      2 * third)
    return {"config": asdict(cfg), "drafter": str(drafter_dir), "sts": list(sts),
            "phases": {"calibrated": calibrated, "miscalibrated": miscalibrated,
                       "refitted": refitted}}


def offline_ece(acceptance_json: str | Path, drafter: str = "dspark") -> float | None:
    """The summary ECE after STS that ``dspark eval`` recorded for ``drafter``."""
    path = Path(acceptance_json)
    if not path.is_file():
        return None
    report = json.loads(path.read_text())["calibration"].get(drafter)
    return report["sts"]["summary"]["ece"] if report else None


def render(result: dict, command: str) -> str:
    p = result["phases"]
    cfg = result["config"]

    def pct(x):
        return "-" if x is None else f"{100 * x:.2f} %"

    lines = [f"Command: `{command}`", "",
             f"Engine, budget fixed (all {len(result['sts'])} drafts verified), T="
             f"{cfg['temperature']:g}, C={cfg['concurrency']}, {cfg['requests']} requests per "
             f"phase; drift threshold {pct(cfg['threshold'])}.", "",
             "| phase | temperatures (start → end) | rounds | observations | drift flagged "
             "| online ECE at the end | mean predicted / observed survival at the end |",
             "|---|---|---:|---:|---|---:|---:|"]
    for name, ph in p.items():
        start = ", ".join(f"{t:.2f}" for t in ph["initial_temperatures"])
        end = ", ".join(f"{t:.2f}" for t in ph["temperatures"])
        temps = start if start == end else f"{start} → {end}"
        flags = [f"at round {e['round_index']} (ECE {pct(e['ece_before'])}), refitted"
                 for e in ph["refits"]]
        flagged = "; ".join(flags) or ("yes" if ph["drifted"] else "no")
        lines.append(f"| {name} | {temps} | {ph['rounds']} | {ph['samples']} | {flagged} | "
                     f"{pct(ph['ece'])} | {pct(ph['mean_predicted'])} / "
                     f"{pct(ph['mean_observed'])} |")
    lines.append("")
    if result.get("offline_ece") is not None:
        lines.append(f"Offline ECE of `dspark eval` (after STS, all evaluation rounds pooled): "
                     f"{pct(result['offline_ece'])}.")
    for event in p["miscalibrated"]["refits"]:
        lines.append(f"Refit after {event['round_index']} rounds on {event['num_samples']} "
                     f"observations: ECE {pct(event['ece_before'])} -> "
                     f"{pct(event['ece_after'])} (in sample).")
    return "\n".join(lines) + "\n"


def write_results(result: dict, out: str | Path, command: str) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {**result, "command": command}
    paths = [out / "drift.json", out / "drift.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(render(result, command))
    return paths
