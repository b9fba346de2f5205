"""The committed drafters decode the committed target losslessly on real prompts, on the
engine that serves."""

from __future__ import annotations

import pytest

from dspark.models.drafter_checkpoint import load_drafter
from dspark.models.generation import SamplingParams, generate_tokens, load_for_generation
from dspark.workers.offline import offline_engine


@pytest.fixture(scope="module")
def demo(demo_target_dir, corpus):
    target, tokenizer = load_for_generation(demo_target_dir)
    prompts = []
    for domain in ("math", "code", "chat"):
        for rec in corpus[domain]["heldout"][:7]:
            prompts.append(tokenizer.chat_prompt(rec["messages"][0]["content"]))
    return target, tokenizer, prompts[:21]


@pytest.mark.parametrize("name", ["dspark", "dflash", "eagle3", "mtp"])
def test_committed_drafter_greedy_equals_plain_decoding_on_21_prompts(demo, demo_target_dir, name):
    target, tokenizer, prompts = demo
    drafter = load_drafter(demo_target_dir.parent / "drafters" / name, target)
    params = SamplingParams(temperature=0.0, max_tokens=32)
    rounds = []
    engine = offline_engine(target, drafter, len(prompts), lambda req_id, r: rounds.append(r))
    spec = engine.generate(prompts, params, tokenizer.stop_ids)
    assert spec == [list(generate_tokens(target, ids, params, tokenizer.stop_ids))
                    for ids in prompts]
    tau = sum(r.committed for r in rounds) / len(rounds)
    assert tau > 1.0  # a trained drafter gets some drafts accepted


@pytest.mark.parametrize("name", ["dspark", "eagle3"])
def test_seeded_sampling_couples_the_drafter_and_keeps_the_plain_text(demo, demo_target_dir,
                                                                       name):
    """At T=1 a seeded request's drafts are drawn with the target's position noise: they
    are accepted often (independent noise accepts almost none), and the text is plain
    decoding's with that seed."""
    target, tokenizer, prompts = demo
    drafter = load_drafter(demo_target_dir.parent / "drafters" / name, target)
    params = [SamplingParams(temperature=1.0, max_tokens=32, seed=i) for i in range(8)]
    rounds = []
    engine = offline_engine(target, drafter, 8, lambda req_id, r: rounds.append(r))
    spec = engine.generate(prompts[:8], params, tokenizer.stop_ids)
    assert spec == [list(generate_tokens(target, ids, p, tokenizer.stop_ids))
                    for ids, p in zip(prompts[:8], params)]
    tau = sum(r.committed for r in rounds) / len(rounds)
    assert tau > 1.3, tau


def test_offline_engines_draft_vocabulary(demo, demo_target_dir):
    """``dspark eval`` compares drafters over the whole vocabulary unless asked
    (``EvalConfig.draft_vocab``); the offline engine otherwise drafts as serving does."""
    from dspark.bench.acceptance import EvalConfig
    from dspark.workers.engine_config import EngineConfig

    target, _, _ = demo
    drafter = load_drafter(demo_target_dir.parent / "drafters" / "dspark", target)
    whole = offline_engine(target, drafter, 1, draft_vocab=EvalConfig().draft_vocab)
    assert whole.draft_worker.vocab is None
    served = offline_engine(target, drafter, 1)
    assert served.draft_worker.vocab.ids.numel() == EngineConfig().draft_vocab
    with pytest.raises(ValueError, match="draft_vocab must be >= 0"):
        EvalConfig(draft_vocab=-1)
