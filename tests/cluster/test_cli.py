"""The ``dspark`` console script, run as a user runs it, against the committed demo target;
and its parser: fast to build, every flag's help states its default, and flags that carry a
config dataclass's fields agree with it."""

import argparse
import ast
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from dspark.cluster.cli import MIRRORS, build_parser
from dspark.cluster.cli.common import recorded_command

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
    assert "the context is" in proc.stderr


def test_eval_only_reports_the_documented_heldout_loss(demo_target_dir):
    """The command docs/target-model.md quotes; the committed target stays in its band."""
    import json

    proc = _dspark("train", "target", "--eval-only", "--out", str(demo_target_dir), "--seed", "0")
    nats = json.loads(proc.stdout)["heldout_nats_per_answer_token"]
    assert set(nats) == {"math", "code", "chat"}
    assert nats["math"] < 1.0 and nats["code"] < 2.5 and nats["chat"] < 2.5, nats


def test_help_imports_no_heavy_dependency():
    """`dspark --help` (and every subcommand's) builds the parser without torch, Ray, the
    bench or training packages: each subcommand imports them only when it runs."""
    script = textwrap.dedent("""
        import sys
        from dspark.cluster.cli import main
        for argv in (["--help"], ["bench", "engine", "--help"], ["serve", "--help"]):
            try:
                main(argv)
            except SystemExit:
                pass
        heavy = ("torch", "ray", "numpy", "dspark.bench", "dspark.training", "dspark.models")
        print(sorted(m for m in sys.modules if m.startswith(heavy)), file=sys.stderr)
    """)
    proc = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "[]", proc.stderr


def test_module_runs_as_the_console_script():
    proc = subprocess.run([sys.executable, "-P", "-m", "dspark.cluster.cli", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: dspark"), proc.stderr


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(subcommand path, parser) of every leaf command."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from _commands(child, path + (name,))


def test_every_flag_states_its_default():
    commands = dict(_commands(build_parser()))
    assert set(commands) == {("generate",), ("train", "target"), ("train", "drafter"),
                             ("train", "draft-vocab"),
                             ("corpus", "build"), ("eval",), ("bench", "engine"),
                             ("bench", "serve"), ("bench", "ep"), ("bench", "drift"),
                             ("bench", "faults"), ("bench", "attacks"),
                             ("serve",), ("dashboards",), ("k8s", "render")}
    for path, parser in commands.items():
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            stated = "(required)" if action.required else "(default: "
            assert action.help and stated in action.help, (path, action.option_strings)


def _field_docs(cls) -> dict[str, str]:
    """Each dataclass field's docstring (the string under it in the class body)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        node.target.id: " ".join(after.value.value.split())
        for node, after in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
    }


def _field_default(f):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def _as_field_value(value, field_default):
    """A flag's string default as the field holds it: comma lists as tuples, JSON as dicts."""
    if isinstance(value, str) and isinstance(field_default, tuple):
        return tuple(type(field_default[0])(v) for v in value.split(","))
    if isinstance(value, str) and isinstance(field_default, dict):
        return json.loads(value)
    return value


@pytest.mark.parametrize("mirror", MIRRORS, ids=lambda m: f"{' '.join(m.command)}:{m.config}")
def test_flags_carrying_a_config_field_match_its_default_and_doc(mirror):
    module, name = mirror.config.split(":")
    config = getattr(importlib.import_module(module), name)
    defaults = {f.name: _field_default(f) for f in fields(config)}
    docs = _field_docs(config)
    parser = dict(_commands(build_parser()))[mirror.command]
    carried = {}
    for action in parser._actions:
        field = mirror.renamed.get(action.dest, action.dest)
        if field in defaults:
            carried[field] = action
    assert set(mirror.renamed.values()) | mirror.own_defaults <= set(carried), carried
    for field, action in carried.items():
        flag = action.option_strings[0]
        if field in docs:
            assert docs[field] in action.help, f"{flag}: help does not quote {name}.{field}"
        if defaults[field] is MISSING:
            assert action.required, f"{flag}: {name}.{field} has no default"
            continue
        value = _as_field_value(action.default, defaults[field])
        if field in mirror.own_defaults:  # a stale exception would hide a future drift
            assert value != defaults[field], f"{flag} now equals {name}.{field}'s default"
        else:
            assert value == defaults[field], f"{flag} {value!r} != {name}.{field} {defaults[field]!r}"


def test_results_record_the_command_as_typed(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["dspark", "bench", "engine", "--rounds", "1"])
    assert recorded_command("bench", "engine") == "dspark bench engine --rounds 1"
    assert recorded_command("bench", "serve") == "dspark bench serve"  # another command
    monkeypatch.setattr(sys, "argv", ["dspark", "eval"])
    assert recorded_command("eval") == "dspark eval"
    # an empty or spaced argument is quoted, so the recorded line runs as typed
    monkeypatch.setattr(sys, "argv", ["dspark", "bench", "serve", "--systems", "", "--out", "a b"])
    assert recorded_command("bench", "serve") == "dspark bench serve --systems '' --out 'a b'"
