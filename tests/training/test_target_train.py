import json

import pytest
import torch

from dspark.models.checkpoint import load_target
from dspark.models.tokenizer import Tokenizer
from dspark.training.target_train import TargetTrainer, TrainTargetConfig, heldout_nats, lr_at

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "num_experts": 2,
    "num_experts_per_tok": 1,
    "moe_intermediate_size": 32,
    "max_position_embeddings": 320,
}


@pytest.fixture(scope="module")
def small_corpus(corpus):
    return {d: {s: recs[:160] for s, recs in splits.items()} for d, splits in corpus.items()}


def _cfg(**kw):
    base = dict(
        steps=30,
        tokens_per_batch=2048,
        lr=5e-3,
        eval_every=15,
        save_every=5,
        math_per_epoch=160,
        model=TINY,
        seed=3,
    )
    base.update(kw)
    return TrainTargetConfig(**base)


def test_short_run_lowers_heldout_loss_and_writes_outputs(tmp_path, small_corpus, small_tokenizer):
    trainer = TargetTrainer(
        _cfg(), tmp_path / "work", tmp_path / "ckpt", small_corpus, small_tokenizer
    )
    before = heldout_nats(trainer.model, trainer.heldout, trainer.tokenizer.pad_id, 2048)
    metrics = trainer.run(progress=False)
    after = metrics["heldout_nats_per_answer_token"]
    for domain in ("math", "code", "chat"):
        assert after[domain] < before[domain] - 0.5, (domain, before, after)
    # the checkpoint loads and gives the held-out loss the trainer measured (bf16 weights)
    model = load_target(tmp_path / "ckpt")
    tok = Tokenizer.from_file(tmp_path / "ckpt")
    again = heldout_nats(model, trainer.heldout, tok.pad_id, 2048)
    assert again == pytest.approx(after, abs=0.05)
    assert (tmp_path / "work" / "loss_curve.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "work" / "metrics.json").read_text())
    assert saved["steps"] == 30 and saved["recipe"]["seed"] == 3


def test_resumed_run_equals_uninterrupted_run(tmp_path, small_corpus, small_tokenizer):
    cfg = _cfg(steps=12, eval_every=100)
    whole = TargetTrainer(cfg, tmp_path / "a", tmp_path / "ca", small_corpus, small_tokenizer)
    whole.run(progress=False)
    first = TargetTrainer(cfg, tmp_path / "b", tmp_path / "cb", small_corpus, small_tokenizer)
    assert first.run(progress=False, stop_after=5) is None
    assert first.step == 5
    second = TargetTrainer(cfg, tmp_path / "b", tmp_path / "cb", small_corpus, small_tokenizer)
    second.run(resume=True, progress=False)
    assert second.step == 12
    for (name, a), (_, b) in zip(
        whole.model.state_dict().items(), second.model.state_dict().items()
    ):
        torch.testing.assert_close(a, b, msg=name)
    changed = TargetTrainer(
        _cfg(steps=12, lr=1e-3), tmp_path / "b", tmp_path / "cb", small_corpus, small_tokenizer
    )
    with pytest.raises(ValueError, match="written by another recipe"):
        changed.run(resume=True, progress=False)


def test_schedule_warms_up_then_decays_to_floor():
    cfg = _cfg(steps=100, lr=1e-3, warmup_frac=0.1, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)


def test_bad_recipe_values_are_named():
    with pytest.raises(ValueError, match="steps must be positive"):
        TrainTargetConfig(steps=0)
    with pytest.raises(ValueError, match=r"lr must be in \(0, 1\)"):
        TrainTargetConfig(lr=2.0)
    with pytest.raises(ValueError, match="model overrides: .*hidden_sizee"):
        TrainTargetConfig(model={"hidden_sizee": 3})
    with pytest.raises(ValueError, match=r"max_seq_len \(320\) must be <= max_position_embeddings"):
        TrainTargetConfig(model={"max_position_embeddings": 32})
