"""OpenAI response bodies and SSE chunks built from the replicas' ``ShardChunk``s.

Vocabulary:
- *choice*: one independent sample; a request has ``n`` choices per prompt, numbered
  ``prompt_index * n + sample_index``; ``Choice`` gathers one choice's chunks;
- *token entry*: the per-token logprob record a replica streams (``TokenEntry``), shaped
  here as chat logprobs (``content``) or completions logprobs (``tokens``,
  ``token_logprobs``, ``top_logprobs``, ``text_offset``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence

from dspark.cluster.payloads import ShardChunk, ShardRequest, TokenEntry


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_logprobs(entries: Sequence[TokenEntry]) -> dict:
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes),
                         "top_logprobs": [{"token": a.token, "logprob": a.logprob,
                                           "bytes": list(a.bytes)} for a in e.top]}
                        for e in entries]}


def completion_logprobs(entries: Sequence[TokenEntry], offset: int) -> dict:
    """Completions-shape logprobs; an entry without a logprob (the first echoed prompt
    token) has no alternatives either. ``offset``: text offset of the first entry."""
    tokens, values, tops, offsets = [], [], [], []
    for e in entries:
        tokens.append(e.token)
        values.append(e.logprob)
        tops.append(None if e.logprob is None else {a.token: a.logprob for a in e.top})
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


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

    def __init__(self, index: int, request: ShardRequest, first: ShardChunk) -> None:
        self.index, self.request = index, request
        self.first = self.last = first
        self.text = first.text
        self.entries: list[TokenEntry] = list(first.logprobs or ())

    def add(self, chunk: ShardChunk) -> None:
        self.last = chunk
        self.text += chunk.text
        self.entries += chunk.logprobs or ()

    def head_text(self) -> str:
        return (self.first.prompt_text or "") if self.request.echo else ""

    def shape_logprobs(self, chunk: ShardChunk, head: bool = False) -> dict | None:
        """The logprobs of one chunk (with the echoed prompt's on the first)."""
        if self.request.logprobs is None:
            return None
        entries = list(chunk.logprobs or ())
        if self.request.chat:
            return chat_logprobs(entries)
        prompt = list(chunk.prompt_logprobs or ()) if head else []
        offset = 0 if head else len(self.head_text()) + len(self.text) - len(chunk.text)
        return completion_logprobs(prompt + entries, offset)

    def shaped(self) -> dict:
        logprobs = None
        if self.request.logprobs is not None:
            if self.request.chat:
                logprobs = chat_logprobs(self.entries)
            else:
                prompt = list(self.first.prompt_logprobs or ())
                logprobs = completion_logprobs(prompt + self.entries, 0)
        return {"text": self.head_text() + self.text,
                "finish_reason": self.last.finish_reason or "stop", "logprobs": logprobs}


def total_usage(choices: list[Choice], n: int) -> dict:
    """Prompt tokens once per prompt (not per sample), completion tokens of every choice."""
    prompt = sum(c.first.prompt_tokens for c in choices[::n])
    return usage(prompt, sum(c.last.completion_tokens for c in choices))
