"""Checkpoint directories: ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``).

The layout is Hugging Face's, so a local Qwen3 / Qwen3-MoE checkpoint (single file or
sharded with ``model.safetensors.index.json``) loads unchanged, and ours load in
``transformers``: ``save_target`` also writes ``generation_config.json`` and, given the
tokenizer, a tokenizer folder ``AutoTokenizer`` loads as the server's tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dspark.models.config import ConfigError, TargetConfig
from dspark.models.target import TargetModel
from dspark.models.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, corrupt or does not match its config."""


def read_config(path: str | Path) -> TargetConfig:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is not a directory")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {CONFIG_FILE}")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object")
    try:
        return TargetConfig.from_dict(raw)
    except ConfigError as exc:
        raise CheckpointError(f"{cfg_path}: {exc}") from exc


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    files: list[Path]
    if (path / WEIGHTS_FILE).is_file():
        files = [path / WEIGHTS_FILE]
    elif (path / WEIGHTS_INDEX_FILE).is_file():
        try:
            index = json.loads((path / WEIGHTS_INDEX_FILE).read_text())
            files = sorted({path / f for f in index["weight_map"].values()})
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path / WEIGHTS_INDEX_FILE} is corrupt: {exc}") from exc
    else:
        raise CheckpointError(f"checkpoint {path} has no {WEIGHTS_FILE}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"weights shard {file} is missing")
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file: {exc}") from exc
    return tensors


def _check_state(model: TargetModel, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    problems = []
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        head = tensors.pop("lm_head.weight", None)
        embed = tensors.get("model.embed_tokens.weight")
        if head is not None and (
            embed is None or head.shape != embed.shape or not torch.equal(head, embed)
        ):
            problems.append(
                "tie_word_embeddings is true but lm_head.weight differs from "
                "model.embed_tokens.weight"
            )
    not_float = sorted(name for name, t in tensors.items() if not t.is_floating_point())
    if not_float:
        problems.append(f"non-floating-point tensors: {_abbrev(not_float)}")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing from the weights: {_abbrev(missing)}")
    if unexpected:
        problems.append(f"in the weights but not in the config's model: {_abbrev(unexpected)}")
    for name in sorted(set(expected) & set(tensors)):
        want, got = tuple(expected[name].shape), tuple(tensors[name].shape)
        if want != got:
            problems.append(
                f"{name} has shape {list(got)} in the weights but the config implies {list(want)}"
            )
    if problems:
        cfg = model.config
        summary = (
            f"hidden_size={cfg.hidden_size}, num_hidden_layers={cfg.num_hidden_layers}, "
            f"num_attention_heads={cfg.num_attention_heads}, num_key_value_heads="
            f"{cfg.num_key_value_heads}, head_dim={cfg.head_dim}, vocab_size={cfg.vocab_size}, "
            f"num_experts={cfg.num_experts}"
        )
        raise CheckpointError(
            f"checkpoint {path}: config.json ({summary}) does not match its weights: "
            + "; ".join(problems[:6])
            + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        )


def _abbrev(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def load_target(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> TargetModel:
    """Load a target checkpoint directory, validating that weights match the config."""
    path = Path(path)
    cfg = read_config(path)
    tensors = _read_weights(path)
    model = TargetModel(cfg)
    _check_state(model, tensors, path)
    model.load_state_dict(tensors, strict=False)
    return model.to(device=device, dtype=dtype).eval()


def save_target(
    model: TargetModel,
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer: Tokenizer | None = None,
) -> None:
    """Write ``config.json``, ``generation_config.json``, ``model.safetensors`` and, when
    given, the tokenizer's Hugging Face files (``Tokenizer.save_pretrained``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {
        name: t.detach().to(dtype).contiguous().cpu() for name, t in model.state_dict().items()
    }
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    hf = model.config.to_hf_dict()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
    write_generation_config(path, model.config)
    if tokenizer is not None:
        tokenizer.save_pretrained(path, model_max_length=model.config.max_position_embeddings)


def write_generation_config(path: str | Path, cfg: TargetConfig) -> None:
    """``generation_config.json``: the stop, pad and BOS ids ``transformers.generate`` uses."""
    ids = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }
    gen = {name: value for name, value in ids.items() if value is not None}
    (Path(path) / GENERATION_CONFIG_FILE).write_text(json.dumps(gen, indent=2) + "\n")
