"""Trains the byte-level BPE tokenizer on the corpus's train split."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from dspark.models.tokenizer import SPECIAL_TOKENS, Tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """Byte-level BPE with the chat-template special tokens at ids 0..4."""
    if not 256 + len(SPECIAL_TOKENS) < vocab_size <= 65536:
        raise ValueError(
            f"vocab_size must be in ({256 + len(SPECIAL_TOKENS)}, 65536], got {vocab_size}"
        )
    inner = HFTokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    inner.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(inner)


def corpus_texts(corpus: dict) -> Iterable[str]:
    """Every message of every train record (special tokens are added by the template)."""
    for splits in corpus.values():
        for rec in splits["train"]:
            for msg in rec["messages"]:
                yield msg["role"] + "\n" + msg["content"]
