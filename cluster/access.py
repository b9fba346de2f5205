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
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Mapping

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
    """The ingress's check of a request's key (module docstring)."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.keys = resolve_keys(entries)

    def check(self, headers: Mapping[str, str]) -> None:
        """Return if the request may be served; raise the 401 otherwise."""
        if not self.keys:
            return
        given = presented_key(headers)
        if given is None:
            raise _unauthorized("You didn't provide an API key. Send it as 'Authorization: "
                                "Bearer <key>' or as an 'x-api-key' header.")
        given_bytes = given.encode()
        match = False
        for key in self.keys:  # NOTE: every key compared, no early exit
            match |= hmac.compare_digest(given_bytes, key)
        if not match:
            raise _unauthorized("Incorrect API key provided.")


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})
