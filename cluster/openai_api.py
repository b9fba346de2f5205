"""The OpenAI wire format: request and response models (the schemas of ``/openapi.json``),
the error shape, the request-body guard, and the response and SSE chunk builders. No
serving logic lives here.

Vocabulary:
- *choice*: one independent sample; a request has ``n`` choices per prompt, numbered
  ``prompt_index * n + sample_index``;
- *shard request*: the plain dict one choice becomes for ``TargetShard.generate`` (see
  ``shard_requests``);
- *token entry*: the per-token logprob record a shard yields (``token``, ``logprob``,
  ``bytes``, ``top``), turned here into the chat or the completions logprobs shape.

Every response and chunk carries ``id``, ``object``, ``created``, ``model`` and
``choices[].index``; the final non-streaming body and the usage chunk carry the request's
speculative-decoding metrics at the root, in vLLM's shape (``metrics.speculative_decoding``).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_LOGPROBS = 20
MAX_N = 16
MAX_PROMPTS = 64
MAX_STOPS = 4


class APIError(Exception):
    """An error with an HTTP status, in the OpenAI error shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


FORMS = {
    "prompt": (f"a non-empty string, a list of 1-{MAX_PROMPTS} non-empty strings, a non-empty "
               f"list of token ids (>= 0) or a list of 1-{MAX_PROMPTS} such lists"),
    "stop": f"a non-empty string or a list of at most {MAX_STOPS} non-empty strings",
    "content": "a string or a list of text parts ({'type': 'text', 'text': ...})",
    "tool_choice": "not supported",
}
_TYPE_NAMES = ("str", "int", "float", "bool", "dict", "list", "none")


def validation_error(errors: list[dict]) -> APIError:
    """The first pydantic (or FastAPI) validation error as a 400 naming the field."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # NOTE: union members appear in the location ("prompt.list[int].0"): name the field and
    # the forms it takes instead
    union = [i for i, p in enumerate(loc) if "[" in p or "-" in p or p in _TYPE_NAMES
             or p == "TextPart"]
    field = loc[: union[0]] if union else loc
    param = ".".join(field) or None
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    named = re.match(r"^(\w+): ", message)
    if param is None and named:  # a check across fields names the field it is about
        param, message = named.group(1), message[named.end():]
    if first.get("type") == "extra_forbidden":
        message = "this field is not supported by this server"
    elif union and field and field[-1] in FORMS and first.get("type") != "value_error":
        message = f"must be {FORMS[field[-1]]}"
    return APIError(400, f"{param}: {message}" if param else message, param=param)


# ---------------------------------------------------------------------------------- errors
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error answer: 400, 404, 405, 413, 429, 500, 503."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in [
        (400, "Invalid request (the message names the field and its allowed range)"),
        (404, "Unknown model or route"),
        (413, "Request body too large"),
        (429, "Too many requests waiting on the replica; retry later"),
        (500, "Internal error"),
        (503, "Server overloaded; retry later"),
    ]
}


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


# Fields of OpenAI's API this server does not implement: a 400 naming the field, unless the
# value asks for nothing (what some clients send by default).
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
               "response_format", "audio", "modalities", "prediction", "web_search_options",
               "reasoning_effort", "suffix", "best_of", "service_tier")
_NOTHING = (None, [], "", "none", "auto", {"type": "text"}, "default")


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

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def bias(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}


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


def shard_requests(body: _Common, chat: bool) -> list[dict]:
    """The shard request of every choice, in choice order."""
    common = {
        "chat": chat,
        "max_tokens": body.requested_max_tokens(),
        "temperature": body.temperature,
        "top_p": body.top_p,
        "ignore_eos": body.ignore_eos,
        "stop": body.stop_list(),
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "logit_bias": body.bias(),
        "min_tokens": body.min_tokens,
    }
    if chat:
        assert isinstance(body, ChatCompletionRequest)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        prompts: list[dict] = [{"messages": messages, "prompt": None}]
        common["logprobs"] = (body.top_logprobs or 0) if body.wants_logprobs() else None
        common["echo"] = False
    else:
        assert isinstance(body, CompletionRequest)
        prompts = [{"messages": None, "prompt": p if isinstance(p, str) else None,
                    "prompt_ids": p if isinstance(p, list) else None} for p in body.prompts()]
        common["logprobs"] = body.logprobs
        common["echo"] = body.echo
        if body.max_tokens == 0:
            common["max_tokens"] = 0
    out = []
    for prompt in prompts:
        for i in range(body.n):
            seed = None if body.seed is None else (body.seed + i) % 2**63
            out.append({**common, **prompt, "seed": seed})
    return out


def parse_json(body: bytes, max_depth: int) -> Any:
    """Decode a request body: valid UTF-8, valid JSON, nested at most ``max_depth`` deep,
    no lone surrogates (``"\\ud800"``) in any string, integral numbers as ints (``3.0`` is
    the JSON Schema integer 3). Raises a 400 ``APIError``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8: {exc}") from exc
    try:
        data = json.loads(text)
    except RecursionError as exc:  # NOTE: the C parser stops at Python's recursion limit
        raise APIError(400, f"request body nests JSON too deep; at most {max_depth}") from exc
    except json.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from exc
    return _checked(data, "", 1, max_depth)


def _checked(value: Any, path: str, depth: int, max_depth: int) -> Any:
    """``value`` with integral floats as ints, walked once: a lone surrogate in a key or
    string, or nesting beyond ``max_depth``, is a 400 (naming the field for a surrogate)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{path or 'body'}: invalid Unicode (a lone surrogate)",
                           param=path or None) from None
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 2**63 else value
    if isinstance(value, dict | list) and depth > max_depth:
        raise APIError(400, f"request body nests JSON too deep; at most {max_depth}")
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            _checked(key, sub, depth, max_depth)
            out[key] = _checked(item, sub, depth + 1, max_depth)
        return out
    if isinstance(value, list):
        return [_checked(item, f"{path}[{i}]", depth + 1, max_depth)
                for i, item in enumerate(value)]
    return value


def _text_only(messages: Any) -> None:
    """A content part that is not text (an image, audio, a file) is a 400 that says so."""
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise APIError(400, f"messages.{i}.content: content parts of type {kind!r} are "
                               "not supported: this model takes text only (type 'text')",
                               param=f"messages.{i}.content")


def parse(model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    data = dict(data)
    _text_only(data.get("messages"))
    for name in UNSUPPORTED:
        if name not in data:
            continue
        value = data.pop(name)
        if value in _NOTHING or (name == "best_of" and value == data.get("n", 1)) or (
                name == "parallel_tool_calls" and isinstance(value, bool)):
            continue
        raise APIError(400, f"{name}: not supported by this server", param=name,
                       code="unsupported_parameter")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc


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


# ---------------------------------------------------------------------------------- builders
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_logprobs(entries: list[dict]) -> dict:
    return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"],
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": b}
                                          for t, b, lp in e["top"]]} for e in entries]}


def completion_logprobs(entries: list[dict | None], offset: int, with_top: bool) -> dict:
    """Completions-shape logprobs; ``None`` entries (the first echoed prompt token) have no
    log-probability. ``offset``: text offset of the first entry."""
    tokens, values, tops, offsets = [], [], [], []
    for e in entries:
        tokens.append(e["token"])
        values.append(e["logprob"])
        tops.append(None if e["logprob"] is None else {t: lp for t, _, lp in e["top"]})
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": tokens, "token_logprobs": values,
            "top_logprobs": tops if with_top else None, "text_offset": offsets}


class ResponseBuilder:
    """Builds the bodies and chunks of one request (chat or text completion)."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, index: int, text: str, finish_reason: str | None, first: bool = False,
              logprobs: dict | None = None, usage: dict | None = None) -> dict:
        if self.chat:
            delta: dict = {"content": text} if text else {}
            if first:
                delta = {"role": "assistant", "content": text}
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason,
                      "logprobs": logprobs}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": index, "text": text, "finish_reason": finish_reason,
                      "logprobs": logprobs}
            out = {**self._head("text_completion"), "choices": [choice]}
        if usage is not None:
            out["usage"] = usage
        return out

    def usage_chunk(self, usage: dict, spec: dict | None) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        out = {**self._head(obj), "choices": [], "usage": usage}
        if spec is not None:
            out["metrics"] = {"speculative_decoding": spec}
        return out

    def full(self, choices: list[dict], usage: dict, spec: dict | None) -> dict:
        """``choices``: per choice ``text``, ``finish_reason`` and ``logprobs`` (shaped)."""
        if self.chat:
            out = {**self._head("chat.completion"), "choices": [
                {"index": i, "message": {"role": "assistant", "content": c["text"]},
                 "finish_reason": c["finish_reason"], "logprobs": c["logprobs"]}
                for i, c in enumerate(choices)], "usage": usage}
        else:
            out = {**self._head("text_completion"), "choices": [
                {"index": i, "text": c["text"], "finish_reason": c["finish_reason"],
                 "logprobs": c["logprobs"]} for i, c in enumerate(choices)], "usage": usage}
        if spec is not None:
            out["metrics"] = {"speculative_decoding": spec}
        return out


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def merge_spec(specs: list[dict | None]) -> dict | None:
    """The speculative-decoding metrics of several choices as one request's."""
    specs = [s for s in specs if s]
    if not specs:
        return None
    if len(specs) == 1:
        return specs[0]
    width = max(len(s["acceptance_histogram"]) for s in specs)
    hist = [sum(s["acceptance_histogram"][k] for s in specs
                if k < len(s["acceptance_histogram"])) for k in range(width)]
    steps = sum(s["num_spec_steps"] for s in specs)
    drafted = sum(s["num_draft_tokens"] for s in specs)
    accepted = sum(s["num_accepted_draft_tokens"] for s in specs)
    return {"num_spec_tokens": max(s["num_spec_tokens"] for s in specs),
            "num_spec_steps": steps, "num_draft_tokens": drafted,
            "num_accepted_draft_tokens": accepted, "acceptance_histogram": hist,
            "mean_acceptance_length": 1.0 + accepted / steps if steps else 1.0,
            "draft_acceptance_rate": accepted / drafted if drafted else 0.0}


class Choice:
    """One choice's chunks as they arrive: text, finish reason, logprobs, counts."""

    def __init__(self, index: int, chat: bool, request: dict, first: dict) -> None:
        self.index, self.chat, self.request = index, chat, request
        self.first = self.last = first
        self.text = first["text"]
        self.entries: list = list(first.get("logprobs") or [])

    def add(self, chunk: dict) -> None:
        self.last = chunk
        self.text += chunk["text"]
        self.entries += chunk.get("logprobs") or []

    def head_text(self) -> str:
        return self.first.get("prompt_text", "") if self.request.get("echo") else ""

    def shape_logprobs(self, chunk: dict, head: bool = False) -> dict | None:
        """The logprobs of one chunk (with the echoed prompt's on the first)."""
        if self.request.get("logprobs") is None:
            return None
        entries = chunk.get("logprobs") or []
        if self.chat:
            return chat_logprobs(entries)
        prompt = (chunk.get("prompt_logprobs") or []) if head else []
        offset = 0 if head else len(self.head_text()) + len(self.text) - len(chunk["text"])
        return completion_logprobs(prompt + entries, offset, True)

    def shaped(self) -> dict:
        logprobs = None
        if self.request.get("logprobs") is not None:
            if self.chat:
                logprobs = chat_logprobs(self.entries)
            else:
                prompt = self.first.get("prompt_logprobs") or []
                logprobs = completion_logprobs(prompt + self.entries, 0, True)
        return {"text": self.head_text() + self.text,
                "finish_reason": self.last["finish_reason"] or "stop", "logprobs": logprobs}


def total_usage(choices: list[Choice], n: int) -> dict:
    """Prompt tokens once per prompt (not per sample), completion tokens of every choice."""
    prompt = sum(c.first["prompt_tokens"] for c in choices[::n])
    return usage(prompt, sum(c.last["completion_tokens"] for c in choices))
