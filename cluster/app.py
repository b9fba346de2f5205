"""The Ray Serve application: ``TargetShard`` replicas run the engine; ``OpenAIIngress`` is
the OpenAI-compatible HTTP front (FastAPI) that streams their tokens.

Vocabulary:
- *shard chunk*: what ``TargetShard.generate`` yields per engine output: the new text, the
  token count so far, and on the last chunk the finish reason, usage and spec metrics;
- *overload*: an engine queue beyond ``max_waiting_per_replica`` answers 429; a full
  ingress handle queue (``max_queued_requests``) answers 503; both carry Retry-After.

NOTE: a client that disconnects cancels the ingress task; Ray Serve propagates the
cancellation to the shard's generator, whose ``finally`` aborts the engine request and
frees its KV blocks.
"""


# NOTE: no `from __future__ import annotations` here: FastAPI must see the real `Request`
# class on the route signatures of the (cloudpickled) ingress class.
import asyncio
import logging
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic.json_schema import models_json_schema
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from dspark.cluster.config import ServeConfig
from dspark.cluster.openai_api import (
    ERROR_RESPONSES,
    APIError,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    ResponseBuilder,
    merge_spec,
    parse,
    parse_json,
    shard_requests,
    sse,
    streamed,
    total_usage,
    validation_error,
)

logger = logging.getLogger(__name__)


class OverloadedError(RuntimeError):
    """The replica's engine queue is full (answered as 429)."""


@serve.deployment
class TargetShard:
    """One replica: the engine (target + co-located drafter) behind an async front."""

    def __init__(self, config: dict) -> None:
        import torch

        from dspark.models.drafter_checkpoint import load_drafter
        from dspark.models.generation import load_for_generation
        from dspark.workers.async_engine import AsyncEngine
        from dspark.workers.engine import Engine, EngineConfig

        cfg = ServeConfig.from_dict(config)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        target, self.tokenizer = load_for_generation(cfg.target)
        target.eval()
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (direct construction in tools)
            self.replica_id = f"local-{id(self):x}"
        self.ep_group, group = self.replica_id, None  # one group per replica at ep_size 1
        if cfg.ep_size > 1:
            from dspark.workers.expert_parallel import shard_experts

            self.ep_group, rank, group = join_expert_parallel_group(cfg)
            shard_experts(target, group, rank, cfg.ep_size)
        drafter = load_drafter(cfg.drafter_path, target) if cfg.drafter_path else None
        # NOTE: an impossible pair (a confidence budget, a drafter without the head) makes
        # the Engine raise: the replica fails to start and dspark serve says why
        budget = cfg.effective_budget
        engine = Engine(target, drafter, EngineConfig(
            budget=budget, num_speculative_tokens=cfg.num_speculative_tokens,
            max_num_seqs=cfg.max_num_seqs, num_blocks=cfg.num_blocks,
        ), lockstep=group is not None)
        self.context = target.config.max_position_embeddings
        self._tokens: dict[int, tuple[str, list[int]]] = {}
        self.engine = AsyncEngine(engine, group=group)
        self.publisher = None
        self._closed = threading.Event()
        if cfg.redis_url:
            from dspark.router.board import BoardConfig, BoardPublisher, BoardReader, ReplicaLoad

            self.publisher = BoardPublisher(BoardConfig(cfg.redis_url, cluster=cfg.cluster))
            self.publisher.publish_costs(self.replica_id, {
                "batch_sizes": list(engine.cost_table.batch_sizes),
                "steps_per_second": list(engine.cost_table.steps_per_second),
            })

            def publish(_stats=None, force: bool = False) -> None:
                self.publisher.publish(ReplicaLoad(self.replica_id, cost_table_id=self.replica_id,
                                                   ep_group=self.ep_group, **self._load_fields()),
                                       force=force)

            self.engine.listeners.append(publish)  # every step, rate-limited

            def heartbeat() -> None:  # an idle replica stays on the board
                while not self._closed.wait(self.publisher.cfg.ttl_s / 3):
                    publish(force=True)

            publish(force=True)
            threading.Thread(target=heartbeat, name="dspark-board-heartbeat", daemon=True).start()
            if budget == "cluster":
                # SPS is evaluated at this replica's tokens plus what the rest of its
                # expert-parallel group schedules (one group per replica while ep_size is 1)
                self.reader = BoardReader(BoardConfig(cfg.redis_url, cluster=cfg.cluster))

                def group_tokens() -> int:
                    return sum(load.tokens_scheduled for rid, load in self.reader.fresh().items()
                               if load.ep_group == self.ep_group and rid != self.replica_id)

                engine.external_tokens = group_tokens

    def _load_fields(self) -> dict:
        load = self.engine.load()
        return {k: load[k] for k in ("running", "queued", "tokens_scheduled", "pending_tokens",
                                     "free_blocks", "total_blocks", "acceptance_length",
                                     "mean_survival")}

    async def generate(self, request: dict):
        """Yield shard chunks for one choice of an OpenAI request (validated by the ingress).

        ``request``: ``chat``, ``messages`` | ``prompt`` | ``prompt_ids``, ``max_tokens``
        (None: what the context leaves; 0: score the prompt only, with ``echo``),
        ``temperature``, ``top_p``, ``seed``, ``ignore_eos``, ``stop``, and optionally
        ``presence_penalty``, ``frequency_penalty``, ``logit_bias`` ({token id: bias}),
        ``min_tokens``, ``logprobs`` (None or how many alternatives), ``echo``."""
        from dspark.models.generation import TokenLogprob
        from dspark.models.tokenizer import StreamDecoder

        tok = self.tokenizer
        prompt_ids = self._prompt_ids(request)
        params = self._params(request, prompt_ids)
        echo, score_only = bool(request.get("echo")), request.get("max_tokens") == 0
        if len(self.engine.engine.scheduler.waiting) >= self.cfg.max_waiting_per_replica:
            raise OverloadedError(f"replica {self.replica_id} has "
                                  f"{self.cfg.max_waiting_per_replica} requests waiting")
        stops, min_tokens = request["stop"], params.min_tokens
        decoder, text, produced, first = StreamDecoder(tok), "", 0, True
        async for out in self.engine.generate(prompt_ids, params, tok.stop_ids):
            head = {}
            if first:
                first = False
                if echo:
                    head["prompt_text"] = (request["prompt"] if request.get("prompt") is not None
                                           else tok.decode(prompt_ids, skip_special_tokens=False))
                if out.prompt_logprobs is not None:
                    head["prompt_logprobs"] = [
                        self._entry(TokenLogprob(t, None, [])) if lp is None else self._entry(lp)
                        for t, lp in zip(prompt_ids, out.prompt_logprobs)]
                if score_only:  # the prompt's scores were the point; drop the drawn token
                    yield self._chunk("", "length", len(prompt_ids), 0, out.spec_stats,
                                      None if params.logprobs is None else [], head)
                    return
            pieces = []
            for k, token in enumerate(out.new_token_ids):
                produced += 1
                emit = token not in tok.stop_ids or params.ignore_eos
                pieces.append((decoder.push(token) if emit else "",
                               self._entry(out.logprobs[k]) if out.logprobs is not None else None))
            piece = "".join(p for p, _ in pieces)
            entries = None if params.logprobs is None else [e for _, e in pieces]
            reason = _finish_reason(out.finish_reason) if out.finished else None
            if stops and produced >= min_tokens:
                cut = _stop_cut(text + piece, stops, len(text))
                if cut is not None:
                    kept = cut[len(text):]
                    if entries is not None:  # the tokens whose text starts before the cut
                        starts = [sum(len(p) for p, _ in pieces[:k]) for k in range(len(pieces))]
                        entries = [e for e, s in zip(entries, starts) if s < max(len(kept), 1)]
                    yield self._chunk(kept, "stop", len(prompt_ids), produced,
                                      out.spec_stats, entries, head)
                    return  # NOTE: leaving the loop aborts the engine request
            text += piece
            yield self._chunk(piece, reason, len(prompt_ids), produced, out.spec_stats,
                              entries, head)

    def _prompt_ids(self, request: dict) -> list[int]:
        tok, vocab = self.tokenizer, self.engine.engine.target.config.vocab_size
        if request["chat"]:
            prompt_ids = tok.render_chat(request["messages"], add_generation_prompt=True)
        elif request.get("prompt_ids") is not None:
            prompt_ids = list(request["prompt_ids"])
            bad = [t for t in prompt_ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt: token ids {bad[:5]} outside [0, {vocab})")
        else:
            prompt_ids = tok.encode(request["prompt"])
        if not prompt_ids:
            raise ValueError("prompt: is empty; it must hold at least one token")
        room = self.context - len(prompt_ids)
        if room < 1:
            raise ValueError(
                f"prompt: has {len(prompt_ids)} tokens; the context is {self.context} "
                f"tokens, so at most {self.context - 1} fit"
            )
        return prompt_ids

    def _params(self, request: dict, prompt_ids: list[int]):
        from dspark.models.generation import SamplingParams

        room = self.context - len(prompt_ids)
        max_tokens = request["max_tokens"]
        if max_tokens is not None and max_tokens >= self.context:
            raise ValueError(f"max_tokens: must be in [1, {self.context - 1}] (the context is "
                             f"{self.context} tokens), got {max_tokens}")
        # NOTE: max_tokens is an upper bound; the context bounds generation too (what it
        # leaves after the prompt), ending with finish_reason "length"
        max_tokens = 1 if max_tokens == 0 else min(max_tokens or room, room)
        vocab = self.engine.engine.target.config.vocab_size
        bias = {int(k): float(v) for k, v in (request.get("logit_bias") or {}).items()}
        bad = [t for t in bias if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"logit_bias: token ids {bad[:5]} outside [0, {vocab})")
        logprobs = request.get("logprobs")
        # NOTE: at least min_tokens unless max_tokens or the context ends generation first
        min_tokens = min(request.get("min_tokens") or 0, max_tokens)
        return SamplingParams(
            temperature=request["temperature"], top_p=request["top_p"], max_tokens=max_tokens,
            seed=request["seed"], ignore_eos=request["ignore_eos"],
            presence_penalty=request.get("presence_penalty") or 0.0,
            frequency_penalty=request.get("frequency_penalty") or 0.0,
            logit_bias=bias, min_tokens=min_tokens, logprobs=logprobs,
            prompt_logprobs=logprobs if request.get("echo") and logprobs is not None else None,
        )

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and its UTF-8 bytes (a byte-level piece of a character may not
        be valid UTF-8 on its own: its text then holds U+FFFD)."""
        cached = self._tokens.get(token_id)
        if cached is None:
            inner = self.tokenizer.inner
            if token_id in self.tokenizer.special_ids:
                raw = inner.id_to_token(token_id).encode()
            else:
                raw = bytes(_BYTE_OF.get(ch, 0) for ch in inner.id_to_token(token_id) or "")
            cached = self._tokens[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return cached

    def _entry(self, lp) -> dict:
        """A token entry: ``token``, ``logprob``, ``bytes`` and ``top`` as (text, bytes,
        logprob) tuples."""
        text, raw = self._token(lp.token_id)
        return {"token": text, "logprob": lp.logprob, "bytes": raw,
                "top": [(*self._token(t), value) for t, value in lp.top]}

    def _chunk(self, text, reason, prompt_tokens, produced, spec, logprobs=None,
               head=None) -> dict:
        return {"text": text, "finish_reason": reason, "prompt_tokens": prompt_tokens,
                "completion_tokens": produced, "spec": spec, "replica": self.replica_id,
                "logprobs": logprobs, **(head or {})}

    def load(self) -> dict:
        return {"replica_id": self.replica_id, **self.engine.load()}

    def record_routing_stats(self) -> dict:
        return self.load()

    def check_health(self) -> None:
        if not self.engine._thread.is_alive():
            raise RuntimeError("the engine loop thread died")

    def __del__(self) -> None:
        if hasattr(self, "_closed"):
            self._closed.set()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        if getattr(self, "publisher", None) is not None:
            self.publisher.remove(self.replica_id)


def join_expert_parallel_group(cfg: ServeConfig):
    """Rendezvous through Redis (``dspark:{cluster}:ep:{group}``): the n-th replica to arrive
    is rank n % ep_size of group n // ep_size; rank 0 publishes the master address, every
    rank then joins the torch.distributed group (gloo on CPU, NCCL on GPU)."""
    import json as _json

    import redis
    import torch
    import torch.distributed as dist
    from ray.util import get_node_ip_address

    from dspark.router.redis_server import free_port

    if not cfg.redis_url:
        raise ValueError("ep_size > 1 needs redis_url: the group meets through the load board")
    client = redis.Redis.from_url(cfg.redis_url, socket_timeout=5)
    index = client.incr(f"dspark:{cfg.cluster}:ep:counter") - 1
    group_idx, rank = divmod(index, cfg.ep_size)
    key = f"dspark:{cfg.cluster}:ep:{group_idx}"
    if rank == 0:
        info = {"version": 1, "master": get_node_ip_address(), "port": free_port(),
                "world_size": cfg.ep_size}
        client.set(key, _json.dumps(info))
    deadline = time.time() + 300
    while True:
        raw = client.get(key)
        if raw is not None:
            info = _json.loads(raw)
            break
        if time.time() > deadline:
            raise RuntimeError(f"expert-parallel group {group_idx}: rank 0 never registered")
        time.sleep(0.1)
    if info.get("version") != 1 or info["world_size"] != cfg.ep_size:
        raise RuntimeError(f"{key}: rendezvous entry of another schema or size: {info}")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{info['master']}:{info['port']}",
                            rank=rank, world_size=cfg.ep_size)
    return f"ep{group_idx}", rank, dist.group.WORLD


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> printable character map (GPT-2's)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
            *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = list(kept), 0
    for b in range(256):
        if b not in kept:
            kept.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(kept, chars)}


_BYTE_OF = _byte_decoder()


def _finish_reason(reason: str | None) -> str:
    return "stop" if reason in ("stop", None) else "length" if reason == "length" else reason


def _stop_cut(text: str, stops: list[str], already: int) -> str | None:
    """``text`` cut before the earliest stop string that ends after ``already``."""
    best = None
    for stop in stops:
        pos = text.find(stop, max(0, already - len(stop) + 1))
        if pos != -1 and (best is None or pos < best):
            best = pos
    return None if best is None else text[:best]


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


def openapi_document(context: int | None = None, vocab: int | None = None,
                     model_name: str | None = None) -> dict:
    """FastAPI's schema plus the request bodies the completion routes parse themselves
    (so that limits and errors come first) as components, and the served model's limits."""
    schema = get_openapi(title=api.title, version=api.version, description=api.description,
                         routes=api.routes)
    _, defs = models_json_schema(
        [(CompletionRequest, "validation"), (ChatCompletionRequest, "validation"),
         (ChatCompletionChunk, "serialization"), (CompletionResponse, "serialization")],
        ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(defs.get("$defs", {}))
    for path, model in (("/v1/completions", CompletionRequest),
                        ("/v1/chat/completions", ChatCompletionRequest)):
        schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    if context is not None and vocab is not None:
        _document_limits(components, context, vocab)
    if model_name is not None:  # the one model this server serves
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            components[name]["properties"]["model"]["enum"] = [model_name]
    return schema


def _document_limits(components: dict, context: int, vocab: int) -> None:
    """Put the served model's limits into the request schemas: token counts below the
    context, token ids below the vocabulary (``logit_bias`` keys included)."""

    def walk(node, visit):
        if isinstance(node, dict):
            visit(node)
            for value in node.values():
                walk(value, visit)
        elif isinstance(node, list):
            for value in node:
                walk(value, visit)

    def counts(node):
        if node.get("type") == "integer":
            node["maximum"] = context - 1

    def token_ids(node):
        if node.get("type") == "integer":
            node["maximum"] = vocab - 1
        if node.get("type") == "array" and node.get("items", {}).get("type") == "integer":
            node["maxItems"] = context - 1

    def bias_keys(node):
        if node.get("type") == "object":
            node["propertyNames"] = {"pattern": below_regex(vocab)}

    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = components[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens", "min_tokens"):
            walk(props[field], counts)
        walk(props["logit_bias"], bias_keys)
        if "prompt" in props:
            walk(props["prompt"], token_ids)


def below_regex(n: int) -> str:
    """A regex of the decimal integers in [0, n) without leading zeros."""
    top = str(n - 1)
    if len(top) == 1:
        return f"^[0-{top}]$"
    parts = ["0", f"[1-9][0-9]{{0,{len(top) - 2}}}"]
    for i, digit in enumerate(top):
        low = 1 if i == 0 else 0
        if int(digit) > low:
            parts.append(f"{top[:i]}[{low}-{int(digit) - 1}][0-9]{{{len(top) - i - 1}}}")
    parts.append(top)
    return "^(?:" + "|".join(parts) + ")$"


@serve.deployment
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, shard, config: dict) -> None:
        import json
        from pathlib import Path

        self.shard = shard
        self.cfg = ServeConfig.from_dict(config)
        self.started = time.time()
        target = json.loads((Path(self.cfg.target) / "config.json").read_text())
        self.context = int(target["max_position_embeddings"])
        self.vocab = int(target["vocab_size"])
        self._openapi: dict | None = None
        self._ready = False

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
        """200 once a replica serves; 503 while the model is still loading."""
        if not await self._shard_ready(2.0):
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self) -> dict:
        if self._openapi is None:
            self._openapi = openapi_document(self.context, self.vocab, self.cfg.model_name)
        return self._openapi

    def _card(self) -> dict:
        return {"id": self.cfg.model_name, "object": "model", "created": int(self.started),
                "owned_by": "dspark"}

    @api.get("/v1/models", response_model=ModelList)
    async def models(self) -> dict:
        # NOTE: clients poll this route to know when to start: it answers once the model
        # is loaded, not as soon as the ingress is
        await self._shard_ready(None)
        return {"object": "list", "data": [self._card()]}

    @api.get("/v1/models/{model_id:path}", response_model=ModelCard,
             responses={404: ERROR_RESPONSES[404]})
    async def model(self, model_id: str) -> dict:
        self._check_model(model_id, "model_id")
        return self._card()

    @api.post("/v1/completions", responses=streamed(CompletionResponse, CompletionResponse))
    async def completions(self, request: Request):
        body = parse(CompletionRequest, await self._json(request))
        return await self._serve(body, chat=False)

    @api.post("/v1/chat/completions",
              responses=streamed(ChatCompletionChunk, ChatCompletionResponse))
    async def chat_completions(self, request: Request):
        body = parse(ChatCompletionRequest, await self._json(request))
        return await self._serve(body, chat=True)

    @api.get("/v1/load")
    async def load(self) -> dict:
        """Load of one replica (the one the handle picks); for operators and tests."""
        return await self.shard.load.remote()

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

    def _check_model(self, name: str, param: str = "model") -> None:
        if name != self.cfg.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves "
                           f"{self.cfg.model_name!r}", param=param, code="model_not_found")

    async def _serve(self, body, chat: bool):
        self._check_model(body.model)
        for field in ("max_tokens", "max_completion_tokens", "min_tokens"):
            value = getattr(body, field)
            if value is not None and value >= self.context:
                low = 0 if field == "min_tokens" else 1
                raise APIError(400, f"{field}: must be in [{low}, {self.context - 1}] (the "
                               f"context is {self.context} tokens), got {value}", param=field)
        requests = shard_requests(body, chat)
        # NOTE: one task per choice; a choice that fails (bad input, overload) fails the
        # request before anything is streamed, and the other choices are cancelled
        streams: list = [None] * len(requests)
        firsts = await asyncio.gather(*(self._start(requests[i], streams, i)
                                        for i in range(len(requests))), return_exceptions=True)
        failed = [f for f in firsts if isinstance(f, BaseException)]
        if failed:
            # NOTE: cancelling a call the handle refused re-raises its BackPressureError
            # past our handlers: only calls that started are cancelled
            for s, first in zip(streams, firsts):
                if s is not None and not isinstance(first, BaseException):
                    s.cancel()
            raise failed[0]
        choices = [Choice(i, chat, requests[i], first) for i, first in enumerate(firsts)]
        builder = ResponseBuilder(chat, self.cfg.model_name)
        headers = {"x-dspark-replica": ",".join(sorted({f["replica"] for f in firsts}))}
        if body.stream:
            options = body.stream_options
            return StreamingResponse(
                self._sse(builder, choices, streams, bool(options and options.include_usage),
                          bool(options and options.continuous_usage_stats), body.n),
                media_type="text/event-stream", headers=headers)
        try:
            await asyncio.gather(*(self._drain(c, s) for c, s in zip(choices, streams)))
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        return JSONResponse(builder.full([c.shaped() for c in choices],
                                         total_usage(choices, body.n),
                                         merge_spec([c.last["spec"] for c in choices])),
                            headers=headers)

    @staticmethod
    async def _drain(choice: "Choice", stream) -> None:
        async for chunk in stream:
            choice.add(chunk)

    async def _start(self, request: dict, streams: list, index: int) -> dict:
        """Send one choice to a shard and wait for its first chunk, so that bad input and
        overload answer 4xx/5xx before a stream starts."""
        from ray.serve.exceptions import BackPressureError

        try:
            # NOTE: the handle may refuse at once (its queue is full): inside the try
            streams[index] = self.shard.options(stream=True).generate.remote(request)
            return await streams[index].__anext__()
        except BackPressureError as exc:
            raise APIError(503, f"server overloaded: {exc}", kind="server_error",
                           code="overloaded", headers={"Retry-After": "1"}) from exc
        except StopAsyncIteration as exc:
            raise APIError(500, "the replica ended the request without output",
                           kind="server_error") from exc
        except Exception as exc:
            cause = getattr(exc, "cause", None) or exc
            if isinstance(exc, ValueError) or isinstance(cause, ValueError):
                message = str(cause)
                param = message.split(":", 1)[0] if ":" in message else None
                raise APIError(400, message, param=param if param and " " not in param
                               else None) from exc
            if "OverloadedError" in type(cause).__name__ or "OverloadedError" in str(exc):
                raise APIError(429, "too many requests waiting; retry later",
                               kind="rate_limit_error", code="overloaded",
                               headers={"Retry-After": "1"}) from exc
            logger.exception("shard failed")
            raise APIError(500, f"internal error: {type(cause).__name__}",
                           kind="server_error") from exc

    async def _sse(self, builder: ResponseBuilder, choices: list["Choice"], streams,
                   include_usage: bool, continuous: bool, n: int):
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

        tasks = []
        try:
            for c in choices:
                yield sse(builder.chunk(c.index, c.head_text() + c.first["text"],
                                        c.first["finish_reason"], first=True,
                                        logprobs=c.shape_logprobs(c.first, head=True),
                                        usage=total_usage(choices, n) if continuous else None))
            tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
            live = len(tasks)
            while live:
                index, item = await queue.get()
                if item is None:
                    live -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                choice = choices[index]
                choice.add(item)
                yield sse(builder.chunk(index, item["text"], item["finish_reason"],
                                        logprobs=choice.shape_logprobs(item),
                                        usage=total_usage(choices, n) if continuous else None))
            if include_usage:
                yield sse(builder.usage_chunk(total_usage(choices, n),
                                              merge_spec([c.last["spec"] for c in choices])))
            yield sse("[DONE]")
        except asyncio.CancelledError:
            for s in streams:
                s.cancel()
            raise
        except Exception as exc:  # mid-stream failure: say so in the stream, then end it
            logger.exception("stream failed")
            for s in streams:
                s.cancel()
            yield sse(APIError(500, f"internal error: {type(exc).__name__}",
                               kind="server_error").body())
            yield sse("[DONE]")
        finally:
            for task in tasks:
                task.cancel()


def build_app(cfg: ServeConfig):
    # NOTE: max_queued_requests caps the queue of handles *calling* the shard, i.e. the
    # ingress's; past it the ingress gets BackPressureError and answers 503 + Retry-After
    # NOTE: on stop, each replica checks for in-flight requests every wait-loop period (Serve's
    # default 2 s, slept at least once even when idle) and is killed after the timeout
    # (default 20 s): an idle app stops at once, a stream in flight gets 5 s to finish
    shutdown = {"graceful_shutdown_wait_loop_s": 0.1, "graceful_shutdown_timeout_s": 5.0}
    options = {}
    if cfg.router == "board" and cfg.redis_url:
        from ray.serve.config import RequestRouterConfig

        options["request_router_config"] = RequestRouterConfig(
            request_router_class="dspark.router.load_router:LoadBoardRouter",
            request_router_kwargs={"redis_url": cfg.redis_url, "cluster": cfg.cluster},
        )
    shard = TargetShard.options(
        num_replicas=cfg.replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.replica_cpus},
        **shutdown,
        **options,
    ).bind(cfg.to_dict())
    return OpenAIIngress.options(
        max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0.1},
        **shutdown,
    ).bind(shard, cfg.to_dict())
