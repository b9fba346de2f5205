"""``OpenAIIngress``: the OpenAI-compatible HTTP front (FastAPI on Ray Serve). It validates
each request once (``parse`` below: body guard, unsupported fields, the pydantic schema of
``dspark.cluster.openai_schema``, the model name, the served model's limits), sends one ``ShardRequest`` per
choice to the ``TargetShard`` deployment's handle and streams their ``ShardChunk``s back as
a JSON body or server-sent events.

Vocabulary:
- *overload*: an engine queue beyond ``max_waiting_per_replica`` answers 429; a full
  ingress handle queue (``max_queued_requests``) answers 503; both carry Retry-After.

NOTE: a client that disconnects cancels the ingress task; Ray Serve propagates the
cancellation to the shard's generator, which aborts the engine request and frees its KV
blocks.
"""

# NOTE: no `from __future__ import annotations` here: FastAPI must see the real `Request`
# class on the route signatures of the (cloudpickled) ingress class.
import asyncio
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from dspark.cluster.config import ServeConfig
from dspark.cluster.openai_errors import (
    ERROR_RESPONSES,
    APIError,
    overloaded,
    replica_error,
    stream_error,
)
from dspark.cluster.openai_parse import check_model, parse, parse_json, validation_error
from dspark.cluster.openai_responses import (
    Choice,
    ResponseBuilder,
    merge_spec,
    sse,
    total_usage,
)
from dspark.cluster.openai_schema import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    ServedModel,
    streamed,
)
from dspark.cluster.openapi import openapi_document
from dspark.cluster.payloads import ShardChunk, ShardRequest

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------ the HTTP front

REQUEST_FIELDS = frozenset(CompletionRequest.model_fields) | frozenset(
    ChatCompletionRequest.model_fields)
"""What a replica's error message may name as its ``param``."""

# NOTE: /openapi.json is the ingress's own route (it documents the served model's limits)
api = FastAPI(title="dspark", version="0.1.0", openapi_url=None, docs_url=None, redoc_url=None,
              description="OpenAI-compatible API over DSpark speculative decoding")


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(APIError)
async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    return _error(exc)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """404, 405 and any other HTTP error of the framework, in the OpenAI shape."""
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return _error(APIError(exc.status_code, message, kind=kind,
                           code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code),
                           headers=dict(exc.headers or {})))


@api.exception_handler(RequestValidationError)
async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(validation_error(list(exc.errors())))


@api.exception_handler(Exception)
async def _internal(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error")
    return _error(APIError(500, f"internal error: {type(exc).__name__}", kind="server_error"))


@dataclass(frozen=True)
class Clock:
    """When and where a request arrived (for its metrics), and its span when traced."""

    route: str
    started: float
    span: Any = None


# NOTE: module helpers the ingress class calls are defined before it: ``serve.ingress``
# copies the class (cloudpickle) when it is decorated, with the globals that exist then.
class ShuttingDown(Exception):
    """The drain's deadline passed during a stream (``cluster.drain``)."""


async def _drain(choice: Choice, stream) -> None:
    async for chunk in stream:
        choice.add(chunk)


def _cancel(streams) -> None:
    for s in streams:
        s.cancel()


async def merged(streams):
    """``(index, chunk)`` of every stream, as chunks arrive; a stream's exception is raised
    here. Leaving the iteration stops reading every stream."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await queue.put((index, exc))
        await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            index, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


@serve.deployment
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, shard, config: dict) -> None:
        self.shard = shard
        self.cfg = ServeConfig.from_dict(config)
        self.started = time.time()
        target = json.loads((Path(self.cfg.target) / "config.json").read_text())
        self.served = ServedModel(self.cfg.model_name, int(target["max_position_embeddings"]),
                                  int(target["vocab_size"]))
        self._openapi: dict | None = None
        self._ready = False
        from dspark.cluster.metrics import IngressMetrics

        self.metrics = IngressMetrics(self.served.name, enabled=self.cfg.metrics)
        from dspark.cluster.tracing import make_tracer

        self.tracer = make_tracer(self.cfg.otlp_traces_endpoint, self.cfg.trace_sample_ratio,
                                  "ingress")
        from dspark.cluster.access import ApiKeys

        self.keys = ApiKeys(self.cfg.api_keys, self.cfg.api_key_rate_limit,
                            self.cfg.api_key_max_streams)
        from dspark.cluster.drain import IngressDrain

        replica = serve.get_replica_context().replica_id
        self.drain = IngressDrain(replica.deployment_id.app_name, replica.unique_id)

    async def _shard_ready(self, timeout_s: float | None) -> bool:
        """Whether a shard replica answers (its model loaded); remembered once true."""
        if not self._ready:
            try:
                await asyncio.wait_for(self.shard.load.remote(), timeout_s)
            except TimeoutError:
                return False
            self._ready = True
        return True

    @api.get("/health")
    async def health(self):
        """200 once a replica serves (``degraded`` while the load board's Redis does not
        answer: requests are served, routed by queue length); 503 while the model is
        still loading."""
        if not await self._shard_ready(2.0):
            return JSONResponse({"status": "loading"}, status_code=503)
        from dspark.router.load_router import board_state

        board = board_state()
        if board is None:
            return {"status": "ok"}
        if board["reachable"]:
            return {"status": "ok", "board": board}
        return {"status": "degraded", "board": board,
                "reason": "the load board's Redis does not answer: routing by queue length, "
                          "budgets on local load"}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self) -> dict:
        if self._openapi is None:
            self._openapi = openapi_document(api, self.served)
        return self._openapi

    def _card(self) -> dict:
        return {"id": self.served.name, "object": "model", "created": int(self.started),
                "owned_by": "dspark"}

    @api.get("/v1/models", response_model=ModelList)
    async def models(self, request: Request) -> dict:
        # NOTE: clients poll this route to know when to start: it answers once the model
        # is loaded, not as soon as the ingress is
        self.keys.check(request.headers)
        await self._shard_ready(None)
        return {"object": "list", "data": [self._card()]}

    @api.get("/v1/models/{model_id:path}", response_model=ModelCard,
             responses={404: ERROR_RESPONSES[404]})
    async def model(self, model_id: str, request: Request) -> dict:
        self.keys.check(request.headers)
        check_model(model_id, self.served, "model_id")
        return self._card()

    @api.post("/v1/completions", responses=streamed(CompletionResponse, CompletionResponse))
    async def completions(self, request: Request):
        return await self._measured("/v1/completions", request, CompletionRequest, False)

    @api.post("/v1/chat/completions",
              responses=streamed(ChatCompletionChunk, ChatCompletionResponse))
    async def chat_completions(self, request: Request):
        return await self._measured("/v1/chat/completions", request, ChatCompletionRequest,
                                    True)

    @api.get("/v1/load")
    async def load(self, request: Request) -> dict:
        """Load of one replica (the one the handle picks), with its confidence head's
        calibration; for operators and tests."""
        self.keys.check(request.headers)
        return await self.shard.status.remote()

    async def _json(self, request: Request):
        """The request's JSON, read within the size limit (413 before reading a body that
        says it is too large) and the depth limit."""
        limit = self.cfg.max_request_bytes
        declared = request.headers.get("content-length")
        too_large = APIError(413, f"request body is larger than {limit} bytes",
                             code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_large
        return parse_json(bytes(body), self.cfg.max_json_depth)

    async def _measured(self, route: str, request: Request, model, chat: bool):
        """Parse and serve one completion request, counted by status (a stream is counted
        when it ends, in ``_sse``)."""
        started = time.perf_counter()
        clock = Clock(route, started, self._span(request, chat))
        lease = None
        try:
            lease = self.keys.admit(request.headers)
            if self.drain.refusing:
                from dspark.cluster.drain import shutting_down

                raise shutting_down()
            body = parse(model, await self._json(request), self.served)
            if clock.span is not None:
                self._describe(clock.span, body, chat)
            response = await self._serve(body, chat, clock)
            if isinstance(response, StreamingResponse):  # NOTE: held until its last event
                response.body_iterator, lease = lease.held(response.body_iterator), None
            return response
        except APIError as exc:
            self._failed(clock, exc.status, exc)
            raise
        except asyncio.CancelledError:
            self._failed(clock, 499, None)
            raise
        except Exception as exc:  # NOTE: a replica that died mid-request is named (503)
            error = stream_error(exc)
            self._failed(clock, error.status, exc)
            if error.status == 500:
                raise
            raise error from exc
        finally:
            if lease is not None:
                lease.release()

    def _span(self, request: Request, chat: bool):
        """The request's span (None when tracing is off), opened before the body is read so
        that a refused request is traced too; a client's traceparent is its parent."""
        if self.tracer is None:
            return None
        from opentelemetry.trace import SpanKind

        from dspark.cluster.tracing import PROVIDER_NAME, extract

        operation = "chat" if chat else "text_completion"
        return self.tracer.start_span(
            operation, context=extract(request.headers), kind=SpanKind.SERVER,
            attributes={"gen_ai.operation.name": operation,
                        "gen_ai.provider.name": PROVIDER_NAME,
                        "server.address": self.cfg.host, "server.port": self.cfg.port})

    def _describe(self, span, body, chat: bool) -> None:
        """The GenAI request attributes, once the body parsed."""
        from dspark.cluster.tracing import request_attributes

        operation = "chat" if chat else "text_completion"
        span.update_name(f"{operation} {body.model}")
        span.set_attributes(request_attributes(body, operation, body.model, self.cfg.host,
                                               self.cfg.port))

    def _failed(self, clock: Clock, status: int, exc: BaseException | None) -> None:
        self.metrics.request(clock.route, status, time.perf_counter() - clock.started)
        if clock.span is not None:
            from opentelemetry.trace import Status, StatusCode

            kind = "cancelled" if status == 499 else type(exc).__name__ if exc else str(status)
            clock.span.set_attribute("error.type", kind)
            clock.span.set_attribute("http.response.status_code", status)
            clock.span.set_status(Status(StatusCode.ERROR, str(exc) if exc else kind))
            clock.span.end()

    async def _serve(self, body, chat: bool, clock: Clock):
        interval = self.cfg.stream_interval if body.stream else 0
        requests = [replace(r, stream_interval=interval) for r in body.shard_requests()]
        if clock.span is not None:
            from dspark.cluster.tracing import inject

            carrier = inject(clock.span)
            requests = [replace(r, trace_context=carrier) for r in requests]
        streams, firsts = await self._start_all(requests)
        ttft = time.perf_counter() - clock.started
        self.metrics.first_token(ttft)
        if clock.span is not None:
            clock.span.set_attribute("dspark.time_to_first_token_s", ttft)
            clock.span.add_event("first_token")
        choices = [Choice(i, requests[i], first) for i, first in enumerate(firsts)]
        builder = ResponseBuilder(chat, self.served.name)
        headers = {"x-dspark-replica": ",".join(sorted({f.replica for f in firsts}))}
        if body.stream:
            return StreamingResponse(self.drain.track(
                self._sse(builder, choices, streams, body.stream_options, body.n, clock)),
                media_type="text/event-stream", headers=headers)
        try:
            with self.drain.holding():
                await self.drain.until_expired(
                    asyncio.gather(*(_drain(c, s) for c, s in zip(choices, streams))))
        except BaseException:
            _cancel(streams)
            raise
        self._done(clock, choices, body.n, 200, builder.id)
        return JSONResponse(builder.full([c.shaped() for c in choices],
                                         total_usage(choices, body.n),
                                         merge_spec([c.last.spec for c in choices])),
                            headers=headers)

    async def _start_all(self, requests: list[ShardRequest]) -> tuple[list, list[ShardChunk]]:
        """Every choice's stream and first chunk.

        NOTE: one task per choice; a choice that fails (bad input, overload) fails the
        request before anything is streamed, and the other choices are cancelled."""
        streams: list = [None] * len(requests)
        firsts = await asyncio.gather(*(self._start(requests[i], streams, i)
                                        for i in range(len(requests))), return_exceptions=True)
        failed = [f for f in firsts if isinstance(f, BaseException)]
        if failed:
            # NOTE: cancelling a call the handle refused re-raises its BackPressureError
            # past our handlers: only calls that started are cancelled
            _cancel([s for s, first in zip(streams, firsts)
                     if s is not None and not isinstance(first, BaseException)])
            raise failed[0]
        return streams, firsts

    async def _start(self, request: ShardRequest, streams: list, index: int) -> ShardChunk:
        """Send one choice to a shard and wait for its first chunk, so that bad input and
        overload answer 4xx/5xx before a stream starts."""
        from ray.serve.exceptions import BackPressureError

        try:
            # NOTE: the handle may refuse at once (its queue is full): inside the try
            streams[index] = self.shard.options(stream=True).generate.remote(request)
            return await streams[index].__anext__()
        except BackPressureError as exc:
            raise overloaded(exc) from exc
        except StopAsyncIteration as exc:
            raise APIError(500, "the replica ended the request without output",
                           kind="server_error") from exc
        except Exception as exc:
            error = replica_error(exc, REQUEST_FIELDS) or stream_error(exc)
            if error.status == 500:
                logger.exception("shard failed")
            raise error from exc

    def _done(self, clock: Clock, choices: list[Choice], n: int, status: int,
              response_id: str) -> None:
        self.metrics.request(clock.route, status, time.perf_counter() - clock.started)
        for i, c in enumerate(choices):
            prompt = c.first.prompt_tokens if i % n == 0 else 0
            self.metrics.choice_done(c.last.finish_reason, prompt, c.last.completion_tokens)
        if clock.span is not None:
            usage = total_usage(choices, n)
            clock.span.set_attributes({
                "gen_ai.response.id": response_id,
                "gen_ai.response.model": self.served.name,
                "gen_ai.response.finish_reasons": [c.last.finish_reason or "stop"
                                                   for c in choices],
                "gen_ai.usage.input_tokens": usage["prompt_tokens"],
                "gen_ai.usage.output_tokens": usage["completion_tokens"],
                "http.response.status_code": status,
            })
            clock.span.end()

    async def _sse(self, builder: ResponseBuilder, choices: list[Choice], streams, options,
                   n: int, clock: Clock):
        """The events of a streamed response: every choice's first chunk, then chunks as
        they arrive, the usage chunk when asked, ``[DONE]``."""
        continuous = bool(options and options.continuous_usage_stats)
        last = [time.perf_counter()] * len(choices)

        def usage_so_far() -> dict | None:
            return total_usage(choices, n) if continuous else None

        try:
            for c in choices:
                yield sse(builder.chunk(c.index, c.head_text() + c.first.text,
                                        c.first.finish_reason, first=True,
                                        logprobs=c.shape_logprobs(c.first, head=True),
                                        usage=usage_so_far()))
            async for index, chunk in merged(streams):
                if self.drain.expired:
                    raise ShuttingDown
                choice = choices[index]
                now = time.perf_counter()
                self.metrics.tokens(now - last[index],
                                    chunk.completion_tokens - choice.last.completion_tokens)
                last[index] = now
                choice.add(chunk)
                yield sse(builder.chunk(index, chunk.text, chunk.finish_reason,
                                        logprobs=choice.shape_logprobs(chunk),
                                        usage=usage_so_far()))
            if options and options.include_usage:
                yield sse(builder.usage_chunk(total_usage(choices, n),
                                              merge_spec([c.last.spec for c in choices])))
            yield sse("[DONE]")
            self._done(clock, choices, n, 200, builder.id)
        except asyncio.CancelledError:
            _cancel(streams)
            self._failed(clock, 499, None)
            raise
        except ShuttingDown:  # the drain's deadline: end the stream, saying why
            from dspark.cluster.drain import shutting_down

            error = shutting_down()
            self._failed(clock, error.status, None)
            _cancel(streams)
            yield sse(error.body())
            yield sse("[DONE]")
        except Exception as exc:  # mid-stream failure: say so in the stream, then end it
            logger.exception("stream failed")
            self._failed(clock, 500, exc)
            _cancel(streams)
            yield sse(stream_error(exc).body())
            yield sse("[DONE]")
