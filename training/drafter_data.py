"""The drafters' shared training data: prompts -> target replies at T=1 -> feature cache.

Every drafter method trains from the same cache (paper protocol: same data, same epochs).
The cache is built once per work directory and reused while its recipe and target match.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

from dspark.models.drafter_config import default_feature_layers
from dspark.models.generation import load_for_generation
from dspark.models.tokenizer import Tokenizer
from dspark.training.corpus.build import DOMAINS, CorpusConfig, build_corpus
from dspark.training.feature_cache import FeatureCache, build_feature_cache
from dspark.training.regenerate import Sample, regenerate


@dataclass(frozen=True)
class DrafterDataConfig:
    """Which prompts are answered, and how."""

    prompts_per_domain: int = 1000
    """Training prompts taken from each domain's train split (math, code, chat)."""
    max_prompt_tokens: int = 160
    """Longer prompts are skipped."""
    max_new_tokens: int = 192
    """Longest regenerated reply."""
    temperature: float = 1.0
    """Sampling temperature of the regenerated replies (the evaluation temperature)."""
    min_reply_tokens: int = 8
    """Replies shorter than this are dropped."""
    corpus_seed: int = 0
    """Seed of the corpus the target was trained on."""
    seed: int = 0
    """Seeds prompt choice and sampling."""

    def __post_init__(self) -> None:
        if self.prompts_per_domain < 1:
            raise ValueError(f"prompts_per_domain must be >= 1, got {self.prompts_per_domain}")
        if not 0.0 < self.temperature <= 2.0:
            raise ValueError(f"temperature must be in (0, 2], got {self.temperature}")
        if self.max_new_tokens < 1 or self.max_prompt_tokens < 1:
            raise ValueError("max_new_tokens and max_prompt_tokens must be >= 1")


def choose_prompts(
    tokenizer: Tokenizer, cfg: DrafterDataConfig, split: str, per_domain: int
) -> list[tuple[str, list[int]]]:
    """(domain, chat prompt ids) pairs from a corpus split, seeded, length-filtered."""
    corpus = build_corpus(CorpusConfig(seed=cfg.corpus_seed))
    chosen = []
    for d_idx, domain in enumerate(DOMAINS):
        recs = list(corpus[domain][split])
        random.Random(cfg.seed * 31 + d_idx).shuffle(recs)
        taken = 0
        for rec in recs:
            ids = tokenizer.chat_prompt(rec["messages"][0]["content"])
            if len(ids) > cfg.max_prompt_tokens:
                continue
            chosen.append((domain, ids))
            taken += 1
            if taken == per_domain:
                break
    return chosen


def prepare_drafter_data(
    target_dir: str | Path, work_dir: str | Path, cfg: DrafterDataConfig, progress: bool = True
) -> FeatureCache:
    """Build (or reuse) ``work_dir/data``: regenerated samples and the feature cache."""
    from rich.progress import Progress

    data_dir = Path(work_dir) / "data"
    target, tokenizer = load_for_generation(target_dir)
    manifest = {
        "target_name": target.config.extra.get("name", "unnamed-target"),
        "target_hash": target.config.config_hash(),
        "recipe": dataclasses.asdict(cfg),
    }
    manifest_path = data_dir / "cache" / "manifest.json"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if all(old.get(k) == v for k, v in manifest.items()):
            return FeatureCache.load(data_dir / "cache")
    prompts = choose_prompts(tokenizer, cfg, "train", cfg.prompts_per_domain)
    with Progress(disable=not progress) as bar:
        task = bar.add_task("regenerate replies (T=1)", total=len(prompts))
        samples = regenerate(
            target,
            [ids for _, ids in prompts],
            cfg.max_new_tokens,
            tokenizer.stop_ids,
            tokenizer.pad_id,
            seed=cfg.seed,
            temperature=cfg.temperature,
            on_batch=lambda n: bar.advance(task, n),
        )
    kept = [
        (domain, s)
        for (domain, _), s in zip(prompts, samples)
        if len(s.answer_ids) >= cfg.min_reply_tokens
    ]
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "samples.jsonl", "w") as fh:
        for domain, s in kept:
            fh.write(
                json.dumps(
                    {"domain": domain, "prompt_ids": s.prompt_ids, "answer_ids": s.answer_ids}
                )
                + "\n"
            )
    layers = default_feature_layers(target.config.num_hidden_layers)
    only_samples: list[Sample] = [s for _, s in kept]
    with Progress(disable=not progress) as bar:
        task = bar.add_task("target feature cache", total=len(only_samples))
        cache = build_feature_cache(
            target, only_samples, layers, manifest, on_batch=lambda n: bar.advance(task, n)
        )
    cache.manifest["domains"] = [domain for domain, _ in kept]
    cache.save(data_dir / "cache")
    return cache
