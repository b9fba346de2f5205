"""API keys: which requests the ingress serves (``ServeConfig.api_keys``).

A request carries its key as ``Authorization: Bearer <key>`` (what the ``openai`` client
sends) or as ``x-api-key: <key>``. Without keys configured, nothing is asked. With keys,
every route but ``/health`` (probes) and ``/openapi.json`` (the public schema) asks, and a
missing or wrong key gets OpenAI's 401 (``invalid_api_key``). Keys are compared in
constant time, against every configured key, so neither a key's length nor its place in
the list shows in the time an answer takes.

A configured entry ``env:NAME`` stands for the comma-separated keys in the environment
variable NAME of the ingress's process (how a Kubernetes Secret reaches it without the
serve config, which Serve shows, ever holding a key).

Per-key limits (``api_key_rate_limit``, ``api_key_max_streams``), counted by each ingress
replica: a key may start at most ``rate`` completion requests in any 60 s, and have at most
``streams`` in flight; past either, OpenAI's 429 (``rate_limit_exceeded``) with the seconds
until a request would be admitted in Retry-After. A refused request costs nothing of the
key's allowance. ``admit`` returns a ``Lease`` the ingress releases when the response ends
(a streamed one: after its last event).
"""

from __future__ import annotations

import hmac
import math
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping

from dspark.cluster.openai_errors import APIError


def resolve_keys(entries: Iterable[str]) -> tuple[bytes, ...]:
    """The keys ``entries`` stand for (``env:NAME`` read now), as bytes."""
    keys: list[bytes] = []
    for entry in entries:
        if entry.startswith("env:"):
            value = os.environ.get(entry[4:])
            if not value:
                raise ValueError(f"api_keys names the environment variable {entry[4:]}, "
                                 "which is not set")
            keys += [k.strip().encode() for k in value.split(",") if k.strip()]
        else:
            keys.append(entry.encode())
    return tuple(keys)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries (Bearer token, else ``x-api-key``), None without one."""
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key") or None


class ApiKeys:
    """The ingress's check of a request's key and its limits (module docstring)."""

    def __init__(self, entries: Iterable[str], rate: int = 0, streams: int = 0) -> None:
        self.keys = resolve_keys(entries)
        self.rate, self.streams = rate, streams
        self._started: dict[int, deque[float]] = {}
        self._in_flight: dict[int, int] = {}
        self._lock = threading.Lock()

    def check(self, headers: Mapping[str, str]) -> int | None:
        """The index of the request's key (None when no key is asked); raise the 401 for
        a missing or wrong one."""
        if not self.keys:
            return None
        given = presented_key(headers)
        if given is None:
            raise _unauthorized("You didn't provide an API key. Send it as 'Authorization: "
                                "Bearer <key>' or as an 'x-api-key' header.")
        given_bytes = given.encode()
        found = -1
        for index, key in enumerate(self.keys):  # NOTE: every key compared, no early exit
            if hmac.compare_digest(given_bytes, key):
                found = index
        if found < 0:
            raise _unauthorized("Incorrect API key provided.")
        return found

    def admit(self, headers: Mapping[str, str]) -> Lease:
        """Check the key, then its limits; the request's lease on its key's allowance."""
        key = self.check(headers)
        if key is None or not (self.rate or self.streams):
            return Lease(self, None)
        now = time.monotonic()
        with self._lock:
            started = self._started.setdefault(key, deque())
            while started and now - started[0] >= WINDOW_S:
                started.popleft()
            if self.rate and len(started) >= self.rate:
                wait = WINDOW_S - (now - started[0])
                raise _limited(f"Rate limit reached: {self.rate} requests per minute for "
                               "this API key.", wait)
            if self.streams and self._in_flight.get(key, 0) >= self.streams:
                raise _limited(f"Too many requests in flight: at most {self.streams} at once "
                               "for this API key.", 1.0)
            started.append(now)
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        return Lease(self, key)

    def _release(self, key: int) -> None:
        with self._lock:
            self._in_flight[key] -= 1


WINDOW_S = 60.0


class Lease:
    """One admitted request's hold on its key's in-flight allowance, until ``release``
    (idempotent; also on garbage collection, for a streamed response never started)."""

    def __init__(self, keys: ApiKeys, key: int | None) -> None:
        self._keys, self._key = keys, key

    def release(self) -> None:
        key, self._key = self._key, None
        if key is not None:
            self._keys._release(key)

    async def held(self, events: AsyncIterator):
        """A streamed response's events; the lease ends after the last one."""
        try:
            async for event in events:
                yield event
        finally:
            self.release()

    def __del__(self) -> None:
        self.release()


def _limited(message: str, wait_s: float) -> APIError:
    return APIError(429, message, kind="requests", code="rate_limit_exceeded",
                    headers={"Retry-After": str(max(1, math.ceil(wait_s)))})


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})
