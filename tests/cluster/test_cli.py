"""The ``dspark`` console script, run as a user runs it, against the committed demo target."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

NATALIA = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether?"
)


def _dspark(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("dspark")
    cmd = [str(exe), *args] if exe.exists() else [sys.executable, "-m", "dspark.cluster.cli", *args]
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_math_prompt_gets_a_step_by_step_solution(demo_target_dir):
    out = _dspark("generate", "--chat", NATALIA, "--checkpoint", str(demo_target_dir)).stdout
    assert re.search(r"\d+ [-+*/] \d+ = \d+", out), out  # worked arithmetic
    assert "\\boxed{" in out, out


def test_code_prompt_gets_code(demo_target_dir):
    prompt = (
        "Complete the following Python function.\n\n```python\ndef count_words(text):\n"
        '    """Return the number of whitespace-separated words in text."""\n```'
    )
    out = _dspark("generate", "--chat", prompt, "--checkpoint", str(demo_target_dir)).stdout
    assert "```python\n" in out, out
    code = out.split("```python\n", 1)[1].split("```", 1)[0]
    tree = ast.parse(code)  # a real Python function, not prose
    assert isinstance(tree.body[0], ast.FunctionDef), code
    # NOTE: the 7.5M-parameter demo target does not copy names from its prompt (see
    # docs/target-model.md), so the function it writes need not be called count_words.


def test_sampling_with_a_seed_reproduces(demo_target_dir):
    args = (
        "generate",
        "--chat",
        "What is the `json` module for?",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--seed",
        "7",
        "--max-tokens",
        "40",
        "--checkpoint",
        str(demo_target_dir),
    )
    assert _dspark(*args).stdout == _dspark(*args).stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("--temperature", "-1"), "temperature must be in [0, 100], got -1.0"),
        (("--max-tokens", "0"), "max_tokens must be >= 1"),
        (
            ("--checkpoint", "/nonexistent/ckpt"),
            "checkpoint directory /nonexistent/ckpt does not exist",
        ),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(demo_target_dir, args, fragment):
    base = ["generate", "hello", "--checkpoint", str(demo_target_dir)]
    proc = _dspark(*base, *args, check=False)
    assert proc.returncode == 2
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr


def test_prompt_longer_than_context_is_rejected(demo_target_dir):
    proc = _dspark("generate", "word " * 2000, "--checkpoint", str(demo_target_dir), check=False)
    assert proc.returncode == 2
    assert "but the model's context is" in proc.stderr


def test_eval_only_reports_the_documented_heldout_loss(demo_target_dir):
    """The command docs/target-model.md quotes; the committed target stays in its band."""
    import json

    proc = _dspark("train", "target", "--eval-only", "--out", str(demo_target_dir), "--seed", "0")
    nats = json.loads(proc.stdout)["heldout_nats_per_answer_token"]
    assert set(nats) == {"math", "code", "chat"}
    assert nats["math"] < 1.0 and nats["code"] < 2.5 and nats["chat"] < 2.5, nats
