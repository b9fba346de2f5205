"""Python clients of a running dspark server (sync and async, streaming or not), over its
OpenAI-compatible HTTP API.

    from dspark.cluster.client import Client
    client = Client("http://127.0.0.1:8000")
    for piece in client.chat_stream("What is 7 * 8?", max_tokens=64):
        print(piece, end="", flush=True)
    reply = client.chat("What is 7 * 8?", max_tokens=64)
    reply.text, reply.usage, reply.spec   # spec: vLLM-shaped speculative-decoding metrics

``AsyncClient`` has the same methods as coroutines / async iterators. Errors come back as
``DsparkError`` with the HTTP status and the server's OpenAI-shaped message.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx


class DsparkError(RuntimeError):
    def __init__(self, status: int, body: dict | str) -> None:
        message = body.get("error", {}).get("message", body) if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.body = status, body


@dataclass
class Completion:
    text: str
    finish_reason: str
    usage: dict
    spec: dict | None
    """``metrics.speculative_decoding`` of the response (None without a drafter)."""


def _messages(prompt_or_messages) -> list[dict]:
    if isinstance(prompt_or_messages, str):
        return [{"role": "user", "content": prompt_or_messages}]
    return list(prompt_or_messages)


def _body(model, messages, stream, **params) -> dict:
    body = {"model": model, "messages": messages, "stream": stream, "temperature": 0.0}
    body.update({k: v for k, v in params.items() if v is not None})
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _completion(data: dict) -> Completion:
    choice = data["choices"][0]
    return Completion(choice["message"]["content"], choice["finish_reason"], data["usage"],
                      data.get("metrics", {}).get("speculative_decoding"))


def _events(lines) -> Iterator[dict]:
    for line in lines:
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        if payload == "[DONE]":
            return
        event = json.loads(payload)
        if "error" in event:
            raise DsparkError(500, event)
        yield event


def _error(resp: httpx.Response) -> DsparkError:
    try:
        return DsparkError(resp.status_code, resp.json())
    except ValueError:
        return DsparkError(resp.status_code, resp.text)


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", model: str = "dspark-demo",
                 timeout: float = 300.0) -> None:
        self.model = model
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)

    def chat(self, prompt_or_messages, **params) -> Completion:
        body = _body(self.model, _messages(prompt_or_messages), False, **params)
        resp = self.http.post("/v1/chat/completions", json=body)
        if resp.status_code != 200:
            raise _error(resp)
        return _completion(resp.json())

    def chat_stream(self, prompt_or_messages, **params) -> Iterator[str]:
        """Yield text as the server commits tokens."""
        body = _body(self.model, _messages(prompt_or_messages), True, **params)
        with self.http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                resp.read()
                raise _error(resp)
            for event in _events(resp.iter_lines()):
                for choice in event.get("choices", []):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        yield text

    def models(self) -> list[str]:
        return [m["id"] for m in self.http.get("/v1/models").json()["data"]]

    def close(self) -> None:
        self.http.close()


class AsyncClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", model: str = "dspark-demo",
                 timeout: float = 300.0) -> None:
        self.model = model
        self.http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout)

    async def chat(self, prompt_or_messages, **params) -> Completion:
        body = _body(self.model, _messages(prompt_or_messages), False, **params)
        resp = await self.http.post("/v1/chat/completions", json=body)
        if resp.status_code != 200:
            raise _error(resp)
        return _completion(resp.json())

    async def chat_stream(self, prompt_or_messages, **params) -> AsyncIterator[str]:
        body = _body(self.model, _messages(prompt_or_messages), True, **params)
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                raise _error(resp)
            async for line in resp.aiter_lines():
                for event in _events([line]):
                    for choice in event.get("choices", []):
                        text = choice.get("delta", {}).get("content")
                        if text:
                            yield text

    async def aclose(self) -> None:
        await self.http.aclose()
