import pytest

from dspark.models.tokenizer import (
    IM_END,
    IM_START,
    MASK,
    SPECIAL_TOKENS,
    Message,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
)

TEXTS = [
    "Natalia sold 48 / 2 = 24 clips in May.\nThe answer is \\boxed{72}.",
    "def f(x):\n    return {k: v for k, v in x.items() if v is not None}",
    "Unicode survives: café, naïve, 東京, emoji 🙂 and tabs\tand  double  spaces.",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_special_tokens_are_single_reserved_ids(small_tokenizer):
    vocab = small_tokenizer.inner.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert small_tokenizer.special_ids == frozenset(range(5))
    assert small_tokenizer.mask_id == 4 and small_tokenizer.pad_id == 1
    assert small_tokenizer.stop_ids == (small_tokenizer.im_end_id, small_tokenizer.endoftext_id)


def test_text_spelling_a_special_token_stays_plain_text(small_tokenizer):
    ids = small_tokenizer.encode(f"a {IM_END} b {MASK}")
    assert not set(ids) & small_tokenizer.special_ids
    assert small_tokenizer.decode(ids) == f"a {IM_END} b {MASK}"


def test_chat_template_layout_and_loss_mask(small_tokenizer):
    tok = small_tokenizer
    msgs = [Message("user", "What is 2 + 3?"), Message("assistant", "2 + 3 = 5.")]
    ids, mask = tok.encode_conversation(msgs)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text == (
        f"{IM_START}user\nWhat is 2 + 3?{IM_END}\n{IM_START}assistant\n2 + 3 = 5.{IM_END}\n"
    )
    supervised = [t for t, m in zip(ids, mask) if m]
    assert tok.decode(supervised, skip_special_tokens=False) == f"2 + 3 = 5.{IM_END}"
    prompt = tok.chat_prompt("What is 2 + 3?")
    assert ids[: len(prompt)] == prompt  # the prompt is a prefix of the trained sequence
    assert tok.decode(prompt, skip_special_tokens=False).endswith(f"{IM_START}assistant\n")


def test_template_rejects_bad_messages(small_tokenizer):
    with pytest.raises(ValueError, match="role must be one of"):
        small_tokenizer.render_chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="at least one message"):
        small_tokenizer.render_chat([])


def test_mask_token_never_occurs_in_corpus(corpus, small_tokenizer):
    for domain, splits in corpus.items():
        for rec in splits["train"][:300]:
            ids, _ = small_tokenizer.encode_conversation(rec["messages"])
            assert small_tokenizer.mask_id not in ids, domain


def test_stream_decoder_never_splits_characters(small_tokenizer):
    text = "東京 🙂 café"
    dec = StreamDecoder(small_tokenizer)
    pieces = [dec.push(t) for t in small_tokenizer.encode(text)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_qwen_style_tokenizer_without_pad_or_mask_loads(tmp_path, write_qwen_tokenizer):
    write_qwen_tokenizer(tmp_path, vocab_size=300)
    tok = Tokenizer.from_file(tmp_path)
    assert tok.pad_id == tok.endoftext_id and tok.mask_id is None
    assert tok.decode(tok.chat_prompt("hello"), skip_special_tokens=False).startswith(IM_START)


def test_missing_or_corrupt_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path)
