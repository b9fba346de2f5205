"""`dspark train target`: trains the demo MoE target on CPU from the corpus.

AdamW, linear warmup then cosine decay, gradient clipping, a rich progress bar with loss
and tokens/s, resumable state every ``save_every`` steps, a loss-curve PNG, and held-out
nats/token per domain measured on answer tokens (what a drafter has to predict).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dspark.models.checkpoint import save_target
from dspark.models.config import ConfigError, TargetConfig
from dspark.models.target import TargetModel
from dspark.models.tokenizer import Tokenizer
from dspark.training.corpus.build import DOMAINS, CorpusConfig, build_corpus, write_corpus
from dspark.training.lm_data import Batch, Example, collate, encode_records, make_batches
from dspark.training.tokenizer_train import corpus_texts, train_tokenizer


@dataclass(frozen=True)
class TrainTargetConfig:
    """Recipe of one target training run."""

    steps: int = 2400
    """Optimiser steps."""
    tokens_per_batch: int = 8192
    """Padded tokens per batch (sequences are length-bucketed)."""
    lr: float = 2e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.05
    """Cosine floor as a fraction of ``lr``."""
    warmup_frac: float = 0.03
    """Share of steps spent in linear warmup."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    prompt_loss_weight: float = 0.2
    """Loss weight of prompt tokens (answer tokens weigh 1)."""
    aux_loss_coef: float = 0.01
    """MoE load-balancing loss weight."""
    max_seq_len: int = 320
    """Conversations longer than this are dropped."""
    math_per_epoch: int = 6000
    """Math problems mixed into each epoch (code and chat train splits are used whole)."""
    vocab_size: int = 4096
    """BPE vocabulary size."""
    eval_every: int = 200
    """Steps between held-out evaluations on a subset."""
    save_every: int = 200
    """Steps between resumable state files."""
    seed: int = 0
    """Seeds the corpus, the tokenizer, the init and the batch order."""
    model: dict = field(default_factory=dict)
    """Overrides of ``TargetConfig`` fields (the vocabulary comes from the tokenizer)."""

    def __post_init__(self) -> None:
        for name in ("steps", "tokens_per_batch", "eval_every", "save_every", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        # validate the model overrides now, not after the corpus and tokenizer are built
        try:
            probe = TargetConfig(**self.model)
        except TypeError as exc:
            raise ConfigError(f"model overrides: {exc}") from exc
        if self.max_seq_len > probe.max_position_embeddings:
            raise ValueError(
                f"max_seq_len ({self.max_seq_len}) must be <= max_position_embeddings "
                f"({probe.max_position_embeddings})"
            )


def lr_at(step: int, cfg: TrainTargetConfig) -> float:
    warmup = max(1, int(cfg.steps * cfg.warmup_frac))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def weighted_lm_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    # logits: [B, T, V]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), reduction="none")
    w = batch.weights.flatten()
    return (nll * w).sum() / w.sum().clamp_min(1.0)


@torch.no_grad()
def heldout_nats(
    model: TargetModel, examples: dict[str, list[Example]], pad_id: int, tokens_per_batch: int
) -> dict[str, float]:
    """Mean NLL per answer token of each domain's held-out examples."""
    was_training = model.training
    model.eval()
    out = {}
    for domain, exs in examples.items():
        total, count = 0.0, 0.0
        for group in make_batches(exs, tokens_per_batch, seed=0):
            batch = collate(group, pad_id, prompt_weight=0.0)
            logits = model(batch.input_ids).logits
            nll = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="none")
            total += float((nll * batch.answer_mask.flatten()).sum())
            count += float(batch.answer_mask.sum())
        out[domain] = total / max(count, 1.0)
    model.train(was_training)
    return out


class TargetTrainer:
    """Owns one run: data, model, optimiser, resumable state and outputs."""

    def __init__(
        self,
        cfg: TrainTargetConfig,
        work_dir: str | Path,
        out_dir: str | Path,
        corpus: dict | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        """``corpus`` and ``tokenizer`` default to the full seeded corpus and a BPE trained
        on it (both written to ``work_dir``); tests pass small ones."""
        self.cfg = cfg
        self.work_dir = Path(work_dir)
        self.out_dir = Path(out_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        if corpus is None:
            corpus = build_corpus(CorpusConfig(seed=cfg.seed))
            write_corpus(corpus, self.work_dir / "corpus")
        tok_path = self.work_dir / "tokenizer.json"
        if tokenizer is not None:
            self.tokenizer = tokenizer
        elif tok_path.is_file():
            self.tokenizer = Tokenizer.from_file(tok_path)
        else:
            self.tokenizer = train_tokenizer(corpus_texts(corpus), cfg.vocab_size)
            self.tokenizer.save(tok_path)
        self._prepare_examples(corpus)
        self.model_cfg = self._model_config()
        self.model = TargetModel(self.model_cfg)
        self.model.init_weights(cfg.seed)
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=(0.9, 0.95),
        )
        self.step = 0
        self.history: list[dict] = []

    def _prepare_examples(self, corpus: dict) -> None:
        tok, max_len = self.tokenizer, self.cfg.max_seq_len
        self.train = {}
        self.heldout = {}
        self.dropped = {}
        for domain in DOMAINS:
            self.train[domain], dropped = encode_records(tok, corpus[domain]["train"], max_len)
            self.heldout[domain], _ = encode_records(tok, corpus[domain]["heldout"], max_len)
            self.dropped[domain] = dropped
        rng = random.Random(self.cfg.seed + 5)
        self.heldout_probe = {d: rng.sample(e, min(48, len(e))) for d, e in self.heldout.items()}

    def _model_config(self) -> TargetConfig:
        tok = self.tokenizer
        base = dict(
            vocab_size=tok.vocab_size,
            eos_token_id=[tok.im_end_id, tok.endoftext_id],
            pad_token_id=tok.pad_id,
            bos_token_id=None,
            extra={"name": "dspark-demo-target", "recipe": dataclasses.asdict(self.cfg)},
        )
        base.update(self.cfg.model)
        return TargetConfig(**base)

    def epoch_batches(self, epoch: int) -> list[list[Example]]:
        math_all = self.train["math"]
        n = min(self.cfg.math_per_epoch, len(math_all))
        start = (epoch * n) % len(math_all)
        math_part = (math_all + math_all)[start : start + n]
        pool = self.train["code"] + self.train["chat"] + math_part
        return make_batches(pool, self.cfg.tokens_per_batch, seed=self.cfg.seed * 7919 + epoch)

    # ------------------------------------------------------------------ state
    @property
    def state_path(self) -> Path:
        return self.work_dir / "train_state.pt"

    def save_state(self, epoch: int, index: int) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "epoch": epoch,
                "index": index,
                "history": self.history,
                "recipe": dataclasses.asdict(self.cfg),
            },
            tmp,
        )
        tmp.replace(self.state_path)

    def load_state(self) -> tuple[int, int]:
        state = torch.load(self.state_path, weights_only=False)
        if state["recipe"] != dataclasses.asdict(self.cfg):
            raise ValueError(
                f"{self.state_path} was written by another recipe; start a fresh --work-dir "
                "or drop --resume"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.history = state["history"]
        return state["epoch"], state["index"]

    # ------------------------------------------------------------------ loop
    def train_step(self, batch: Batch) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        out = self.model(batch.input_ids)
        loss = weighted_lm_loss(out.logits, batch)
        total = loss + self.cfg.aux_loss_coef * out.aux_loss if out.aux_loss is not None else loss
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    def run(
        self, resume: bool = False, progress: bool = True, stop_after: int | None = None
    ) -> dict | None:
        """Train ``cfg.steps`` steps, then write the checkpoint. With ``stop_after``, save the
        resumable state after that many steps of this call and return ``None``."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        epoch, index = (0, 0)
        if resume and self.state_path.is_file():
            epoch, index = self.load_state()
        budget = stop_after if stop_after is not None else 1 << 62
        self.model.train()
        columns = [
            TextColumn("[bold]target"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
        ]
        tokens_seen = self.history[-1]["tokens"] if self.history else 0
        ewma = None
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task("train", total=self.cfg.steps, completed=self.step, info="")
            while budget > 0 and self.step < self.cfg.steps:
                batches = self.epoch_batches(epoch)
                while budget > 0 and index < len(batches) and self.step < self.cfg.steps:
                    t0 = time.perf_counter()
                    budget -= 1
                    batch = collate(
                        batches[index], self.tokenizer.pad_id, self.cfg.prompt_loss_weight
                    )
                    index += 1
                    loss = self.train_step(batch)
                    ewma = loss if ewma is None else 0.95 * ewma + 0.05 * loss
                    tokens_seen += batch.num_tokens
                    tps = batch.num_tokens / (time.perf_counter() - t0)
                    self._record(tokens_seen, loss)
                    info = f"loss {ewma:.3f}  {tps:,.0f} tok/s  ep {epoch}"
                    bar.update(task, completed=self.step, info=info)
                    if self.step % self.cfg.save_every == 0:
                        self.save_state(epoch, index)
                if index >= len(batches):
                    epoch, index = epoch + 1, 0
        self.save_state(epoch, index)
        if self.step < self.cfg.steps:
            return None
        return self.finish()

    def _record(self, tokens_seen: int, loss: float) -> None:
        record = {
            "step": self.step,
            "tokens": tokens_seen,
            "loss": loss,
            "lr": lr_at(self.step - 1, self.cfg),
        }
        if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
            record["heldout"] = heldout_nats(
                self.model, self.heldout_probe, self.tokenizer.pad_id, self.cfg.tokens_per_batch
            )
        self.history.append(record)

    def finish(self) -> dict:
        final = heldout_nats(
            self.model, self.heldout, self.tokenizer.pad_id, self.cfg.tokens_per_batch
        )
        save_target(self.model, self.out_dir, dtype=torch.bfloat16, tokenizer=self.tokenizer)
        metrics = {
            "heldout_nats_per_answer_token": final,
            "heldout_examples": {d: len(e) for d, e in self.heldout.items()},
            "train_examples": {d: len(e) for d, e in self.train.items()},
            "dropped_too_long": self.dropped,
            "steps": self.step,
            "tokens_seen": self.history[-1]["tokens"] if self.history else 0,
            "parameters": self.model.num_parameters(),
            "recipe": dataclasses.asdict(self.cfg),
        }
        (self.work_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (self.work_dir / "history.json").write_text(json.dumps(self.history) + "\n")
        plot_loss_curve(self.history, self.work_dir / "loss_curve.png")
        return metrics


def plot_loss_curve(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    tokens = [h["tokens"] / 1e6 for h in history]
    losses = [h["loss"] for h in history]
    smooth, acc = [], None
    for v in losses:
        acc = v if acc is None else 0.97 * acc + 0.03 * v
        smooth.append(acc)
    ax.plot(tokens, smooth, label="train (weighted, smoothed)", color="black")
    evals = [h for h in history if "heldout" in h]
    for domain in DOMAINS:
        pts = [(h["tokens"] / 1e6, h["heldout"][domain]) for h in evals if domain in h["heldout"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"held-out {domain} (answer tokens)")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("nats / token")
    ax.set_ylim(0, max(6.0, min(10.0, max(smooth[: max(1, len(smooth) // 20)]))))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_checkpoint(path: str | Path, seed: int = 0, max_seq_len: int = 320) -> dict:
    """Held-out nats per answer token of each domain for a saved checkpoint (bf16 weights
    loaded in fp32), on the corpus of ``seed``."""
    from dspark.models.generation import load_for_generation

    model, tokenizer = load_for_generation(path)
    corpus = build_corpus(CorpusConfig(seed=seed))
    heldout = {
        d: encode_records(tokenizer, corpus[d]["heldout"], max_len=max_seq_len)[0] for d in DOMAINS
    }
    nats = heldout_nats(model, heldout, tokenizer.pad_id, tokens_per_batch=4096)
    return {
        "heldout_nats_per_answer_token": nats,
        "heldout_examples": {d: len(e) for d, e in heldout.items()},
    }
