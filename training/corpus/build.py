"""The corpus: train / calibration / held-out splits of three domains, deterministic for a seed.

- ``math``: seeded GSM8K-like word problems with step-by-step solutions ending in ``\\boxed{}``;
- ``code``: standard-library functions (prompt: signature and docstring; answer: the function);
- ``chat``: English prose from the standard library's docs as question -> answer turns.

A record is ``{"id", "domain", "messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``;
held-out prompts are also written as ``{"turns": [...]}`` records, the evaluation format.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from dspark.training.corpus.chat_tasks import iter_chat_tasks
from dspark.training.corpus.code_tasks import iter_code_tasks
from dspark.training.corpus.math_problems import generate_problems

DOMAINS = ("math", "code", "chat")
SPLITS = ("train", "calibration", "heldout")


@dataclass(frozen=True)
class CorpusConfig:
    """Sizes of the splits; the stdlib-derived domains are split by fraction."""

    seed: int = 0
    """Seeds every choice: phrasing, shuffles, split membership, math problems."""
    math_train: int = 30000
    """Math problems in the train split (the generator is unbounded)."""
    math_eval: int = 600
    """Math problems in each of the calibration and held-out splits."""
    eval_fraction: float = 0.06
    """Share of code and chat items in each of the calibration and held-out splits."""

    def __post_init__(self) -> None:
        if self.math_train <= 0 or self.math_eval <= 0:
            raise ValueError("math_train and math_eval must be positive")
        if not 0.0 < self.eval_fraction < 0.34:
            raise ValueError(f"eval_fraction must be in (0, 0.34), got {self.eval_fraction}")


def _record(domain: str, idx: int, prompt: str, answer: str) -> dict:
    return {
        "id": f"{domain}-{idx:06d}",
        "domain": domain,
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ],
    }


def _split_items(items: list[tuple[str, str]], seed: int, frac: float) -> dict[str, list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(items) * frac))
    cal = [items[i] for i in order[:n_eval]]
    held = [items[i] for i in order[n_eval : 2 * n_eval]]
    train = [items[i] for i in order[2 * n_eval :]]
    # NOTE: the same stub can occur in two modules; an evaluation prompt that also occurs in
    # an earlier split is dropped (after the shuffle, so the train split does not move).
    seen = {prompt for prompt, _ in train}
    cal = [it for it in cal if it[0] not in seen]
    seen.update(prompt for prompt, _ in cal)
    held = [it for it in held if it[0] not in seen]
    return {"train": train, "calibration": cal, "heldout": held}


def _math_splits(cfg: CorpusConfig) -> dict[str, list[tuple[str, str]]]:
    train = generate_problems(cfg.seed * 1000 + 1, cfg.math_train)
    seen = {p.question for p in train}
    out = {"train": [(p.question, p.solution) for p in train]}
    for n, split in enumerate(("calibration", "heldout"), start=2):
        fresh = [
            p
            for p in generate_problems(cfg.seed * 1000 + n, cfg.math_eval * 2)
            if p.question not in seen
        ]
        fresh = fresh[: cfg.math_eval]
        seen.update(p.question for p in fresh)
        out[split] = [(p.question, p.solution) for p in fresh]
    return out


def build_corpus(cfg: CorpusConfig) -> dict[str, dict[str, list[dict]]]:
    """``corpus[domain][split]`` -> records."""
    pairs = {
        "math": _math_splits(cfg),
        "code": _split_items(
            [(t.prompt, t.answer) for t in iter_code_tasks(cfg.seed)],
            cfg.seed + 11,
            cfg.eval_fraction,
        ),
        "chat": _split_items(
            [(t.prompt, t.answer) for t in iter_chat_tasks(cfg.seed)],
            cfg.seed + 13,
            cfg.eval_fraction,
        ),
    }
    corpus: dict[str, dict[str, list[dict]]] = {}
    for domain in DOMAINS:
        corpus[domain] = {}
        idx = 0
        for split in SPLITS:
            recs = []
            for prompt, answer in pairs[domain][split]:
                recs.append(_record(domain, idx, prompt, answer))
                idx += 1
            corpus[domain][split] = recs
    return corpus


def write_corpus(corpus: dict[str, dict[str, list[dict]]], out_dir: str | Path) -> list[Path]:
    """Write ``{domain}/{split}.jsonl`` plus ``{domain}/heldout_prompts.jsonl`` ({"turns"})."""
    out_dir = Path(out_dir)
    written = []
    for domain, splits in corpus.items():
        (out_dir / domain).mkdir(parents=True, exist_ok=True)
        for split, recs in splits.items():
            path = out_dir / domain / f"{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in recs))
            written.append(path)
        prompts = out_dir / domain / "heldout_prompts.jsonl"
        prompts.write_text(
            "".join(
                json.dumps({"turns": [r["messages"][0]["content"]]}) + "\n"
                for r in splits["heldout"]
            )
        )
        written.append(prompts)
    return written


def read_split(corpus_dir: str | Path, domain: str, split: str) -> list[dict]:
    path = Path(corpus_dir) / domain / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"corpus split {path} is missing; run `dspark corpus build`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
