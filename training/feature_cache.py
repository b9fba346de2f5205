"""The target-feature cache (DeepSpec step 3): what every drafter trains from.

Per token of every regenerated sample: the id, the loss mask (1 on the reply), the raw
residual outputs of the chosen target layers concatenated (``features``, fp16) and the
target's final normed hidden (``last_hidden``, fp16). Target logits are not stored; the
trainer recomputes them with the frozen LM head. Samples are stored back to back with
``offsets`` (sample i is ``[offsets[i], offsets[i + 1])``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dspark.models.target import TargetModel
from dspark.training.regenerate import Sample


@dataclass
class FeatureCache:
    input_ids: torch.Tensor  # [N] int64
    loss_mask: torch.Tensor  # [N] uint8
    features: torch.Tensor  # [N, m * d] fp16
    last_hidden: torch.Tensor  # [N, d] fp16
    offsets: torch.Tensor  # [num_samples + 1] int64
    manifest: dict

    @property
    def num_samples(self) -> int:
        return self.offsets.numel() - 1

    def lengths(self) -> list[int]:
        return (self.offsets[1:] - self.offsets[:-1]).tolist()

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Right-padded batch: ids/mask [B, S], features [B, S, F], last_hidden [B, S, d],
        lengths [B] (padding has id 0 and loss mask 0)."""
        spans = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in indices]
        seq = max(e - s for s, e in spans)
        bsz = len(spans)
        ids = torch.zeros(bsz, seq, dtype=torch.long)
        mask = torch.zeros(bsz, seq, dtype=torch.bool)
        feats = torch.zeros(bsz, seq, self.features.shape[1])
        last = torch.zeros(bsz, seq, self.last_hidden.shape[1])
        for row, (s, e) in enumerate(spans):
            n = e - s
            ids[row, :n] = self.input_ids[s:e]
            mask[row, :n] = self.loss_mask[s:e].bool()
            feats[row, :n] = self.features[s:e].float()
            last[row, :n] = self.last_hidden[s:e].float()
        lengths = torch.tensor([e - s for s, e in spans])
        return {
            "input_ids": ids,
            "loss_mask": mask,
            "features": feats,
            "last_hidden": last,
            "lengths": lengths,
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {
            "input_ids": self.input_ids.to(torch.int32),
            "loss_mask": self.loss_mask,
            "features": self.features,
            "last_hidden": self.last_hidden,
            "offsets": self.offsets,
        }
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "cache.safetensors"))
        (path / "manifest.json").write_text(json.dumps(self.manifest, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> FeatureCache:
        path = Path(path)
        t = load_file(str(path / "cache.safetensors"))
        manifest = json.loads((path / "manifest.json").read_text())
        return cls(
            t["input_ids"].long(),
            t["loss_mask"],
            t["features"],
            t["last_hidden"],
            t["offsets"],
            manifest,
        )


@torch.no_grad()
def build_feature_cache(
    target: TargetModel,
    samples: Sequence[Sample],
    feature_layers: Sequence[int],
    manifest: dict,
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> FeatureCache:
    """Run the target over every sample (right-padded batches; causal, so padding after a
    sample never changes its features)."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].ids))
    feats: list[torch.Tensor | None] = [None] * len(samples)
    last: list[torch.Tensor | None] = [None] * len(samples)
    for first in range(0, len(order), batch_size):
        idx = order[first : first + batch_size]
        seq = max(len(samples[i].ids) for i in idx)
        ids = torch.zeros(len(idx), seq, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(samples[i].ids)] = torch.tensor(samples[i].ids)
        out = target(ids, feature_layers=tuple(feature_layers), compute_logits=False)
        for row, i in enumerate(idx):
            n = len(samples[i].ids)
            feats[i] = out.layer_features[row, :n].half()
            last[i] = out.hidden_states[row, :n].half()
        if on_batch is not None:
            on_batch(len(idx))
    lengths = torch.tensor([0] + [len(s.ids) for s in samples])
    return FeatureCache(
        input_ids=torch.tensor([t for s in samples for t in s.ids], dtype=torch.long),
        loss_mask=torch.tensor([m for s in samples for m in s.loss_mask], dtype=torch.uint8),
        features=torch.cat(feats),  # type: ignore[arg-type]
        last_hidden=torch.cat(last),  # type: ignore[arg-type]
        offsets=lengths.cumsum(0),
        manifest={
            **manifest,
            "feature_layers": list(feature_layers),
            "hidden_size": target.config.hidden_size,
        },
    )
