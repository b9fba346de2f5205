"""``dspark generate --drafter``, ``dspark eval`` and ``dspark train drafter`` as a user runs
them, against the committed demo target and drafters."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DRAFTERS = REPO / "checkpoints" / "drafters"
NATALIA = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether?"
)


def _dspark(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("dspark")
    cmd = [str(exe), *args] if exe.exists() else [sys.executable, "-m", "dspark.cluster.cli", *args]
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("drafter", ["dspark", "dflash", "eagle3", "mtp"])
def test_speculative_greedy_text_equals_plain_and_reports_acceptance(drafter):
    plain = _dspark("generate", "--chat", NATALIA, "--max-tokens", "80")
    spec = _dspark("generate", "--chat", NATALIA, "--max-tokens", "80", "--drafter", drafter)
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    assert "accepted length τ =" in spec.stderr, spec.stderr


def test_unknown_drafter_is_a_clear_error():
    proc = _dspark("generate", "--chat", "hi", "--drafter", "medusa")
    assert proc.returncode == 2
    assert "--drafter 'medusa'" in proc.stderr and "dspark" in proc.stderr


def test_eval_on_a_prompt_file_writes_table_json_and_figures(tmp_path):
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"turns": [t]}) for t in (NATALIA, "What is the os module for?"))
    )
    out = tmp_path / "eval"
    proc = _dspark(
        "eval",
        "--prompts",
        str(prompts),
        "--num-prompts",
        "2",
        "--max-new-tokens",
        "24",
        "--drafters",
        f"dspark={DRAFTERS / 'dspark'},mtp={DRAFTERS / 'mtp'}",
        "--jobs",
        "1",
        "--out",
        str(out),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "acceptance.json").read_text())
    dspark = report["drafters"]["dspark"]["sets"]["mine"]
    mtp = report["drafters"]["mtp"]["sets"]["mine"]
    assert dspark["prompts"] == 2 and 1.0 <= dspark["tau"] <= 8.0
    assert 1.0 <= mtp["tau"] <= 2.0  # MTP-1 proposes one token: at most 1 + bonus
    assert "| dspark |" in (out / "acceptance.md").read_text()
    for png in (
        "conditional_acceptance_other.png",
        "reliability_dspark.png",
        "tau.png",
        "threshold_sweep.png",
    ):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    cal = report["calibration"]["dspark"]
    assert "sts" in cal and cal["raw"]["summary"]["count"] > 0


def test_eval_rejects_a_bad_prompt_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no turns"}\n')
    proc = _dspark("eval", "--prompts", str(bad), "--drafters", f"mtp={DRAFTERS / 'mtp'}")
    assert proc.returncode == 2 and "turns" in proc.stderr


def test_train_drafter_rejects_bad_recipes():
    proc = _dspark("train", "drafter", "--method", "dspark", "--epochs", "0")
    assert proc.returncode == 2 and "epochs must be >= 1" in proc.stderr


def test_committed_drafters_are_bound_to_the_committed_target():
    for name in ("dspark", "dflash", "eagle3", "mtp", "dflash-l1", "dspark-ce"):
        cfg = json.loads((DRAFTERS / name / "config.json").read_text())
        assert cfg["target_name"] == "dspark-demo-target"
    dspark = json.loads((DRAFTERS / "dspark" / "config.json").read_text())
    assert len(dspark["sts_temperatures"]) == 7
    total = sum(p.stat().st_size for p in (REPO / "checkpoints").rglob("*") if p.is_file())
    assert total <= 40 * 2**20
