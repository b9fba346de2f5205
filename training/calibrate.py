"""Sequential Temperature Scaling of a drafter's confidence head (paper §3.2.1).

Runs real speculative decoding (T = 1, full blocks) on the corpus's *calibration* split,
records each round's raw confidence logits and accepted count, fits one temperature per
position in order (each on top of the already calibrated prefix survival), and stores the
temperatures in the drafter checkpoint's ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dspark.models.calibration import calibration_report, fit_sts
from dspark.models.drafter_checkpoint import load_drafter
from dspark.models.generation import load_for_generation
from dspark.training.drafter_data import DrafterDataConfig, choose_prompts
from dspark.workers.offline import run_rounds


def calibrate_drafter(
    target_dir: str | Path,
    drafter_dir: str | Path,
    prompts_per_domain: int = 60,
    max_new_tokens: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Fit STS on calibration-split rounds and write it into the drafter's config."""
    target, tokenizer = load_for_generation(target_dir)
    drafter = load_drafter(drafter_dir, target)
    cfg = drafter.config
    if not cfg.confidence_head:
        raise ValueError(f"the {cfg.method} drafter at {drafter_dir} has no confidence head")
    prompts = choose_prompts(
        tokenizer, DrafterDataConfig(seed=seed), "calibration", prompts_per_domain
    )
    rounds = run_rounds(
        target,
        drafter,
        [ids for _, ids in prompts],
        tokenizer.stop_ids,
        1.0,
        max_new_tokens,
        seed,
        progress=progress,
        label="calibration rounds",
    )
    logits, proposed, accepted = rounds.confidence_arrays(cfg.block_size)
    temps = fit_sts(logits, proposed, accepted)
    raw = calibration_report(logits, proposed, accepted)
    fitted = calibration_report(logits, proposed, accepted, temperatures=temps)
    new_cfg = dataclasses.replace(cfg, sts_temperatures=tuple(temps))
    new_cfg.save(Path(drafter_dir) / "config.json")
    summary = {
        "rounds": int(len(proposed)),
        "prompts": len(prompts),
        "temperatures": temps,
        "ece_raw": raw["summary"]["ece"],
        "ece_sts": fitted["summary"]["ece"],
    }
    (Path(drafter_dir) / "calibration.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
