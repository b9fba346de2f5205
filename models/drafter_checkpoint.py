"""Drafter checkpoints: ``config.json`` (a ``DrafterConfig``), ``model.safetensors`` and,
optionally, ``draft_vocab.json`` (the target's vocabulary ranked by how often it generated
each token; ``dspark train draft-vocab``).

Only trainable weights are stored; the frozen embedding and LM head are copied from the
target at load time, which is why a drafter refuses any target but its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dspark.models.autoregressive_drafter import AutoregressiveDrafter
from dspark.models.checkpoint import CheckpointError
from dspark.models.drafter_config import DrafterConfig, DrafterConfigError
from dspark.models.parallel_drafter import ParallelDrafter
from dspark.models.target import TargetModel

FROZEN = ("embed_tokens.weight", "lm_head.weight")

Drafter = ParallelDrafter | AutoregressiveDrafter


def build_drafter(cfg: DrafterConfig, target: TargetModel) -> Drafter:
    """A drafter of ``cfg`` sharing (frozen copies of) ``target``'s embedding and head."""
    cfg.check_target(target.config)
    embed = target.model.embed_tokens.weight
    head = target.lm_head.weight
    if cfg.is_parallel:
        return ParallelDrafter(cfg, embed, head)
    return AutoregressiveDrafter(cfg, embed, head)


def trainable_state(drafter: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in drafter.state_dict().items() if k not in FROZEN}


def save_drafter(drafter: Drafter, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    drafter.config.save(path / "config.json")
    tensors = {
        k: v.detach().to(dtype).contiguous().cpu() for k, v in trainable_state(drafter).items()
    }
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def read_drafter_config(path: str | Path) -> DrafterConfig:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} is not a drafter checkpoint: no config.json")
    try:
        return DrafterConfig.from_dict(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{cfg_path}: not a drafter config ({exc})") from exc


def load_drafter(path: str | Path, target: TargetModel) -> Drafter:
    """Load a drafter for ``target``; raises ``DrafterConfigError`` for a foreign target."""
    path = Path(path)
    cfg = read_drafter_config(path)
    drafter = build_drafter(cfg, target)
    weights_path = path / "model.safetensors"
    if not weights_path.is_file():
        raise CheckpointError(f"{path}: no model.safetensors")
    tensors = load_file(str(weights_path))
    expected = trainable_state(drafter)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path}: missing {missing[:4]}, unexpected {unexpected[:4]} for a "
            f"{cfg.method} drafter"
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{weights_path}: {name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[name].shape)}"
            )
    drafter.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    drafter.token_ranking = read_token_ranking(path, cfg.vocab_size)
    return drafter.to(target.lm_head.weight.device).eval()


VOCAB_FILE = "draft_vocab.json"


def write_token_ranking(path: str | Path, counts: torch.Tensor, source: str) -> dict:
    """Rank the vocabulary by ``counts`` [V] (most frequent first, ties by id) into the
    checkpoint's ``draft_vocab.json``; returns what was written."""
    order = torch.sort(counts, descending=True, stable=True).indices  # NOTE: ties by id
    record = {"source": source, "num_tokens": int(counts.sum()), "ranked_ids": order.tolist(),
              "counts": counts[order].tolist()}
    (Path(path) / VOCAB_FILE).write_text(json.dumps(record) + "\n")
    return record


def read_token_ranking(path: str | Path, vocab_size: int) -> torch.Tensor | None:
    """The ranked vocabulary of a checkpoint (None without ``draft_vocab.json``); a file
    that is not a permutation of the vocabulary is refused."""
    file = Path(path) / VOCAB_FILE
    if not file.is_file():
        return None
    try:
        ranked = json.loads(file.read_text())["ranked_ids"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{file}: not a draft vocabulary ({exc})") from exc
    if sorted(ranked) != list(range(vocab_size)):
        raise CheckpointError(f"{file}: ranked_ids must order every id in [0, {vocab_size})")
    return torch.tensor(ranked, dtype=torch.long)


__all__ = [
    "Drafter",
    "DrafterConfigError",
    "build_drafter",
    "load_drafter",
    "read_drafter_config",
    "save_drafter",
]
