#!/usr/bin/env python3
"""Builds data/prompt_continuation_mc.jsonl: a 4-way multiple-choice (loglikelihood) task made
only from local prompt files (no download). Each item takes the first words of one prompt as
the context; the gold choice is that prompt's next words, the three distractors are the
same-length word spans from three other prompts of the same set. Deterministic (seed 0).

    python3 bench/clients/lm_eval_tasks/build_mc.py   # from bench/eval_prompts
"""
import json
import random
import sys
from pathlib import Path

SRC = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "eval_prompts"
OUT = Path(__file__).resolve().parent / "data" / "prompt_continuation_mc.jsonl"
CTX_WORDS, CONT_WORDS, PER_SET = 24, 8, 8
rng = random.Random(0)
items = []
for name in ["gsm8k", "math500", "mbpp", "humaneval", "mt-bench"]:
    words = []
    for line in open(SRC / f"{name}.jsonl"):
        w = json.loads(line)["turns"][0].split()
        if len(w) >= CTX_WORDS + CONT_WORDS:
            words.append(w)
    if len(words) < 4:  # too few long prompts for a context, a gold span and 3 others
        continue
    picked = rng.sample(range(len(words)), min(PER_SET, len(words)))
    for i in picked:
        ctx = " ".join(words[i][:CTX_WORDS])
        gold = " ".join(words[i][CTX_WORDS:CTX_WORDS + CONT_WORDS])
        others = rng.sample([j for j in range(len(words)) if j != i], 3)
        distract = [" ".join(words[j][CTX_WORDS:CTX_WORDS + CONT_WORDS]) for j in others]
        choices = [gold, *distract]
        rng.shuffle(choices)
        items.append({"source": name, "context": ctx, "choices": choices,
                      "label": choices.index(gold)})
rng.shuffle(items)
OUT.parent.mkdir(exist_ok=True)
with open(OUT, "w") as f:
    for it in items:
        f.write(json.dumps(it, ensure_ascii=False) + "\n")
print(f"wrote {len(items)} items to {OUT}")
