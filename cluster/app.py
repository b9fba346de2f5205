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
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from dspark.cluster.config import ServeConfig
from dspark.cluster.openai_api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ResponseBuilder,
    parse,
    sse,
    usage,
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
        budget = cfg.budget if drafter is not None and drafter.config.confidence_head else "fixed"
        engine = Engine(target, drafter, EngineConfig(
            budget=budget, num_speculative_tokens=cfg.num_speculative_tokens,
            max_num_seqs=cfg.max_num_seqs, num_blocks=cfg.num_blocks,
        ))
        self.context = target.config.max_position_embeddings
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
        """Yield shard chunks for one OpenAI request (already validated by the ingress)."""
        from dspark.models.generation import SamplingParams
        from dspark.models.tokenizer import StreamDecoder

        tok = self.tokenizer
        if request["chat"]:
            prompt_ids = tok.render_chat(request["messages"], add_generation_prompt=True)
        else:
            prompt_ids = tok.encode(request["prompt"])
        room = self.context - len(prompt_ids)
        if room < 1:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; the context is {self.context} "
                f"tokens, so at most {self.context - 1} fit"
            )
        max_tokens = request["max_tokens"] or room
        if max_tokens > room:
            raise ValueError(
                f"max_tokens ({max_tokens}) is more than the context leaves: the prompt has "
                f"{len(prompt_ids)} tokens of {self.context}, so max_tokens must be in [1, {room}]"
            )
        if len(self.engine.engine.scheduler.waiting) >= self.cfg.max_waiting_per_replica:
            raise OverloadedError(f"replica {self.replica_id} has "
                                  f"{self.cfg.max_waiting_per_replica} requests waiting")
        params = SamplingParams(temperature=request["temperature"], top_p=request["top_p"],
                                max_tokens=max_tokens, seed=request["seed"],
                                ignore_eos=request["ignore_eos"])
        stops = request["stop"]
        decoder, text, produced = StreamDecoder(tok), "", 0
        async for out in self.engine.generate(prompt_ids, params, tok.stop_ids):
            piece = ""
            for token in out.new_token_ids:
                produced += 1
                if token not in tok.stop_ids or params.ignore_eos:
                    piece += decoder.push(token)
            reason = _finish_reason(out.finish_reason) if out.finished else None
            if stops:
                cut = _stop_cut(text + piece, stops, len(text))
                if cut is not None:
                    yield self._chunk(cut[len(text):], "stop", len(prompt_ids), produced,
                                      out.spec_stats)
                    return  # NOTE: leaving the loop aborts the engine request
            text += piece
            yield self._chunk(piece, reason, len(prompt_ids), produced, out.spec_stats)

    def _chunk(self, text, reason, prompt_tokens, produced, spec) -> dict:
        return {"text": text, "finish_reason": reason, "prompt_tokens": prompt_tokens,
                "completion_tokens": produced, "spec": spec, "replica": self.replica_id}

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


api = FastAPI(title="dspark", description="OpenAI-compatible API over DSpark speculative decoding")


@api.exception_handler(APIError)
async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@serve.deployment
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, shard, config: dict) -> None:
        self.shard = shard
        self.cfg = ServeConfig.from_dict(config)
        self.started = time.time()

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model",
                                            "created": int(self.started), "owned_by": "dspark"}]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        body = parse(CompletionRequest, await request.body())
        return await self._serve(body, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        body = parse(ChatCompletionRequest, await request.body())
        return await self._serve(body, chat=True)

    @api.get("/v1/load")
    async def load(self) -> dict:
        """Load of one replica (the one the handle picks); for operators and tests."""
        return await self.shard.load.remote()

    async def _serve(self, body, chat: bool):
        if body.model != self.cfg.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves "
                           f"{self.cfg.model_name!r}", param="model", code="model_not_found")
        payload = {
            "chat": chat,
            "messages": [m.model_dump() for m in body.messages] if chat else None,
            "prompt": None if chat else body.prompt,
            "max_tokens": body.requested_max_tokens(0) or None,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "seed": body.seed,
            "ignore_eos": body.ignore_eos,
            "stop": body.stop_list(),
        }
        stream = self.shard.options(stream=True).generate.remote(payload)
        first = await self._first(stream)
        builder = ResponseBuilder(chat, self.cfg.model_name)
        headers = {"x-dspark-replica": first["replica"]}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(builder, first, stream, include_usage),
                                     media_type="text/event-stream", headers=headers)
        text, last = first["text"], first
        async for chunk in stream:
            text += chunk["text"]
            last = chunk
        return JSONResponse(builder.full(text, last["finish_reason"] or "stop",
                                         usage(last["prompt_tokens"], last["completion_tokens"]),
                                         last["spec"]), headers=headers)

    async def _first(self, stream) -> dict:
        """The first chunk, so that bad input and overload answer 4xx/5xx before a stream
        starts."""
        from ray.serve.exceptions import BackPressureError

        try:
            return await stream.__anext__()
        except BackPressureError as exc:
            raise APIError(503, f"server overloaded: {exc}", kind="server_error",
                           code="overloaded", headers={"Retry-After": "1"}) from exc
        except StopAsyncIteration as exc:
            raise APIError(500, "the replica ended the request without output",
                           kind="server_error") from exc
        except Exception as exc:
            cause = getattr(exc, "cause", None) or exc
            if isinstance(exc, ValueError) or isinstance(cause, ValueError):
                raise APIError(400, str(cause)) from exc
            if "OverloadedError" in type(cause).__name__ or "OverloadedError" in str(exc):
                raise APIError(429, "too many requests waiting; retry later",
                               kind="rate_limit_error", code="overloaded",
                               headers={"Retry-After": "1"}) from exc
            logger.exception("shard failed")
            raise APIError(500, f"internal error: {type(cause).__name__}",
                           kind="server_error") from exc

    async def _sse(self, builder: ResponseBuilder, first: dict, stream, include_usage: bool):
        last = first
        try:
            yield sse(builder.chunk(first["text"], first["finish_reason"], first=True))
            async for chunk in stream:
                last = chunk
                yield sse(builder.chunk(chunk["text"], chunk["finish_reason"]))
            if include_usage:
                yield sse(builder.usage_chunk(
                    usage(last["prompt_tokens"], last["completion_tokens"]), last["spec"]))
            yield sse("[DONE]")
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception as exc:  # mid-stream failure: say so in the stream, then end it
            logger.exception("stream failed")
            yield sse(APIError(500, f"internal error: {type(exc).__name__}",
                               kind="server_error").body())
            yield sse("[DONE]")


def build_app(cfg: ServeConfig):
    # NOTE: max_queued_requests caps the queue of handles *calling* the shard, i.e. the
    # ingress's; past it the ingress gets BackPressureError and answers 503 + Retry-After
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
        **options,
    ).bind(cfg.to_dict())
    return OpenAIIngress.options(
        max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0.1},
    ).bind(shard, cfg.to_dict())
