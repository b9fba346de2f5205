"""Tokenised conversations and length-bucketed batches for language-model training."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from dspark.models.tokenizer import Tokenizer


@dataclass
class Example:
    ids: list[int]
    answer_mask: list[int]  # 1 on assistant tokens (reply and its <|im_end|>)
    domain: str


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T] next tokens (pad where none)
    weights: torch.Tensor  # [B, T] loss weight of each label
    answer_mask: torch.Tensor  # [B, T] 1 where the label is an answer token

    @property
    def num_tokens(self) -> int:
        return int((self.weights > 0).sum())


def encode_records(
    tokenizer: Tokenizer, records: list[dict], max_len: int
) -> tuple[list[Example], int]:
    """Tokenise records; ones longer than ``max_len`` are dropped (their count is returned)."""
    out, dropped = [], 0
    for rec in records:
        ids, mask = tokenizer.encode_conversation(rec["messages"])
        if len(ids) > max_len:
            dropped += 1
            continue
        out.append(Example(ids=ids, answer_mask=mask, domain=rec.get("domain", "")))
    return out, dropped


def collate(examples: list[Example], pad_id: int, prompt_weight: float) -> Batch:
    width = max(len(e.ids) for e in examples) - 1
    bsz = len(examples)
    input_ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    labels = torch.full((bsz, width), pad_id, dtype=torch.long)
    weights = torch.zeros(bsz, width)
    answer = torch.zeros(bsz, width)
    for row, ex in enumerate(examples):
        n = len(ex.ids) - 1
        input_ids[row, :n] = torch.tensor(ex.ids[:-1])
        labels[row, :n] = torch.tensor(ex.ids[1:])
        ans = torch.tensor(ex.answer_mask[1:], dtype=torch.float32)
        answer[row, :n] = ans
        weights[row, :n] = ans + (1 - ans) * prompt_weight
    return Batch(input_ids=input_ids, labels=labels, weights=weights, answer_mask=answer)


def make_batches(examples: list[Example], tokens_per_batch: int, seed: int) -> list[list[Example]]:
    """Shuffle, sort by length within windows, and cut batches of at most
    ``tokens_per_batch`` padded tokens; the batch order is shuffled again."""
    rng = random.Random(seed)
    order = examples[:]
    rng.shuffle(order)
    window = 64 * max(1, tokens_per_batch // 256)
    batches: list[list[Example]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda e: len(e.ids))
        current: list[Example] = []
        for ex in chunk:
            width = max([len(ex.ids)] + [len(e.ids) for e in current])
            if current and width * (len(current) + 1) > tokens_per_batch:
                batches.append(current)
                current = []
            current.append(ex)
        if current:
            batches.append(current)
    rng.shuffle(batches)
    return batches
