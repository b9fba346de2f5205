"""Regenerated replies, the feature cache and drafter training on a tiny target."""

from __future__ import annotations

import pytest
import torch

from dspark.models.drafter_checkpoint import load_drafter
from dspark.models.generation import SamplingParams, generate_tokens
from dspark.training.drafter_train import DrafterTrainer, TrainDrafterConfig
from dspark.training.feature_cache import FeatureCache, build_feature_cache
from dspark.training.regenerate import Sample, regenerate
from dspark.workers.offline import offline_engine

MASK_ID = 4


def test_batched_left_padded_generation_equals_one_by_one(make_model):
    target = make_model(seed=0)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 97, (n,), generator=gen).tolist() for n in (3, 9, 5, 14)]
    # a vanishing temperature is greedy, so each row must equal plain greedy decoding
    out = regenerate(
        target, prompts, 12, stop_ids=(7,), pad_id=1, seed=0, temperature=1e-6, batch_size=4
    )
    for ids, sample in zip(prompts, out):
        plain = list(generate_tokens(target, ids, SamplingParams(max_tokens=12), (7,)))
        assert sample.prompt_ids == ids and sample.answer_ids == plain


@pytest.fixture
def tiny_cache(make_model):
    target = make_model(seed=0)
    gen = torch.Generator().manual_seed(1)
    samples = []
    for i in range(24):
        prompt = torch.randint(5, 97, (4 + i % 5,), generator=gen).tolist()
        params = SamplingParams(temperature=1.0, max_tokens=16, seed=i)
        samples.append(Sample(prompt, list(generate_tokens(target, prompt, params))))
    return target, samples, build_feature_cache(target, samples, (0, 1), {"target": "tiny"})


def test_feature_cache_holds_each_samples_own_features(tiny_cache, tmp_path):
    target, samples, cache = tiny_cache
    cache.save(tmp_path / "c")
    loaded = FeatureCache.load(tmp_path / "c")
    assert loaded.num_samples == len(samples)
    batch = loaded.batch([3, 10])
    for row, i in enumerate([3, 10]):
        ids = torch.tensor([samples[i].ids])
        out = target(ids, feature_layers=(0, 1))
        n = len(samples[i].ids)
        assert batch["input_ids"][row, :n].tolist() == samples[i].ids
        assert batch["loss_mask"][row, :n].tolist() == [bool(m) for m in samples[i].loss_mask]
        torch.testing.assert_close(
            batch["features"][row, :n], out.layer_features[0], atol=2e-3, rtol=2e-3
        )  # stored in fp16
        torch.testing.assert_close(
            batch["last_hidden"][row, :n], out.hidden_states[0], atol=2e-3, rtol=2e-3
        )


@pytest.mark.parametrize("method", ["dspark", "dflash", "eagle3", "mtp"])
def test_training_lowers_the_loss_and_the_checkpoint_decodes_losslessly(
    tiny_cache, tmp_path, method
):
    target, samples, cache = tiny_cache
    cfg = TrainDrafterConfig(
        method=method, epochs=6, batch_size=4, num_anchors=8, markov_rank=8, num_layers=2, lr=3e-3
    )
    trainer = DrafterTrainer(cfg, target, cache, MASK_ID, tmp_path / "w", tmp_path / "out")
    trainer.run(progress=False)
    losses = [h["loss"] for h in trainer.history]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first
    drafter = load_drafter(tmp_path / "out", target)
    assert drafter.config.training["method"] == method
    params = SamplingParams(temperature=0.0, max_tokens=20)
    ids = samples[0].prompt_ids
    engine = offline_engine(target, drafter, 1)
    assert engine.generate([ids], params) == [list(generate_tokens(target, ids, params))]


def test_resumed_training_is_identical_to_uninterrupted(tiny_cache, tmp_path):
    target, _, cache = tiny_cache
    cfg = TrainDrafterConfig(
        method="dspark", epochs=2, batch_size=4, num_anchors=8, markov_rank=8, num_layers=1
    )
    full = DrafterTrainer(cfg, target, cache, MASK_ID, tmp_path / "a", tmp_path / "a_out")
    full.run(progress=False)
    part = DrafterTrainer(cfg, target, cache, MASK_ID, tmp_path / "b", tmp_path / "b_out")
    assert part.run(progress=False, stop_after=5) is None
    resumed = DrafterTrainer(cfg, target, cache, MASK_ID, tmp_path / "b", tmp_path / "b_out")
    resumed.run(resume=True, progress=False)
    for (name, a), (_, b) in zip(
        full.drafter.state_dict().items(), resumed.drafter.state_dict().items()
    ):
        assert torch.equal(a, b), name


def test_bad_recipes_name_the_field():
    with pytest.raises(ValueError, match="method"):
        TrainDrafterConfig(method="medusa")
    with pytest.raises(ValueError, match="epochs"):
        TrainDrafterConfig(method="dspark", epochs=0)
    with pytest.raises(ValueError, match="lr"):
        TrainDrafterConfig(method="dspark", lr=0.0)
