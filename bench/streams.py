"""Streamed chat requests as the load benchmarks send them, each one classified, and the
wait on a condition with a deadline they share (bench/faults.py, bench/multinode.py)."""

from __future__ import annotations

import json
import time
from contextlib import suppress
from dataclasses import dataclass

PROMPTS = ["What is 17 times 3?", "Name three colours.", "Write a haiku about rain.",
           "What is 144 divided by 12?", "Say hello in French.", "Explain a variable."]
MODEL = "dspark-demo"


def wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.5):
    """``condition()``'s first true value, polled every ``poll_s`` (TimeoutError naming
    ``what`` after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout_s:g} s")
        time.sleep(poll_s)


@dataclass
class Reply:
    """One request's end, before the text check (``kind``: a ``KINDS`` entry)."""
    kind: str
    text: str = ""
    code: str | None = None
    """The error code it got (``429 overloaded``, ``chunk shutting_down``) or how it was cut."""
    retry_after: str | None = None


def stream_chat(url: str, prompt: str, max_tokens: int, timeout_s: float,
                drop_after: int | None = None, extra: dict | None = None) -> Reply:
    """One streamed greedy chat request and how it ended: ``ok`` (a finish reason and
    ``[DONE]``), ``error`` (clear: an OpenAI error body, or an error chunk then
    ``[DONE]``), ``lost`` (no response, or a stream cut with neither), ``hung`` (no end
    within ``timeout_s``), ``dropped`` (closed here after ``drop_after`` content chunks).
    ``extra``: more body fields (the model too)."""
    import httpx

    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, **(extra or {})}
    text, finished, error, chunks, deadline = [], False, None, 0, time.monotonic() + timeout_s
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                          timeout=timeout_s) as resp:
            if resp.status_code != 200:
                resp.read()
                error = json_body(resp).get("error")
                if isinstance(error, dict):  # NOTE: clear: OpenAI's error shape
                    return Reply("error", "", f"{resp.status_code} {error.get('code')}",
                                 resp.headers.get("retry-after"))
                return Reply("lost", "", f"{resp.status_code} {resp.text[:80]!r}")
            for line in resp.iter_lines():
                if time.monotonic() > deadline:
                    return Reply("hung", "".join(text), "deadline")
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    kind = "error" if error else "ok" if finished else "lost"
                    return Reply(kind, "".join(text), error or (
                        None if finished else "[DONE] without a finish reason"))
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = f"chunk {chunk['error'].get('code')}"
                    continue
                for choice in chunk.get("choices", []):
                    text.append(choice["delta"].get("content") or "")
                    finished = finished or choice.get("finish_reason") is not None
                chunks += 1
                if drop_after is not None and chunks >= drop_after and not finished:
                    return Reply("dropped", "".join(text))  # NOTE: leaving `with` closes it
    except httpx.TimeoutException:
        return Reply("hung", "".join(text), "timeout")
    except (httpx.HTTPError, ValueError) as exc:  # NOTE: ValueError: a chunk not JSON
        return Reply("lost", "".join(text), f"cut: {type(exc).__name__}")
    return Reply("lost", "".join(text), "cut: no [DONE]")


def json_body(resp) -> dict:
    """The response's JSON object ({} for anything else)."""
    with suppress(ValueError):
        body = resp.json()
        return body if isinstance(body, dict) else {}
    return {}
