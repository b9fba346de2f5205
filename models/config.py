"""Typed, validated configuration of the target model.

Key names follow Hugging Face's ``Qwen3MoeConfig`` / ``Qwen3Config`` so that the
``config.json`` of a local checkpoint of that family loads unchanged. A config with
``num_experts == 0`` is a dense Qwen3 model; with experts, a layer is sparse when
``(layer + 1) % decoder_sparse_step == 0`` and it is not listed in ``mlp_only_layers``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

# Keys Hugging Face writes that change nothing in inference here. They are accepted and
# dropped; any other unknown key is an error that names it.
_IGNORED_HF_KEYS = frozenset(
    {
        "attention_dropout",
        "initializer_range",
        "use_cache",
        "transformers_version",
        "output_router_logits",
        "router_aux_loss_coef",
        "use_sliding_window",
        "sliding_window",
        "max_window_layers",
        "layer_types",
        "_name_or_path",
        "torch_dtype",
        "dtype",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "tie_encoder_decoder",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "is_decoder",
        "add_cross_attention",
        "problem_type",
        "id2label",
        "label2id",
        "tokenizer_class",
        "prefix",
        "sep_token_id",
        "decoder_start_token_id",
        "task_specific_params",
        "pruned_heads",
        "tf_legacy_loss",
        "use_bfloat16",
        "finetuning_task",
        "torchscript",
        "cross_attention_hidden_size",
        "qkv_bias",
    }
)

_SUPPORTED_MODEL_TYPES = ("qwen3_moe", "qwen3", "qwen2_moe")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of its allowed range."""


def _require_positive(cfg: TargetConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class TargetConfig:
    """Architecture of a Qwen3-MoE-style decoder (dense Qwen3 when ``num_experts == 0``)."""

    vocab_size: int = 4096
    """Rows of the embedding and the LM head."""
    hidden_size: int = 192
    """Width d of the residual stream."""
    num_hidden_layers: int = 6
    """Number of decoder layers L."""
    num_attention_heads: int = 4
    """Query heads per layer."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention); must divide ``num_attention_heads``."""
    head_dim: int = 48
    """Width of one attention head."""
    intermediate_size: int = 512
    """SwiGLU hidden width of dense (non-MoE) MLP layers."""
    num_experts: int = 4
    """Routed experts per MoE layer; 0 makes every layer dense (Qwen3)."""
    num_experts_per_tok: int = 2
    """Top-k experts each token is routed to."""
    moe_intermediate_size: int = 384
    """SwiGLU hidden width of one routed expert."""
    norm_topk_prob: bool = True
    """Renormalise the top-k softmax gate weights to sum to one."""
    decoder_sparse_step: int = 1
    """Every ``decoder_sparse_step``-th layer is MoE (1: all of them)."""
    mlp_only_layers: tuple[int, ...] = ()
    """Layer indices that stay dense even when experts are configured."""
    shared_expert_intermediate_size: int = 0
    """Width of an always-on shared expert with a sigmoid gate (Qwen2-MoE style); 0: none."""
    max_position_embeddings: int = 512
    """Longest sequence (prompt plus generated tokens) the model accepts."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    attention_bias: bool = False
    """Bias on the q/k/v/o projections."""
    tie_word_embeddings: bool = False
    """Share the LM head with the input embedding."""
    hidden_act: str = "silu"
    """Activation of the SwiGLU gate; only ``silu`` is supported."""
    bos_token_id: int | None = None
    """Token that starts a document, if any."""
    eos_token_id: int | tuple[int, ...] | None = None
    """Token(s) that end generation."""
    pad_token_id: int | None = None
    """Padding token, if any."""
    model_type: str = "qwen3_moe"
    """Hugging Face model type: ``qwen3_moe`` or ``qwen3``."""
    rope_scaling: Any = None
    """Only ``None`` is supported (no RoPE scaling)."""
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    """Free-form dspark metadata stored under ``"dspark"`` in config.json (name, recipe)."""

    def __post_init__(self) -> None:
        self._validate()
        if self.num_experts == 0 and self.model_type == "qwen3_moe":
            object.__setattr__(self, "model_type", "qwen3")  # a dense model is plain Qwen3

    def _validate(self) -> None:
        # NOTE: the order of the checks decides which error a config with several faults
        # reports; keep it.
        self._validate_dims()
        self._validate_mlp()
        self._validate_numerics()
        self._validate_token_ids()

    def _validate_dims(self) -> None:
        """Positive sizes, attention head shapes and boolean flags."""
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "decoder_sparse_step",
        ):
            _require_positive(self, name)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("norm_topk_prob", "tie_word_embeddings", "attention_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def _validate_mlp(self) -> None:
        """Routed experts, dense and shared-expert widths, and the dense-only layers."""
        if (
            not isinstance(self.num_experts, int)
            or isinstance(self.num_experts, bool)
            or self.num_experts < 0
        ):
            raise ConfigError(f"num_experts must be an integer >= 0, got {self.num_experts!r}")
        if self.num_experts > 0:
            _require_positive(self, "moe_intermediate_size")
            _require_positive(self, "num_experts_per_tok")
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                    f"got {self.num_experts_per_tok}"
                )
        if self.has_dense_layers():
            _require_positive(self, "intermediate_size")
        shared = self.shared_expert_intermediate_size
        if not isinstance(shared, int) or isinstance(shared, bool) or shared < 0:
            raise ConfigError(
                f"shared_expert_intermediate_size must be an integer >= 0, got {shared!r}"
            )
        if not isinstance(self.mlp_only_layers, tuple) or not all(
            isinstance(i, int) for i in self.mlp_only_layers
        ):
            raise ConfigError(
                f"mlp_only_layers must be a list of layer indices, got {self.mlp_only_layers!r}"
            )
        for layer in self.mlp_only_layers:
            if not 0 <= layer < self.num_hidden_layers:
                raise ConfigError(
                    f"mlp_only_layers entry {layer} outside [0, {self.num_hidden_layers - 1}]"
                )

    def _validate_numerics(self) -> None:
        """Activation, RoPE, RMSNorm and model type: only what the model implements."""
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act must be 'silu', got {self.hidden_act!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.rope_scaling not in (None, {}):
            raise ConfigError(f"rope_scaling is not supported, got {self.rope_scaling!r}")
        if self.model_type not in _SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type must be one of {_SUPPORTED_MODEL_TYPES}, got {self.model_type!r}"
            )

    def _validate_token_ids(self) -> None:
        for name in ("bos_token_id", "pad_token_id"):
            tok = getattr(self, name)
            if tok is not None and not 0 <= tok < self.vocab_size:
                raise ConfigError(f"{name}={tok} outside [0, vocab_size={self.vocab_size})")
        for tok in self.eos_token_ids:
            if not 0 <= tok < self.vocab_size:
                raise ConfigError(f"eos_token_id {tok} outside [0, vocab_size={self.vocab_size})")

    # ----------------------------------------------------------------- derived facts
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
            and layer not in self.mlp_only_layers
        )

    def has_dense_layers(self) -> bool:
        return any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def config_hash(self) -> str:
        """Short hash of the architecture; drafters record it to refuse another target."""
        payload = json.dumps(self.to_hf_dict(include_extra=False), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    # ----------------------------------------------------------------- (de)serialise
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TargetConfig:
        """Build from a Hugging Face-style dict; unknown keys raise ``ConfigError``."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        raw = _normalise_hf_aliases(raw)
        values: dict[str, Any] = {}
        unknown = []
        for key, value in raw.items():
            if key in known:
                values[key] = value
            elif key == "dspark":
                if not isinstance(value, dict):
                    raise ConfigError(f"dspark must be an object, got {value!r}")
                values["extra"] = dict(value)
            elif key in ("architectures",) or key in _IGNORED_HF_KEYS:
                continue
            elif key.endswith("_token_id") or key.startswith("_"):
                continue
            else:
                unknown.append(key)
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {sorted(unknown)}; allowed keys are "
                f"{sorted(known)} plus Hugging Face bookkeeping keys"
            )
        if "mlp_only_layers" in values:
            layers = values["mlp_only_layers"] or ()
            if not isinstance(layers, list | tuple):
                raise ConfigError(
                    f"mlp_only_layers must be a list of layer indices, got {layers!r}"
                )
            values["mlp_only_layers"] = tuple(layers)
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = tuple(values["eos_token_id"])
        if values.get("model_type") == "qwen3":
            values.setdefault("num_experts", 0)
        if "num_experts" not in values and raw.get("model_type", "qwen3_moe") == "qwen3_moe":
            raise ConfigError("num_experts is required for model_type 'qwen3_moe'")
        try:
            return cls(**values)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:  # wrong value types surface here
            raise ConfigError(str(exc)) from exc

    def to_hf_dict(self, include_extra: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        if self.num_experts == 0:
            out["model_type"] = "qwen3"
            out["architectures"] = ["Qwen3ForCausalLM"]
            for key in (
                "num_experts",
                "num_experts_per_tok",
                "moe_intermediate_size",
                "norm_topk_prob",
                "decoder_sparse_step",
                "mlp_only_layers",
                "shared_expert_intermediate_size",
            ):
                out.pop(key)
        else:
            out["architectures"] = ["Qwen3MoeForCausalLM"]
            if self.shared_expert_intermediate_size == 0:
                out.pop("shared_expert_intermediate_size")
        out["torch_dtype"] = "bfloat16"
        if include_extra and self.extra:
            out["dspark"] = self.extra
        return out


def _normalise_hf_aliases(raw: dict[str, Any]) -> dict[str, Any]:
    """Map newer Hugging Face spellings onto the classic Qwen3 keys.

    transformers 5 writes ``num_local_experts`` for ``num_experts`` and nests the RoPE base
    in ``rope_parameters``; checkpoints on disk use either spelling.
    """
    raw = dict(raw)
    if "num_local_experts" in raw:
        raw.setdefault("num_experts", raw.pop("num_local_experts"))
    rope = raw.pop("rope_parameters", None)
    if rope:
        if not isinstance(rope, dict):
            raise ConfigError(f"rope_parameters must be an object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope_parameters.rope_type must be 'default', got {rope_type!r}")
        if "rope_theta" in rope:
            raw.setdefault("rope_theta", rope["rope_theta"])
    return raw
