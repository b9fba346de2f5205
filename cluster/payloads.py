"""What the ingress sends a ``TargetShard`` replica and what the replica streams back:
small frozen dataclasses, pickled by Ray between the two processes (and read by the
request router, which ranks by a shard request's ``max_tokens`` and prompt).

Vocabulary:
- *shard request*: one choice of an OpenAI request, in the replica's terms (a chat's
  messages, a prompt text or prompt token ids, and how to decode it);
- *shard chunk*: what the replica yields per engine output: the new text, the token
  counts so far, and on the last chunk the finish reason and the speculative-decoding
  metrics;
- *token entry*: one token's log-probability under the target as text and UTF-8 bytes,
  with its most likely alternatives.

NOTE: no checks here. HTTP input is validated once, by the ingress's schema
(``dspark.cluster.openai_schema``); what reaches the engine is checked once, by
``Engine.check_request`` (through ``AsyncEngine.validate``). Stop *strings* are cut in one
place, on the replica (``dspark.cluster.shard_stream.cut_at_stop``); stop *tokens* are the
engine scheduler's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from dspark.models.tokenizer import Message

__all__ = ["Alternative", "Message", "ShardChunk", "ShardRequest", "TokenEntry"]


@dataclass(frozen=True)
class ShardRequest:
    """One choice for ``TargetShard.generate``: exactly one of ``messages``, ``prompt`` and
    ``prompt_ids`` is set."""

    messages: tuple[Message, ...] | None = None
    """A chat: the conversation the chat template renders, then the assistant's turn."""
    prompt: str | None = None
    """A text completion's prompt (returned as given with ``echo``)."""
    prompt_ids: tuple[int, ...] | None = None
    """A text completion's prompt as token ids."""
    max_tokens: int | None = None
    """Most tokens to generate; None: what the context leaves after the prompt; 0: score
    the prompt only (with ``echo`` and ``logprobs``), nothing generated."""
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    """Keep generating past the end-of-turn tokens."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends before the first one (which is not returned)."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    """Token id -> bias added to its logit."""
    min_tokens: int = 0
    """Stop tokens and stop strings are ignored before this many tokens."""
    logprobs: int | None = None
    """None, or return each token's log-probability with this many alternatives."""
    echo: bool = False
    """Return the prompt's text (and, with ``logprobs``, its scores) on the first chunk."""
    stream_interval: int = 1
    """Tokens the replica gathers into one chunk after the first (the last chunk goes at
    once); 0: all of them into the last chunk (a response that is not streamed)."""
    trace_context: Mapping[str, str] | None = None
    """The W3C trace context of the ingress's span (``traceparent``), when it is traced: the
    router and the replica open their spans under it."""

    @property
    def chat(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True)
class Alternative:
    """One of the most likely tokens at a position."""

    token: str
    bytes: tuple[int, ...]
    logprob: float


@dataclass(frozen=True)
class TokenEntry:
    """A token's log-probability. ``token`` is its text (U+FFFD where the token is part of
    a UTF-8 character), ``bytes`` its UTF-8 bytes; ``logprob`` is None for the first prompt
    token (it has no context)."""

    token: str
    bytes: tuple[int, ...]
    logprob: float | None
    top: tuple[Alternative, ...] = ()


@dataclass(frozen=True)
class ShardChunk:
    """One engine output of one choice, as text."""

    text: str
    """The new text (a stop string and what follows it are cut off)."""
    finish_reason: str | None
    """On the last chunk: ``stop``, ``length`` or ``error: ...``; None before."""
    prompt_tokens: int
    completion_tokens: int
    """Tokens generated so far."""
    replica: str
    """The replica that serves the choice."""
    spec: dict | None = None
    """On the last chunk of a speculative request: its speculative-decoding metrics
    (vLLM's per-request shape)."""
    logprobs: tuple[TokenEntry, ...] | None = None
    """One entry per token of this chunk when the request asked for logprobs."""
    prompt_text: str | None = None
    """First chunk, with ``echo``: the prompt's text."""
    prompt_logprobs: tuple[TokenEntry, ...] | None = None
    """First chunk, with ``echo`` and ``logprobs``: one entry per prompt token."""
