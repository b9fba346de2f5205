"""OpenTelemetry traces of every request: ingress → router → replica, one trace.

- The ingress's span (``chat {model}`` / ``text_completion {model}``, kind SERVER) carries
  the OpenTelemetry GenAI attributes and the time to first token. A W3C ``traceparent``
  from the client is its parent.
- Its context travels inside the ``ShardRequest`` (``trace_context``, a W3C carrier) through
  the deployment handle: the load-board router opens ``dspark.route`` under it (candidates,
  scores, the choice, the board's age, a fallback's reason) and the replica opens
  ``dspark.replica``, the request's life on the engine, with one ``engine_step`` event per
  step it took part in (``dspark.spec.*`` attributes: there is no GenAI convention for
  speculation yet).
- Export: OTLP over HTTP/protobuf to ``otlp_traces_endpoint``, batched on a background
  thread; ``trace_sample_ratio`` of new traces are kept (a client's sampled parent is
  followed). Off by default: without an endpoint no tracer exists and no span is made.
"""

from __future__ import annotations

import time

from dspark.router.otlp_wire import PackedEvent, encode_fields, int_pair, pair
from dspark.router.tracing import extract, inject, make_tracer

__all__ = ["StepEvent", "StepEvents", "extract", "inject", "make_tracer", "request_attributes",
           "step_event_attributes"]

PROVIDER_NAME = "dspark"


def request_attributes(body, operation: str, model: str, host: str, port: int) -> dict:
    """The GenAI request attributes of an OpenAI request body."""
    attrs = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": PROVIDER_NAME,
        "gen_ai.request.model": model,
        "gen_ai.request.temperature": float(body.temperature),
        "gen_ai.request.top_p": float(body.top_p),
        "gen_ai.request.stream": bool(body.stream),
        "server.address": host,
        "server.port": port,
    }
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if max_tokens is not None:
        attrs["gen_ai.request.max_tokens"] = int(max_tokens)
    if body.seed is not None:
        attrs["gen_ai.request.seed"] = int(body.seed)
    if getattr(body, "n", 1) != 1:
        attrs["gen_ai.request.choice.count"] = int(body.n)
    return attrs


def step_event_attributes(record) -> dict:
    """The ``engine_step`` event of one request in one step (a ``workers.stats.RequestStep``).

    Every event has the step, the gate's reason (``prefill`` marks a prompt chunk), the
    tokens committed, the budget mode, the step's target rows and the group's external
    tokens. A drafted one (``cost``, ``probe``, ``always``) adds what the budget chose and
    what came of it: γ, ℓ_r, the accepted drafts, the survival of each verified position
    (a space-separated string: one attribute, where an array costs the exporter a value
    per element). A gated-off step carries no zeros for what did not
    happen.
    """
    attrs = dict(_outcome(record))
    attrs["dspark.step"] = record.step
    attrs["dspark.step.verified_tokens"] = record.step_tokens
    attrs["dspark.step.external_tokens"] = record.external_tokens
    if record.drafted and record.survival:
        attrs["dspark.spec.survival"] = _survival(record.survival)
    return attrs


def _outcome(record) -> list[tuple[str, object]]:
    """The attributes a step's outcome decides (they repeat from step to step; the step's
    number and sizes follow them)."""
    out = [("dspark.spec.gate", record.gate), ("dspark.spec.committed", record.committed),
           ("dspark.spec.budget_mode", record.budget_mode)]
    if record.drafted:
        out += [("dspark.spec.proposed", record.proposed),
                ("dspark.spec.verified", record.verified),
                ("dspark.spec.accepted", record.accepted)]
    elif record.prefill_tokens:
        out.append(("dspark.step.prefill_tokens", record.prefill_tokens))
    return out


def _survival(survival) -> str:
    survival = tuple(survival)
    return ("%.3f " * len(survival) % survival)[:-1]


class StepEvent(PackedEvent):
    """One request's ``engine_step`` event: its attributes are built from the engine's row
    only when they are read, and the exporter writes its OTLP bytes straight from the row
    (``encode``: the outcome's attributes as one cached run of bytes, then the step's
    numbers), the same message as the SDK's encoding of ``attributes``."""

    def __init__(self, timestamp: int, row) -> None:
        super().__init__("engine_step", timestamp)
        self._row = row

    @property
    def attributes(self) -> dict:
        return step_event_attributes(self._row)

    def encode(self) -> bytes:
        r = self._row
        slot = (r.gate, r.committed, r.budget_mode, r.drafted, r.proposed, r.verified,
                r.accepted, r.prefill_tokens)
        head = _HEADS.get(slot)
        if head is None:
            head = b"".join(pair(k, v) for k, v in _outcome(r))
            if len(_HEADS) < 4096:
                _HEADS[slot] = head
        parts = [head, int_pair("dspark.step", r.step),
                 int_pair("dspark.step.verified_tokens", r.step_tokens),
                 int_pair("dspark.step.external_tokens", r.external_tokens)]
        if r.drafted and r.survival:
            parts.append(pair("dspark.spec.survival", _survival(r.survival)))
        return encode_fields(self.timestamp, self.name, b"".join(parts))


_HEADS: dict[tuple, bytes] = {}
"""The framed outcome attributes of a step event, by outcome."""


class StepEvents:
    """The ``engine_step`` events of traced requests.

    The engine thread only keeps each traced request's rows with the step's time
    (``on_request_step``); the events are written to the span when the request ends
    (``close``, on the replica's event loop). The span is exported only once it ends, so
    the trace is the same, and the engine's step, the path every token waits on, pays
    a list append per traced request instead of the SDK's event.
    """

    def __init__(self) -> None:
        self._rows: dict[str, list] = {}

    def open(self, req_id: str, span) -> None:
        """Keep ``req_id``'s steps (a span that is not sampled keeps nothing)."""
        if span.is_recording():
            self._rows[req_id] = []

    def on_request_step(self, rows) -> None:
        """The engine's ``on_request_step`` (engine thread)."""
        now = time.time_ns()
        for row in rows:
            kept = self._rows.get(row.req_id)
            if kept is not None:
                kept.append((now, row))

    def close(self, req_id: str, span) -> None:
        """Write ``req_id``'s step events to ``span`` (before it ends)."""
        rows = self._rows.pop(req_id, ())
        add = getattr(span, "_add_event", None)
        if add is None:  # NOTE: not the SDK's span: plain events
            for stamp, row in rows:
                span.add_event("engine_step", step_event_attributes(row), timestamp=stamp)
            return
        for stamp, row in rows:
            add(StepEvent(stamp, row))
