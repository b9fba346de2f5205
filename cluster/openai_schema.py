"""The OpenAI wire format as pydantic models: the request bodies (the one place HTTP input
is validated: types, ranges, and with ``check_limits`` the served model's context and
vocabulary) and the response bodies and chunks (the schemas of ``/openapi.json``).

Every response and chunk carries ``id``, ``object``, ``created``, ``model`` and
``choices[].index``; the final non-streaming body and the usage chunk carry the request's
speculative-decoding metrics at the root, in vLLM's shape (``metrics.speculative_decoding``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dspark.cluster.openai_errors import ERROR_RESPONSES
from dspark.cluster.payloads import Message, ShardRequest

MAX_LOGPROBS = 20
MAX_N = 16
MAX_PROMPTS = 64
MAX_STOPS = 4


@dataclass(frozen=True)
class ServedModel:
    """The one model this server serves: its ``name`` (what clients put in ``model``), and
    its limits: token counts below ``context``, token ids below ``vocab``."""

    name: str
    context: int
    vocab: int

    def check_ids(self, field: str, ids) -> None:
        bad = [t for t in ids if t >= self.vocab]
        if bad:
            raise ValueError(f"{field}: token ids {bad[:5]} outside [0, {self.vocab})")


# ---------------------------------------------------------------------------------- requests
class _Strict(BaseModel):
    # NOTE: strict: "yes" is not a boolean and "5" is not a number; unknown fields are a 400
    # that names them, never silently ignored
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    """A last chunk with usage (and the speculative-decoding metrics), no choices."""
    continuous_usage_stats: bool = False
    """Usage so far on every chunk."""


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    """Text, or a list of text parts (other part types are a 400: the model reads text)."""
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)  # type: ignore[union-attr]


class _Common(_Strict):
    model: str
    """The served model's name (``GET /v1/models``)."""
    max_tokens: int | None = Field(default=None, ge=0)
    """Most tokens to generate (default: what the context leaves); 0 generates nothing
    (with ``echo`` and ``logprobs``: the prompt's log-likelihood only)."""
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    """Independent samples per prompt (each speculated losslessly); with a seed, sample i
    uses seed + i."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: (Annotated[str, Field(min_length=1)]
           | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOPS)]
           | None) = None
    """Strings that end generation (not returned); at most 4, none empty."""
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    """Token id (as a string) -> bias added to its logit."""
    min_tokens: int = Field(default=0, ge=0)
    """Stop tokens and stop strings are ignored before this many tokens (vLLM's field)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-turn token (vLLM's field)."""
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, value):
        for key in value or {}:
            if not key.isdigit():
                raise ValueError(f"keys must be token ids (non-negative integers), got {key!r}")
        return value

    def check_limits(self, served: ServedModel) -> None:
        """Token counts below the context, token ids below the vocabulary (ValueError
        ``"<field>: ..."``)."""
        for field in ("max_tokens", "max_completion_tokens", "min_tokens"):
            value = getattr(self, field)
            if value is not None and value >= served.context:
                low = 0 if field == "min_tokens" else 1
                raise ValueError(f"{field}: must be in [{low}, {served.context - 1}] (the "
                                 f"context is {served.context} tokens), got {value}")
        self._check_prompt_ids(served)
        served.check_ids("logit_bias", [int(k) for k in self.logit_bias or {}])

    def _check_prompt_ids(self, served: ServedModel) -> None:
        pass

    def _sampling(self) -> dict:
        """The shard-request fields every choice of this request shares."""
        max_tokens = (self.max_completion_tokens if self.max_completion_tokens is not None
                      else self.max_tokens)
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else (
            tuple(self.stop))
        return {"max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "ignore_eos": self.ignore_eos, "stop": stop,
                "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty,
                "logit_bias": {int(k): float(v) for k, v in (self.logit_bias or {}).items()},
                "min_tokens": self.min_tokens}

    def _choices(self, prompts: list[dict], common: dict) -> list[ShardRequest]:
        """``n`` choices per prompt, in choice order; with a seed, sample i uses seed + i."""
        return [ShardRequest(**common, **prompt,
                             seed=None if self.seed is None else (self.seed + i) % 2**63)
                for prompt in prompts for i in range(self.n)]


TokenId = Annotated[int, Field(ge=0)]


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: (Annotated[str, Field(min_length=1)]
             | Annotated[list[Annotated[str, Field(min_length=1)]],
                         Field(min_length=1, max_length=MAX_PROMPTS)]
             | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]],
                         Field(min_length=1, max_length=MAX_PROMPTS)])
    """Text, several texts, token ids, or several lists of token ids (one set of ``n``
    choices per prompt)."""
    echo: bool = False
    """Return the prompt before the completion (with its logprobs when ``logprobs`` is
    set)."""
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """Log-probability of each token and this many most likely alternatives."""

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def _check_prompt_ids(self, served: ServedModel) -> None:
        for p in self.prompts():
            if isinstance(p, list):
                served.check_ids("prompt", p)

    def shard_requests(self) -> list[ShardRequest]:
        """The shard request of every choice, in choice order."""
        common = {**self._sampling(), "logprobs": self.logprobs, "echo": self.echo}
        if self.max_tokens == 0:
            common["max_tokens"] = 0  # score the prompt only
        prompts = [{"prompt": p} if isinstance(p, str) else {"prompt_ids": tuple(p)}
                   for p in self.prompts()]
        return self._choices(prompts, common)


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    """Return the log-probability of each generated token."""
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """This many most likely alternatives per token; above 0 it turns ``logprobs`` on."""
    max_tokens: int | None = Field(default=None, ge=1)

    def wants_logprobs(self) -> bool:
        return self.logprobs or bool(self.top_logprobs)

    def shard_requests(self) -> list[ShardRequest]:
        """The shard request of every choice, in choice order."""
        logprobs = (self.top_logprobs or 0) if self.wants_logprobs() else None
        messages = tuple(Message("system" if m.role == "developer" else m.role, m.text())
                         for m in self.messages)
        return self._choices([{"messages": messages}], {**self._sampling(), "logprobs": logprobs})


# ---------------------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SpecDecodingMetrics(BaseModel):
    """One request's speculative decoding, in vLLM's per-request shape (summed over its
    choices)."""

    num_spec_tokens: int
    num_spec_steps: int
    num_draft_tokens: int
    num_accepted_draft_tokens: int
    acceptance_histogram: list[int]
    mean_acceptance_length: float
    """1 + accepted drafts per drafting step (vLLM's definition); 1.0 when nothing was
    drafted, never below."""
    draft_acceptance_rate: float


class Metrics(BaseModel):
    speculative_decoding: SpecDecodingMetrics


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class _Head(BaseModel):
    """What every response body and chunk starts with (``object`` names its kind)."""

    id: str
    created: int
    model: str


class ChatCompletionResponse(_Head):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    metrics: Metrics | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(_Head):
    """One ``data:`` event of a streamed chat completion (the stream ends with
    ``data: [DONE]``)."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    metrics: Metrics | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(_Head):
    """A text completion, and also each ``data:`` event of a streamed one (whose stream
    ends with ``data: [DONE]``)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None
    metrics: Metrics | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def streamed(model: type[BaseModel], body: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The 200 response of a route that answers ``body`` as JSON, or, when ``stream`` is
    true, server-sent events whose ``data`` is a JSON ``model`` chunk, then ``[DONE]``."""
    event = {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string",
        "description": f"A JSON-encoded {model.__name__}, or `[DONE]` as the last event",
        "anyOf": [{"const": "[DONE]"}, {
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": f"#/components/schemas/{model.__name__}"}}]}}}
    return {200: {"model": body, "content": {"text/event-stream": {"schema": event}}},
            **ERROR_RESPONSES}

