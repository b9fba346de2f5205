"""Runs the acceptance table: every drafter on every prompt set, then the report.

Prompt sets: the corpus's held-out prompts per domain (math, code, chat) and fixed subsets
of real benchmark prompts committed in ``bench/eval_prompts`` (gsm8k, math500, humaneval,
mbpp, mt-bench), or any ``{"turns": [...]}`` JSONL file. Jobs (drafter x set) run in
``jobs`` worker processes with one thread each.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from dataclasses import asdict
from pathlib import Path

from dspark.bench.acceptance import (
    BENCHMARKS,
    DOMAIN_SETS,
    PROMPT_DIR,
    EvalConfig,
    fitting_prompts,
    fitting_texts,
    read_turns,
)

DRAFTER_ORDER = ("mtp", "eagle3", "dflash-d1", "dflash-d2", "dflash", "dflash-l1", "dspark-ce",
                 "dspark-d1", "dspark-d2", "dspark")


def max_prompt_tokens(context: int, cfg: EvalConfig, block: int = 7) -> int:
    return context - cfg.max_new_tokens - block - 1


def load_prompt_sets(
    tokenizer,
    context: int,
    cfg: EvalConfig,
    names: list[str],
    per_set: int,
    prompts_file: str | None = None,
) -> dict[str, list[list[int]]]:
    """Token ids of the chat prompts of each named set (fitting the context)."""
    limit = max_prompt_tokens(context, cfg)
    sets: dict[str, list[list[int]]] = {}
    if prompts_file:
        texts = read_turns(prompts_file)
        sets[Path(prompts_file).stem] = fitting_prompts(texts, tokenizer, limit, per_set, cfg.seed)
    wanted_domains = [n for n in names if n in DOMAIN_SETS]
    if wanted_domains:
        from dspark.training.corpus.build import CorpusConfig, build_corpus

        corpus = build_corpus(CorpusConfig(seed=0))
        for name in wanted_domains:
            texts = [r["messages"][0]["content"] for r in corpus[name]["heldout"]]
            sets[name] = fitting_prompts(texts, tokenizer, limit, per_set, cfg.seed)
    for name in names:
        if name in BENCHMARKS:
            texts = read_turns(PROMPT_DIR / f"{name}.jsonl")
            sets[name] = fitting_prompts(texts, tokenizer, limit, per_set, cfg.seed)
        elif name not in DOMAIN_SETS:
            raise ValueError(f"unknown prompt set {name!r}; choose from {DOMAIN_SETS + BENCHMARKS}")
    return sets


def write_benchmark_subsets(
    src_dir: str | Path, tokenizer, context: int, per_set: int, cfg: EvalConfig
) -> list[Path]:
    """Pick the fixed benchmark subsets (seeded shuffle, first ``per_set`` that fit the
    target's context) from the full files in ``src_dir`` into ``bench/eval_prompts``."""
    limit = max_prompt_tokens(context, cfg)
    PROMPT_DIR.mkdir(parents=True, exist_ok=True)
    written = []
    for name in BENCHMARKS:
        texts = read_turns(Path(src_dir) / f"{name}.jsonl")
        kept = fitting_texts(texts, tokenizer, limit, per_set, cfg.seed)
        path = PROMPT_DIR / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"turns": [t]}) + "\n" for t in kept))
        written.append(path)
    return written


def _job(args: tuple) -> tuple[str, str, list[dict], int]:
    target_dir, name, drafter_dir, set_name, prompts, cfg_dict = args
    import torch

    torch.set_num_threads(1)
    from dspark.models.drafter_checkpoint import load_drafter
    from dspark.models.generation import load_for_generation
    from dspark.workers.offline import run_rounds

    cfg = EvalConfig(**cfg_dict)
    target, tokenizer = load_for_generation(target_dir)
    drafter = load_drafter(drafter_dir, target)
    rounds = run_rounds(
        target, drafter, prompts, tokenizer.stop_ids, cfg.temperature, cfg.max_new_tokens,
        cfg.seed, coupled=cfg.coupled, draft_vocab=cfg.draft_vocab,
    )
    return name, set_name, [asdict(r) for r in rounds.records], rounds.prompts


def run_jobs(
    target_dir: str,
    drafters: dict[str, str],
    sets: dict[str, list[list[int]]],
    cfg: EvalConfig,
    jobs: int,
    progress: bool = True,
) -> dict[str, dict[str, tuple[list[dict], int]]]:
    """rounds[drafter][set] = (round records as dicts, prompts)."""
    from rich.progress import Progress

    work = [
        (target_dir, name, path, set_name, prompts, asdict(cfg))
        for name, path in drafters.items()
        for set_name, prompts in sets.items()
    ]
    # longest jobs first so the pool finishes together
    work.sort(key=lambda w: -sum(len(p) for p in w[4]))
    out: dict[str, dict[str, tuple[list[dict], int]]] = {n: {} for n in drafters}
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        with Progress(disable=not progress) as bar:
            task = bar.add_task("eval (drafter x set)", total=len(work))
            if jobs <= 1:
                results = map(_job, work)
                for name, set_name, recs, n in results:
                    out[name][set_name] = (recs, n)
                    bar.advance(task)
            else:
                with mp.get_context("spawn").Pool(jobs) as pool:
                    for name, set_name, recs, n in pool.imap_unordered(_job, work):
                        out[name][set_name] = (recs, n)
                        bar.advance(task)
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    return out
