"""Configuration of a draft model, bound to the target it was trained against.

Vocabulary:
- *method*: ``dspark`` (parallel backbone + Markov head + confidence head), ``dflash`` (the
  same backbone, tokens drafted independently, no confidence head), ``eagle3`` (one
  autoregressive layer over fused features, training-time test), ``mtp`` (DeepSeek-V3
  multi-token prediction at depth 1: last hidden + next-token embedding, one block, one token).
- *feature layers*: target layers whose raw residual outputs feed the drafter (-1 is the
  embedding output). ``mtp`` reads the target's final normed hidden instead (no layers).
- *block size*: draft tokens proposed per round (γ); slot k of a parallel block predicts the
  token at ``anchor_pos + k + 1``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dspark.models.config import TargetConfig

METHODS = ("dspark", "dflash", "eagle3", "mtp")
MARKOV_TYPES = ("none", "vanilla", "gated", "rnn")
PARALLEL_METHODS = ("dspark", "dflash")


class DrafterConfigError(ValueError):
    """A drafter config that cannot be built, or one bound to another target."""


@dataclass(frozen=True)
class DrafterConfig:
    """Shape of a drafter; dimensions are copied from the target it drafts for."""

    method: str
    """One of ``dspark``, ``dflash``, ``eagle3``, ``mtp``."""
    target_name: str
    """Name of the target checkpoint this drafter was trained against."""
    target_hash: str
    """``TargetConfig.config_hash()`` of that target; loading against another target fails."""
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    """Dense SwiGLU width of every draft layer."""
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    num_layers: int = 3
    """Draft decoder layers (EAGLE-3 and MTP-1 use exactly 1)."""
    block_size: int = 7
    """Draft tokens per round: γ for parallel drafters, the TTT horizon for EAGLE-3, 1 for MTP."""
    feature_layers: tuple[int, ...] = (1, 3, 4)
    """Target layers fused into the drafter's context; empty for ``mtp``."""
    mask_token_id: int = 4
    """Id of ``<mask>``, the filler of slots 1.. of a parallel block; never in the data."""
    markov_type: str = "none"
    """Sequential head of a parallel drafter: ``none``, ``vanilla``, ``gated`` or ``rnn``."""
    markov_rank: int = 0
    """Rank r of the Markov head (0 with ``markov_type='none'``)."""
    confidence_head: bool = False
    """Whether the drafter predicts per-position acceptance (DSpark)."""
    sts_temperatures: tuple[float, ...] | None = None
    """Sequential Temperature Scaling per position, fitted on the calibration split."""
    training: dict = field(default_factory=dict)
    """Recipe the drafter was trained with (provenance only)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DrafterConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.markov_type not in MARKOV_TYPES:
            raise DrafterConfigError(
                f"markov_type must be one of {MARKOV_TYPES}, got {self.markov_type!r}"
            )
        if (self.markov_type == "none") != (self.markov_rank == 0):
            raise DrafterConfigError(
                "markov_rank must be 0 exactly when markov_type is 'none' "
                f"(got type {self.markov_type!r}, rank {self.markov_rank})"
            )
        if self.markov_rank < 0:
            raise DrafterConfigError(f"markov_rank must be >= 0, got {self.markov_rank}")
        if not 1 <= self.block_size <= 32:
            raise DrafterConfigError(f"block_size must be in [1, 32], got {self.block_size}")
        if self.num_layers < 1:
            raise DrafterConfigError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.method in ("eagle3", "mtp") and self.num_layers != 1:
            raise DrafterConfigError(f"{self.method} uses exactly 1 layer, got {self.num_layers}")
        if self.method == "mtp" and (self.block_size != 1 or self.feature_layers):
            raise DrafterConfigError(
                "mtp proposes 1 token (block_size=1) from the last hidden only"
            )
        if self.method != "mtp" and not self.feature_layers:
            raise DrafterConfigError(f"{self.method} needs at least one feature layer")
        if self.method not in PARALLEL_METHODS and (self.markov_rank or self.confidence_head):
            raise DrafterConfigError(f"{self.method} has no Markov or confidence head")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise DrafterConfigError(
                f"mask_token_id must be in [0, {self.vocab_size}), got {self.mask_token_id}"
            )
        temps = self.sts_temperatures
        if temps is not None:
            if len(temps) != self.block_size or any(t <= 0 for t in temps):
                raise DrafterConfigError(
                    f"sts_temperatures must be {self.block_size} positive floats, got {temps}"
                )
        object.__setattr__(self, "feature_layers", tuple(self.feature_layers))
        if temps is not None:
            object.__setattr__(self, "sts_temperatures", tuple(float(t) for t in temps))

    @property
    def is_parallel(self) -> bool:
        return self.method in PARALLEL_METHODS

    @property
    def feature_dim(self) -> int:
        """Width of the per-token target feature this drafter reads."""
        return self.hidden_size * max(1, len(self.feature_layers))

    @classmethod
    def for_target(cls, target: TargetConfig, method: str, **overrides) -> DrafterConfig:
        """The default drafter of ``method`` for ``target``; ``overrides`` replace fields."""
        defaults: dict = dict(
            method=method,
            target_name=target.extra.get("name", "unnamed-target"),
            target_hash=target.config_hash(),
            hidden_size=target.hidden_size,
            num_attention_heads=target.num_attention_heads,
            num_key_value_heads=target.num_key_value_heads,
            head_dim=target.head_dim,
            intermediate_size=target.intermediate_size,
            vocab_size=target.vocab_size,
            max_position_embeddings=target.max_position_embeddings,
            rope_theta=target.rope_theta,
            rms_norm_eps=target.rms_norm_eps,
            feature_layers=default_feature_layers(target.num_hidden_layers),
        )
        if method == "dspark":
            defaults.update(markov_type="vanilla", markov_rank=64, confidence_head=True)
        if method in ("eagle3", "mtp"):
            defaults.update(num_layers=1)
        if method == "mtp":
            defaults.update(block_size=1, feature_layers=())
        defaults.update(overrides)
        return cls(**defaults)

    def check_target(self, target: TargetConfig) -> None:
        """Refuse a target other than the one this drafter was trained against."""
        if target.config_hash() != self.target_hash:
            raise DrafterConfigError(
                f"this {self.method} drafter was trained against target {self.target_name!r} "
                f"(config hash {self.target_hash}); the given target "
                f"{target.extra.get('name', 'unnamed-target')!r} has config hash "
                f"{target.config_hash()}. Retrain the drafter for this target."
            )

    def to_dict(self) -> dict:
        out = asdict(self)
        out["feature_layers"] = list(self.feature_layers)
        if self.sts_temperatures is not None:
            out["sts_temperatures"] = list(self.sts_temperatures)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> DrafterConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise DrafterConfigError(f"unknown drafter config keys: {unknown}")
        data = dict(data)
        data["feature_layers"] = tuple(data.get("feature_layers", ()))
        if data.get("sts_temperatures") is not None:
            data["sts_temperatures"] = tuple(data["sts_temperatures"])
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def default_feature_layers(num_layers: int) -> tuple[int, ...]:
    """Three spread-out layers, never the last (for L=6: 1, 3, 4)."""
    if num_layers < 2:
        return (-1,)
    picks = sorted({max(0, round(f * (num_layers - 1)) - 0) for f in (0.2, 0.6, 0.8)})
    picks = [min(p, num_layers - 2) for p in picks]
    return tuple(sorted(set(picks)))
