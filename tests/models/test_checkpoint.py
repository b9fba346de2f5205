"""Checkpoint directories, including the Hugging Face Qwen3 / Qwen3-MoE round trip.

``transformers`` builds randomly initialised models from a config (no download) and writes
them with ``save_pretrained``; ours must load those unchanged and give the same logits, and
the reverse.
"""

import json

import pytest
import torch

from dspark.models.checkpoint import CheckpointError, load_target, save_target

transformers = pytest.importorskip("transformers")

HF_COMMON = dict(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def _hf_moe():
    cfg = transformers.Qwen3MoeConfig(
        **HF_COMMON,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
    )
    return transformers.Qwen3MoeForCausalLM(cfg)


def _hf_dense():
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**HF_COMMON))


def _randomise(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # norms too, so a wrong norm mapping shows
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.ndim == 1 else 0.0))


@pytest.mark.parametrize("build", [_hf_moe, _hf_dense], ids=["qwen3_moe", "qwen3"])
def test_hugging_face_checkpoint_loads_unchanged(tmp_path, build):
    torch.manual_seed(0)
    hf = build().eval()
    _randomise(hf, 1)
    hf.save_pretrained(tmp_path)
    ours = load_target(tmp_path)
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids).logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_our_checkpoint_loads_in_transformers(tmp_path, make_model):
    model = make_model(mlp_only_layers=(2,))
    save_target(model, tmp_path, dtype=torch.float32)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=2e-4, rtol=2e-4)


def test_bf16_save_load_round_trip(tmp_path, make_model):
    model = make_model()
    save_target(model, tmp_path)
    loaded = load_target(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(b, a.to(torch.bfloat16).float(), msg=name)


def test_config_that_does_not_match_weights_names_the_mismatch(tmp_path, make_model):
    save_target(make_model(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_target(tmp_path)
    msg = str(err.value)
    assert "does not match its weights" in msg and "hidden_size=48" in msg
    assert "model.embed_tokens.weight has shape [97, 32] in the weights" in msg

    cfg["hidden_size"] = 32
    cfg["num_hidden_layers"] = 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing from the weights: model\.layers\.3\."):
        load_target(tmp_path)


def test_missing_and_corrupt_checkpoints_are_clear(tmp_path, make_model):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_target(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_target(tmp_path)
    save_target(make_model(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_target(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_target(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"num_experts": 4, "hidden_sise": 3}))
    with pytest.raises(CheckpointError, match="unknown config key"):
        load_target(tmp_path)


def test_hf_directory_with_qwen_tokenizer_generates(tmp_path, write_qwen_tokenizer):
    """config.json + model.safetensors + a Qwen-style tokenizer.json: the whole family layout."""
    from dspark.models.generation import SamplingParams, generate_text, load_for_generation

    hf = _hf_moe()
    hf.save_pretrained(tmp_path)
    write_qwen_tokenizer(tmp_path)
    model, tokenizer = load_for_generation(tmp_path)
    text = generate_text(model, tokenizer, "hello", SamplingParams(max_tokens=5, ignore_eos=True))
    assert isinstance(text, str)
    ids = tokenizer.chat_prompt("hello")
    with torch.no_grad():
        torch.testing.assert_close(
            model(torch.tensor([ids])).logits, hf(torch.tensor([ids])).logits, atol=2e-4, rtol=2e-4
        )


def test_integer_weights_and_untied_head_under_tied_config_are_rejected(tmp_path, make_model):
    from safetensors.torch import load_file, save_file

    save_target(make_model(), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lm_head.weight differs from model.embed_tokens"):
        load_target(tmp_path)
    cfg["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int8)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"non-floating-point tensors: model\.norm\.weight"):
        load_target(tmp_path)


def test_saved_target_with_tokenizer_loads_in_auto_tokenizer(tmp_path, make_model, small_tokenizer):
    """A retrained target stays a faithful Hugging Face folder: same ids, template, stop ids."""
    tok = small_tokenizer
    model = make_model(
        vocab_size=tok.vocab_size, eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id
    )
    save_target(model, tmp_path, tokenizer=tok)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen3_moe"
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = [
        "What is 7 * 8?",
        "def f(x):\n    return {k: v for k, v in x.items()}\n",
        "東京 🙂 café e\u0301",
        "",
        " \n",
    ]
    for text in texts:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == hf(text)["input_ids"] == ids, text
        assert hf.decode(ids) == text
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5."},
        {"role": "user", "content": "And 7 * 8?"},
    ]
    got = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert got == tok.render_chat(messages)
    assert hf.model_max_length == model.config.max_position_embeddings
    assert hf.eos_token_id == tok.im_end_id and hf.pad_token_id == tok.pad_id
    generation = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert generation.eos_token_id == list(tok.stop_ids)
    assert generation.pad_token_id == tok.pad_id
