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

from collections.abc import Mapping

from dspark.router.tracing import extract, inject, make_tracer

__all__ = ["add_step_events", "extract", "inject", "make_tracer", "request_attributes",
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
    """The ``engine_step`` event of one request in one step (``workers.engine.StepTrace``
    row)."""
    attrs = {
        "dspark.step": record.step,
        "dspark.spec.phase": record.phase,
        "dspark.spec.drafted": record.drafted,
        "dspark.spec.gate": record.gate,
        "dspark.spec.proposed": record.proposed,
        "dspark.spec.verified": record.verified,
        "dspark.spec.accepted": record.accepted,
        "dspark.spec.committed": record.committed,
        "dspark.spec.budget_mode": record.budget_mode,
        "dspark.step.verified_tokens": record.step_tokens,
        "dspark.step.external_tokens": record.external_tokens,
    }
    if record.prefill_tokens:
        attrs["dspark.step.prefill_tokens"] = record.prefill_tokens
    if record.survival:
        attrs["dspark.spec.survival"] = [round(p, 4) for p in record.survival]
    return attrs


def add_step_events(spans: Mapping[str, object], rows) -> None:
    """One ``engine_step`` event on the span of each traced request in ``rows`` (the
    engine's ``on_request_step``)."""
    for row in rows:
        span = spans.get(row.req_id)
        if span is not None:
            span.add_event("engine_step", step_event_attributes(row))
