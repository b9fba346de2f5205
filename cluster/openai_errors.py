"""Errors in the OpenAI shape: ``APIError`` (an HTTP status and the ``error`` body), the
error models of ``/openapi.json``, and what the ingress answers when the handle or a replica
refuses a request."""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

from pydantic import BaseModel


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
        (401, "Missing or wrong API key (when the server asks for one)"),
        (404, "Unknown model or route"),
        (413, "Request body too large"),
        (429, "Too many requests waiting on the replica, or past the API key's limits; "
              "retry after Retry-After seconds"),
        (500, "Internal error"),
        (503, "Server overloaded; retry later"),
    ]
}

def overloaded(exc: BaseException) -> APIError:
    """503: the ingress's handle queue is full."""
    return APIError(503, f"server overloaded: {exc}", kind="server_error", code="overloaded",
                    headers={"Retry-After": "1"})


def replica_error(exc: BaseException, fields: Collection[str]) -> APIError | None:
    """The answer to what a replica raised before its first chunk: its ValueError (the
    engine's check) is a 400 whose ``param`` is the request field the message starts with
    (one of ``fields``), its ``OverloadedError`` a 429; None for anything else (a 500).

    NOTE: the ingress never imports the engine's side (torch): the overload error is known
    by its name, through Ray's wrapping (``cause``)."""
    cause = getattr(exc, "cause", None) or exc
    if isinstance(exc, ValueError) or isinstance(cause, ValueError):
        message = str(cause)
        first = re.match(r"\w+", message)
        param = first.group(0) if first and first.group(0) in fields else None
        return APIError(400, message, param=param)
    if "OverloadedError" in type(cause).__name__ or "OverloadedError" in str(exc):
        return APIError(429, "too many requests waiting; retry later", kind="rate_limit_error",
                        code="overloaded", headers={"Retry-After": "1"})
    return None


REPLICA_GONE = ("ActorDiedError", "ActorUnavailableError", "RayActorError",
                "ActorUnschedulableError")
"""Ray's names for a replica process that is gone (killed, crashed, its node lost, or
stopped by Serve with the rest of its gang)."""

NAMED_FAILURES = {
    "ExpertGroupFailed": (503, "expert_group_failed"),
    "EngineStepFailed": (500, "engine_error"),
    "EngineLoopDied": (503, "engine_stopped"),
}
"""The replica's own failures (``workers.async_engine``), known by name: status and code.
Their messages name only an exception type, so they are passed on as they are."""


def stream_error(exc: BaseException) -> APIError:
    """The error of a request that failed in its replica: the replica's named failures
    (``NAMED_FAILURES``), a replica that is gone (503, retry), else an internal error
    (500)."""
    cause = getattr(exc, "cause", None) or exc
    known = NAMED_FAILURES.get(type(cause).__name__)
    if known is not None:
        return APIError(known[0], str(cause), kind="server_error", code=known[1])
    if {type(exc).__name__, type(cause).__name__} & set(REPLICA_GONE):
        return APIError(503, "the replica serving this request stopped mid-stream "
                        f"({type(exc).__name__}: its process, its node or its expert-parallel "
                        "group failed); retry the request", kind="server_error",
                        code="replica_failed")
    return APIError(500, f"internal error: {type(exc).__name__}", kind="server_error")
