"""Byte-level BPE tokenizer and the chat template used everywhere a conversation becomes tokens.

Special tokens (Qwen names, so a Qwen ``tokenizer.json`` works with the same template):
``<|endoftext|>`` ends a document, ``<|pad|>`` pads batches, ``<|im_start|>`` opens a turn,
``<|im_end|>`` ends a turn (the end-of-turn token generation stops at), and ``<mask>`` fills
the drafter's prediction slots; ``<mask>`` never occurs in the training data.

Template (Qwen ChatML)::

    <|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n{reply}<|im_end|>

``Tokenizer.save_pretrained`` writes a Hugging Face tokenizer folder: ``tokenizer.json`` plus
``tokenizer_config.json`` (which names ``PreTrainedTokenizerFast``, the class that runs
``tokenizer.json`` unchanged, and carries ``CHAT_TEMPLATE``) and ``special_tokens_map.json``, so
``transformers.AutoTokenizer`` counts and renders exactly as the server does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
MASK = "<mask>"
SPECIAL_TOKENS = (ENDOFTEXT, PAD, IM_START, IM_END, MASK)
ROLES = ("system", "user", "assistant")

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

# The Jinja twin of ``encode_conversation`` for ``transformers``' ``apply_chat_template``: the
# same turns, the same generation prompt, the same role and content checks.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('message role must be one of system, user, assistant, got '"
    " + message['role']) }}"
    "{%- endif %}"
    "{%- if message['content'] is not string %}"
    "{{- raise_exception('message content must be a string') }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class TokenizerError(ValueError):
    """The tokenizer file is missing, corrupt or lacks a required special token."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"message role must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise ValueError(f"message content must be a string, got {type(self.content).__name__}")


class Tokenizer:
    """Wraps a ``tokenizers.Tokenizer``; special tokens inside user text stay plain text."""

    def __init__(self, inner: HFTokenizer) -> None:
        self.inner = inner
        # NOTE: text that merely spells "<|im_end|>" must not become the special token,
        # or a user could forge turns; special ids are only inserted by the template.
        self.inner.encode_special_tokens = True
        vocab = inner.get_vocab(with_added_tokens=True)
        for required in (IM_START, IM_END, ENDOFTEXT):
            if required not in vocab:
                raise TokenizerError(f"tokenizer lacks the special token {required!r}")
        self.im_start_id = vocab[IM_START]
        self.im_end_id = vocab[IM_END]
        self.endoftext_id = vocab[ENDOFTEXT]
        self.pad_id = vocab.get(PAD, self.endoftext_id)
        self.mask_id = vocab.get(MASK)
        self.special_ids = frozenset(
            tok_id for tok_id, tok in inner.get_added_tokens_decoder().items() if tok.special
        )
        self.vocab_size = inner.get_vocab_size(with_added_tokens=True)
        self._newline = self.encode("\n")
        self._role_headers = {role: self.encode(role + "\n") for role in ROLES}

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end a generated reply."""
        return (self.im_end_id, self.endoftext_id)

    # ------------------------------------------------------------------ files
    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} does not exist")
        try:
            inner = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception on bad JSON
            raise TokenizerError(f"{path} is not a valid tokenizer.json: {exc}") from exc
        return cls(inner)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` only (see ``save_pretrained`` for a Hugging Face folder)."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.inner.save(str(path))

    def save_pretrained(self, directory: str | Path, model_max_length: int) -> None:
        """Write ``tokenizer.json`` and the Hugging Face files next to it."""
        self.save(Path(directory) / TOKENIZER_FILE)
        self.write_hf_files(directory, model_max_length)

    def write_hf_files(self, directory: str | Path, model_max_length: int) -> None:
        """Write ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``directory``.

        ``model_max_length`` is the model's ``max_position_embeddings``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        special = self.hf_special_tokens()
        config = {
            # NOTE: the model type (qwen3_moe) maps to Qwen2Tokenizer, which in transformers 5
            # rebuilds the pre-tokenizer and normalizer from Qwen2's (digits split one by
            # one, NFC) instead of using tokenizer.json's; this class uses the file unchanged.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "model_max_length": model_max_length,
            "model_input_names": ["input_ids", "attention_mask"],
            "clean_up_tokenization_spaces": False,
            # NOTE: true would make plain encode() treat a typed "<|im_end|>" as text, as the
            # server does, but transformers then also splits the control tokens the chat
            # template writes, so apply_chat_template would be wrong for every conversation.
            # Per call, encode(text, split_special_tokens=True) gives the server's ids.
            "split_special_tokens": False,
            "chat_template": CHAT_TEMPLATE,
        }
        _write_json(directory / TOKENIZER_CONFIG_FILE, config)
        _write_json(directory / SPECIAL_TOKENS_MAP_FILE, special)

    def hf_special_tokens(self) -> dict:
        """Hugging Face's named special tokens: ``<|im_end|>`` ends a reply, no BOS is added,
        and every other special token of the vocabulary is an additional one."""
        pad = self.inner.id_to_token(self.pad_id)
        named = {"bos_token": None, "eos_token": IM_END, "pad_token": pad, "unk_token": None}
        added = sorted(self.inner.get_added_tokens_decoder().items())
        extra = [
            tok.content for _, tok in added if tok.special and tok.content not in (IM_END, pad)
        ]
        return {**named, "additional_special_tokens": extra}

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat template
    def render_chat(
        self, messages: Sequence[Message | dict], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation; ends with the assistant header when asked."""
        ids, _ = self.encode_conversation(messages, add_generation_prompt)
        return ids

    def encode_conversation(
        self, messages: Sequence[Message | dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Ids and a loss mask: 1 on each assistant reply and its ``<|im_end|>``, else 0."""
        if not messages:
            raise ValueError("a conversation needs at least one message")
        ids: list[int] = []
        mask: list[int] = []
        for raw in messages:
            msg = raw if isinstance(raw, Message) else Message(**raw)
            # NOTE: role line and content are encoded as one text, as a Hugging Face chat
            # template renders them, so content starting with whitespace gets the same ids
            # ("\n" may merge with the indentation after it; such a token counts as header)
            header, content = self._turn(msg.role, msg.content)
            header = [self.im_start_id, *header]
            body = [*content, self.im_end_id]
            ids += header + body + self._newline
            weight = 1 if msg.role == "assistant" else 0
            mask += [0] * len(header) + [weight] * len(body) + [0] * len(self._newline)
        if add_generation_prompt:
            header = [self.im_start_id, *self._role_headers["assistant"]]
            ids += header
            mask += [0] * len(header)
        return ids, mask

    def _turn(self, role: str, content: str) -> tuple[list[int], list[int]]:
        """Ids of ``role\ncontent``, split into the role line's and the content's."""
        if not content or not content[0].isspace():
            return self._role_headers[role], self.encode(content)
        encoding = self.inner.encode(f"{role}\n{content}", add_special_tokens=False)
        split = len(role) + 1
        num_header = sum(1 for start, _ in encoding.offsets if start < split)
        return encoding.ids[:num_header], encoding.ids[num_header:]

    def chat_prompt(self, user_text: str) -> list[int]:
        """The ids a model continues to answer one user turn."""
        return self.render_chat([Message("user", user_text)], add_generation_prompt=True)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


class StreamDecoder:
    """Turns a growing list of ids into text increments without splitting UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character; wait for the next token
        new = text[len(self.emitted) :]
        self.emitted = text
        return new
