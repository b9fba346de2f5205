import pytest

from dspark.models.config import ConfigError, TargetConfig


def test_defaults_are_valid_and_describe_the_demo_moe():
    cfg = TargetConfig()
    assert cfg.num_experts == 4 and cfg.num_experts_per_tok == 2
    assert all(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"num_hidden_layers": -2}, "num_hidden_layers must be a positive integer"),
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "must divide num_attention_heads"),
        ({"head_dim": 7}, "head_dim must be even"),
        (
            {"num_experts": 4, "num_experts_per_tok": 5},
            "num_experts_per_tok must be in [1, num_experts=4]",
        ),
        ({"num_experts": -1}, "num_experts must be an integer >= 0"),
        ({"mlp_only_layers": (9,)}, "mlp_only_layers entry 9 outside [0, 5]"),
        ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
        ({"rope_scaling": {"type": "yarn"}}, "rope_scaling is not supported"),
        ({"eos_token_id": 99999}, "eos_token_id 99999 outside [0, vocab_size=4096)"),
        ({"model_type": "llama"}, "model_type must be one of"),
        ({"hidden_size": "wide"}, "hidden_size must be a positive integer"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
        ({"num_experts_per_tok": 1.5}, "num_experts_per_tok must be a positive integer"),
        (
            {"shared_expert_intermediate_size": 1.5},
            "shared_expert_intermediate_size must be an integer >= 0",
        ),
    ],
)
def test_invalid_values_name_the_field_and_range(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        TargetConfig(**overrides)
    assert fragment in str(err.value)


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['hiden_size'\]"):
        TargetConfig.from_dict({"hiden_size": 64, "num_experts": 4})


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"num_experts": 4, "mlp_only_layers": 5}, "mlp_only_layers must be a list"),
        ({"num_experts": 4, "dspark": 5}, "dspark must be an object"),
        ({"num_experts": 4, "head_dim": None}, "head_dim must be a positive integer"),
    ],
)
def test_wrongly_typed_json_values_are_config_errors(raw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        TargetConfig.from_dict(raw)


def test_hf_dict_round_trip_moe_and_dense():
    moe = TargetConfig(
        mlp_only_layers=(0,), shared_expert_intermediate_size=64, eos_token_id=(2, 0)
    )
    assert TargetConfig.from_dict(moe.to_hf_dict()) == moe
    dense = TargetConfig(num_experts=0)
    hf = dense.to_hf_dict()
    assert hf["model_type"] == "qwen3" and "num_experts" not in hf
    assert TargetConfig.from_dict(hf) == dense
    assert not any(dense.is_moe_layer(i) for i in range(dense.num_hidden_layers))


def test_transformers_5_spellings_are_accepted():
    cfg = TargetConfig.from_dict(
        {
            "model_type": "qwen3_moe",
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
        }
    )
    assert cfg.num_experts == 8 and cfg.rope_theta == 5e5
    with pytest.raises(ConfigError, match="rope_type must be 'default'"):
        TargetConfig.from_dict({"num_experts": 4, "rope_parameters": {"rope_type": "yarn"}})


def test_config_hash_tracks_architecture_not_metadata():
    a = TargetConfig(extra={"name": "a"})
    b = TargetConfig(extra={"name": "b"})
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() != TargetConfig(hidden_size=256, head_dim=64).config_hash()
