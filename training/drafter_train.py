"""`dspark train drafter`: trains one drafter from the shared feature cache.

AdamW (weight decay 0) on the trainable parameters (the embedding and LM head are frozen
copies of the target's), linear warmup over 4% then cosine to 0, gradient clipping 1.0,
length-bucketed batches of ``batch_size`` samples, a rich progress bar, resumable state,
and a checkpoint bound to its target. Every method sees the same samples for the same
number of epochs.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dspark.models.draft_layers import init_trainable
from dspark.models.drafter_checkpoint import build_drafter, save_drafter, trainable_state
from dspark.models.drafter_config import METHODS, DrafterConfig
from dspark.models.target import TargetModel
from dspark.training.drafter_losses import (
    block_targets,
    lr_at,
    parallel_loss,
    sample_anchors,
    ttt_loss,
)
from dspark.training.feature_cache import FeatureCache

LOSS_DEFAULTS = {"dspark": (0.1, 0.9, 1.0), "dflash": (1.0, 0.0, 0.0)}


@dataclass(frozen=True)
class TrainDrafterConfig:
    """One drafter's recipe. ``None`` loss weights take the method's defaults."""

    method: str
    """dspark, dflash, eagle3 or mtp."""
    name: str = ""
    """Name of the variant (e.g. ``dflash-l1``); defaults to the method."""
    epochs: int = 3
    batch_size: int = 16
    """Samples per optimiser step."""
    lr: float = 1e-3
    warmup_frac: float = 0.04
    grad_clip: float = 1.0
    seed: int = 0
    num_layers: int = 3
    """Backbone depth of the parallel drafters (EAGLE-3 and MTP-1 always use 1)."""
    num_anchors: int = 64
    """Anchors (blocks) per sample for the parallel drafters."""
    markov_type: str = "vanilla"
    markov_rank: int = 64
    confidence_head: bool | None = None
    """Defaults to True for dspark, False otherwise."""
    alpha_ce: float | None = None
    alpha_l1: float | None = None
    alpha_conf: float | None = None
    loss_decay_gamma: float = 4.0
    ttt_step_decay: float = 0.8
    block_size: int = 7

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("epochs", "batch_size", "num_anchors", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.lr <= 1.0:
            raise ValueError(f"lr must be in (0, 1], got {self.lr}")

    @property
    def variant(self) -> str:
        return self.name or self.method

    def loss_weights(self) -> tuple[float, float, float]:
        ce, l1, conf = LOSS_DEFAULTS.get(self.method, (1.0, 0.0, 0.0))
        return (
            ce if self.alpha_ce is None else self.alpha_ce,
            l1 if self.alpha_l1 is None else self.alpha_l1,
            conf if self.alpha_conf is None else self.alpha_conf,
        )

    def drafter_config(self, target: TargetModel, mask_token_id: int) -> DrafterConfig:
        overrides: dict = {"mask_token_id": mask_token_id, "training": dataclasses.asdict(self)}
        if self.method in ("dspark", "dflash"):
            with_markov = self.method == "dspark"
            overrides.update(
                num_layers=self.num_layers,
                block_size=self.block_size,
                markov_type=self.markov_type if with_markov else "none",
                markov_rank=self.markov_rank if with_markov else 0,
                confidence_head=(
                    with_markov if self.confidence_head is None else self.confidence_head
                ),
            )
        elif self.method == "eagle3":
            overrides.update(block_size=self.block_size)
        return DrafterConfig.for_target(target.config, self.method, **overrides)


class DrafterTrainer:
    def __init__(
        self,
        cfg: TrainDrafterConfig,
        target: TargetModel,
        cache: FeatureCache,
        mask_token_id: int,
        work_dir: str | Path,
        out_dir: str | Path,
    ) -> None:
        self.cfg, self.cache, self.target = cfg, cache, target
        self.work_dir, self.out_dir = Path(work_dir), Path(out_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.drafter = build_drafter(cfg.drafter_config(target, mask_token_id), target)
        init_trainable(self.drafter, cfg.seed)
        params = [p for p in self.drafter.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        self._batches: tuple[int | None, list[list[int]]] = (None, [])
        self.steps_per_epoch = len(self.epoch_batches(0))
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.step = 0
        self.history: list[dict] = []

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Length-bucketed batches (sorted within chunks of 8 batches), shuffled, drop_last."""
        if self._batches[0] != epoch:
            self._batches = (epoch, self._make_batches(epoch))
        return self._batches[1]

    def _make_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.cfg.seed * 7919 + epoch)
        order = list(range(self.cache.num_samples))
        rng.shuffle(order)
        lengths = self.cache.lengths()
        size, chunk = self.cfg.batch_size, self.cfg.batch_size * 8
        batches = []
        for first in range(0, len(order), chunk):
            part = sorted(order[first : first + chunk], key=lambda i: lengths[i])
            batches += [part[i : i + size] for i in range(0, len(part), size)]
        batches = [b for b in batches if len(b) == size]
        rng.shuffle(batches)
        return batches

    # ------------------------------------------------------------------ losses
    def batch_loss(self, batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        cfg, drafter = self.cfg, self.drafter
        ids, mask, lengths = batch["input_ids"], batch["loss_mask"], batch["lengths"]
        head = drafter.lm_head
        if drafter.config.is_parallel:
            anchors, keep = sample_anchors(mask, lengths, cfg.num_anchors, gen)
            targets = block_targets(ids, mask, lengths, anchors, keep, drafter.config.block_size)
            h = drafter.train_hidden(ids, batch["features"], anchors, keep)
            logits, conf = drafter.teacher_forced_heads(h, targets.prev_ids)
            bsz = ids.shape[0]
            flat_idx = targets.target_index.clamp_min(0).view(bsz, -1)
            tgt_hidden = batch["last_hidden"].gather(
                1, flat_idx[..., None].expand(-1, -1, batch["last_hidden"].shape[-1])
            )
            with torch.no_grad():
                tgt_logits = head(tgt_hidden).view_as(logits)
            a_ce, a_l1, a_conf = cfg.loss_weights()
            return parallel_loss(
                logits, conf, tgt_logits, targets, a_ce, a_l1, a_conf, cfg.loss_decay_gamma
            )
        feats = batch["last_hidden"] if drafter.config.method == "mtp" else batch["features"]
        steps = drafter.config.block_size
        step_logits = drafter.ttt_logits(ids, feats, steps)
        with torch.no_grad():
            tgt_logits = head(batch["last_hidden"])
        return ttt_loss(step_logits, tgt_logits, mask, lengths, cfg.ttt_step_decay)

    # ------------------------------------------------------------------ state
    @property
    def state_path(self) -> Path:
        return self.work_dir / "train_state.pt"

    def save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        state = {
            "model": trainable_state(self.drafter),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "history": self.history,
            "recipe": dataclasses.asdict(self.cfg),
        }
        torch.save(state, tmp)
        tmp.replace(self.state_path)

    def load_state(self) -> None:
        state = torch.load(self.state_path, weights_only=False)
        if state["recipe"] != dataclasses.asdict(self.cfg):
            raise ValueError(
                f"{self.state_path} was written by another recipe; use a fresh --work-dir "
                "or drop --resume"
            )
        self.drafter.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history = state["step"], state["history"]

    # ------------------------------------------------------------------ loop
    def train_step(self, indices: list[int]) -> dict:
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.total_steps, self.cfg.lr, self.cfg.warmup_frac)
        loss, metrics = self.batch_loss(self.cache.batch(indices), gen)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.drafter.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        return {"step": self.step, "loss": float(loss.detach()), **metrics}

    def run(
        self,
        resume: bool = False,
        progress: bool = True,
        save_every: int = 50,
        stop_after: int | None = None,
    ) -> DrafterConfig | None:
        """Train all epochs and write the checkpoint (``None`` if stopped early)."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        if resume and self.state_path.is_file():
            self.load_state()
        self.drafter.train()
        budget = stop_after if stop_after is not None else 1 << 62
        columns = [
            TextColumn(f"[bold]{self.cfg.variant}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task("train", total=self.total_steps, completed=self.step, info="")
            while self.step < self.total_steps and budget > 0:
                epoch, index = divmod(self.step, self.steps_per_epoch)
                t0 = time.perf_counter()
                record = self.train_step(self.epoch_batches(epoch)[index])
                record["seconds"] = time.perf_counter() - t0
                self.history.append(record)
                budget -= 1
                bar.update(
                    task,
                    completed=self.step,
                    info=f"loss {record['loss']:.3f} ep {epoch} {record['seconds']:.2f}s/step",
                )
                if self.step % save_every == 0:
                    self.save_state()
        self.save_state()
        if self.step < self.total_steps:
            return None
        return self.finish()

    def finish(self) -> DrafterConfig:
        self.drafter.eval()
        save_drafter(self.drafter, self.out_dir)
        (self.work_dir / "history.json").write_text(json.dumps(self.history) + "\n")
        return self.drafter.config
