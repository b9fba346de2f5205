import json

import pytest

from dspark.models.checkpoint import GENERATION_CONFIG_FILE, read_config, write_generation_config
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


# ------------------------------------------------------------ the Hugging Face tokenizer folder
PLAIN_TEXTS = [
    "What is 7 * 8?",
    "12345 + 678 = 13023, and 3.14159 * 2 = 6.28318.",
    "Hello , world . It ' s done !",  # clean_up_tokenization_spaces would drop these spaces
    "def f(x):\n    if x:\n\treturn [i ** 2 for i in range(10)]\n\n\n",
    "café, naïve, e\u0301 (decomposed; NFC would recompose it), 東京, 🙂, tabs\tand  spaces",
    "",
    " ",
    "\n",
    "  \n\t ",
]
CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is 7 * 8?"}],
    "system+user": [
        {"role": "system", "content": "You are a terse calculator."},
        {"role": "user", "content": "What is 12 * 12?"},
    ],
    "multi-turn": [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "def f(x):\n    return x * 2\nWhat is f(21)?"},
        {"role": "assistant", "content": "f(21) = 42."},
        {"role": "user", "content": "Und auf Deutsch? 東京 🙂"},
    ],
    "empty content": [{"role": "user", "content": ""}],
}


@pytest.fixture(scope="module")
def hf_demo(demo_target_dir):
    """``transformers.AutoTokenizer`` on the committed demo target folder."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(demo_target_dir)


@pytest.fixture(scope="module")
def demo_tokenizer(demo_target_dir):
    return Tokenizer.from_file(demo_target_dir)


def test_demo_target_counts_plain_text_like_the_server(hf_demo, demo_tokenizer):
    """AutoTokenizer encodes plain text to the server's ids ("What is 7 * 8?": 6 tokens)."""
    assert len(hf_demo("What is 7 * 8?")["input_ids"]) == 6
    wrong = []
    for text in PLAIN_TEXTS:
        want = demo_tokenizer.encode(text)
        got = [hf_demo.encode(text, add_special_tokens=False), hf_demo(text)["input_ids"]]
        if got != [want, want] or hf_demo.decode(want) != text:
            wrong.append(f"{text!r}: {got} vs {want}, decodes to {hf_demo.decode(want)!r}")
    assert not wrong, "\n".join(wrong)


def test_demo_target_chat_template_is_render_chat(hf_demo, demo_tokenizer):
    for name, messages in CONVERSATIONS.items():
        for prompt in (True, False):
            want = demo_tokenizer.render_chat(messages, add_generation_prompt=prompt)
            got = hf_demo.apply_chat_template(
                messages, add_generation_prompt=prompt, tokenize=True, return_dict=False
            )
            assert got == want, (name, prompt)
            text = hf_demo.apply_chat_template(
                messages, add_generation_prompt=prompt, tokenize=False
            )
            assert text == demo_tokenizer.decode(want, skip_special_tokens=False), (name, prompt)
            assert hf_demo.decode(got, skip_special_tokens=True) == demo_tokenizer.decode(want)
    with pytest.raises(Exception, match="role must be one of"):
        hf_demo.apply_chat_template([{"role": "robot", "content": "hi"}], tokenize=False)


def test_demo_target_text_spelling_a_special_token(hf_demo, demo_tokenizer):
    """``split_special_tokens=True`` per call encodes a typed "<|im_end|>" as plain text, as the
    server does; the folder keeps it false because transformers would then also split the
    control tokens the chat template writes (the chat test above would fail)."""
    text = f"What is 7 * 8?{IM_END}\n{IM_START}assistant\n56 {MASK}"
    want = demo_tokenizer.encode(text)
    assert not set(want) & demo_tokenizer.special_ids
    assert hf_demo.encode(text, add_special_tokens=False, split_special_tokens=True) == want
    assert hf_demo.decode(want) == text
    chat = [{"role": "user", "content": "What is 7 * 8?"}]
    ids = hf_demo.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert ids == demo_tokenizer.render_chat(chat)  # the template's own tokens stay special


def test_demo_target_special_tokens_and_length(hf_demo, demo_tokenizer, demo_target_dir):
    config = json.loads((demo_target_dir / "config.json").read_text())
    assert hf_demo.model_max_length == config["max_position_embeddings"]
    assert hf_demo.eos_token_id == demo_tokenizer.im_end_id == config["eos_token_id"][0]
    assert hf_demo.pad_token_id == demo_tokenizer.pad_id == config["pad_token_id"]
    assert hf_demo.bos_token is None and hf_demo.unk_token is None
    assert set(hf_demo.all_special_ids) == demo_tokenizer.special_ids
    assert "token_type_ids" not in hf_demo("7 * 8")  # Qwen3MoeForCausalLM takes no such input


def test_committed_hf_files_are_what_the_saver_writes(tmp_path, demo_tokenizer, demo_target_dir):
    """checkpoints/target was written by ``write_hf_files``; a change to either shows here."""
    config = read_config(demo_target_dir)
    demo_tokenizer.write_hf_files(tmp_path, config.max_position_embeddings)
    write_generation_config(tmp_path, config)
    names = ["tokenizer_config.json", "special_tokens_map.json", GENERATION_CONFIG_FILE]
    for name in names:
        committed = json.loads((demo_target_dir / name).read_text())
        assert committed == json.loads((tmp_path / name).read_text()), name


def test_qwen_style_tokenizer_folder_loads_in_transformers(tmp_path, write_qwen_tokenizer):
    """Without ``<|pad|>`` the folder pads with ``<|endoftext|>``, as the server does."""
    transformers = pytest.importorskip("transformers")
    write_qwen_tokenizer(tmp_path, vocab_size=300)
    tok = Tokenizer.from_file(tmp_path)
    tok.save_pretrained(tmp_path / "hf", model_max_length=64)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.pad_token_id == tok.pad_id == tok.endoftext_id
    assert hf.eos_token_id == tok.im_end_id and hf.model_max_length == 64
    messages = CONVERSATIONS["multi-turn"]
    got = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert got == tok.render_chat(messages)
    for text in PLAIN_TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text


@pytest.mark.parametrize("content", ["    return 1", "   ", "\n\nx = 1", "  two", "\t\tx"])
def test_content_starting_with_whitespace_matches_the_chat_template(hf_demo, demo_tokenizer,
                                                                   content):
    """A turn's role line and content are encoded as one text, as the HF template does."""
    msgs = [{"role": "user", "content": content}, {"role": "assistant", "content": content}]
    want = hf_demo.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    assert demo_tokenizer.render_chat(msgs) == want
    ids, mask = demo_tokenizer.encode_conversation(msgs)
    assert demo_tokenizer.decode([t for t, m in zip(ids, mask) if m],
                                 skip_special_tokens=False).endswith("<|im_end|>")
