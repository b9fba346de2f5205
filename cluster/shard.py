"""``TargetShard``: one Ray Serve replica that runs the engine (target + co-located drafter)
behind its asyncio front and streams ``ShardChunk``s for ``ShardRequest``s.

NOTE: a client that disconnects cancels the ingress task; Ray Serve propagates the
cancellation to ``generate``, and leaving its loop aborts the engine request and frees its
KV blocks.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

from ray import serve

from dspark.cluster.config import ServeConfig
from dspark.cluster.payloads import ShardChunk, ShardRequest


@serve.deployment
class TargetShard:
    """One replica of the target deployment (a rank of an expert-parallel group when
    ``ep_size`` > 1)."""

    def __init__(self, config: dict) -> None:
        import torch

        from dspark.cluster.shard_stream import TokenTexts
        from dspark.models.generation import load_for_generation
        from dspark.workers.async_engine import AsyncEngine

        cfg = ServeConfig.from_dict(config)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.replica_id = cfg, _replica_id(self)
        self._ids = itertools.count()
        target, self.tokenizer = load_for_generation(cfg.target)
        target.eval()
        if cfg.replica_gpus > 0:
            target.to("cuda")  # NOTE: the drafter is loaded onto the target's device
        self.context = target.config.max_position_embeddings
        self.texts = TokenTexts(self.tokenizer)
        self.ep_group, group = self.replica_id, None  # one group per replica at ep_size 1
        if cfg.ep_size > 1:
            from dspark.cluster.expert_group import join_expert_parallel_group

            self.ep_group, group = join_expert_parallel_group(cfg, target)
        self.board = self._open_board()
        self.monitor = None
        engine = self._build_engine(target, group)
        self.engine = AsyncEngine(engine, group=group,
                                  max_waiting=cfg.max_waiting_per_replica)
        if self.board is not None:
            self.board.start(engine.cost_table, self.engine.load, self.engine.listeners)
        self.metrics = self._start_metrics(engine) if cfg.metrics else None
        from dspark.cluster.autoscaling import Delivered

        self.delivered = Delivered()
        self.engine.listeners.append(self.delivered.on_step)
        from dspark.cluster.tracing import make_tracer

        self.tracer = make_tracer(cfg.otlp_traces_endpoint, cfg.trace_sample_ratio, "replica")
        self.step_events = None
        """Traced requests' step rows until their spans end (``cluster.tracing.StepEvents``)."""
        if self.tracer is not None:
            from dspark.cluster.tracing import StepEvents

            self.step_events = StepEvents()
            engine.on_request_step = self.step_events.on_request_step

    def _start_metrics(self, engine):
        from dspark.cluster.metrics import ShardMetrics

        metrics = ShardMetrics(
            self.replica_id, self.ep_group, self.cfg.model_name, engine.gamma,
            self.cfg.budget_mode.value, self.board.age if self.board is not None else None,
            self.calibration if self.monitor is not None else None)
        self.engine.listeners.append(metrics.on_step)
        return metrics

    def _monitor(self, drafter):
        """The confidence head's drift monitor (None for a drafter without one)."""
        from dspark.workers.calibration_monitor import CalibrationMonitor, MonitorConfig

        if drafter is None or not drafter.config.confidence_head:
            return None
        cfg = self.cfg
        return CalibrationMonitor.for_drafter(drafter.config, MonitorConfig(
            window=cfg.calibration_window, threshold=cfg.calibration_drift_threshold,
            refit=cfg.calibration_refit))

    def calibration(self) -> dict | None:
        """The drift monitor's snapshot (None without a confidence head)."""
        return self.monitor.snapshot().to_dict() if self.monitor is not None else None

    def _open_board(self):
        """This replica's load-board entry (None without Redis); it reads the group's load
        for the cluster budget of an expert-parallel group (ep_size > 1).

        NOTE: a replica alone in its group has nobody to read (the cluster budget prices
        it alone), and a reader polls Redis ten times a second on a thread of the
        replica's process, taking the interpreter's lock from the engine's thread."""
        from dspark.cluster.replica_board import ReplicaBoard
        from dspark.workers.modes import BudgetMode

        if not self.cfg.redis_url:
            return None
        reads = self.cfg.budget_mode is BudgetMode.CLUSTER and self.cfg.ep_size > 1
        return ReplicaBoard(self.cfg.redis_url, self.cfg.cluster, self.replica_id,
                            self.ep_group, reads, password=self.cfg.redis_password)

    def _build_engine(self, target, group):
        """The engine. NOTE: an impossible pair (a confidence budget, a drafter without the
        head) makes it raise: the replica fails to start and ``dspark serve`` says why."""
        from dspark.models.drafter_checkpoint import load_drafter
        from dspark.workers.engine import Engine, EngineConfig

        cfg = self.cfg
        drafter = load_drafter(cfg.drafter_path, target) if cfg.drafter_path else None
        light = load_drafter(cfg.light_drafter_path, target) if cfg.light_drafter_path else None
        self.monitor = self._monitor(drafter)
        # NOTE: the cluster budget prices a step per rank from what the rest of its
        # expert-parallel group did last step (alone at ep_size 1: one group per replica)
        engine = Engine(target, drafter, EngineConfig(
            budget=cfg.budget_mode, num_speculative_tokens=cfg.num_speculative_tokens,
            max_num_seqs=cfg.max_num_seqs, num_blocks=cfg.num_blocks,
            draft_vocab=cfg.draft_vocab, draft_gating=cfg.draft_gating,
            cuda_graphs=cfg.cuda_graphs,
        ), light_drafter=light,
            group_load=self.board.group_reader if self.board is not None else None,
            lockstep=group is not None,
            on_round=self.monitor.on_round if self.monitor is not None else None)
        if self.monitor is not None:
            # NOTE: a refit runs on the engine thread, inside the step's commit
            self.monitor.on_refit = lambda temps: self._refitted(engine, temps)
        return engine

    def _refitted(self, engine, temperatures) -> None:
        """The monitor refitted the STS temperatures: the budget uses them from the next
        step; with tracing on, a ``dspark.calibration.refit`` span records the change (the
        metrics show it as ``dspark_calibration_refits`` and ``..._temperature``)."""
        engine.set_confidence_temperatures(temperatures)
        tracer = getattr(self, "tracer", None)
        if tracer is None or not self.monitor.refits:
            return
        event = self.monitor.refits[-1]
        span = tracer.start_span("dspark.calibration.refit", attributes={
            "dspark.replica": self.replica_id, "dspark.ep_group": self.ep_group,
            "dspark.calibration.old_temperatures": list(event.old_temperatures),
            "dspark.calibration.new_temperatures": list(event.new_temperatures),
            "dspark.calibration.ece_before": event.ece_before,
            "dspark.calibration.ece_after": event.ece_after,
            "dspark.calibration.samples": event.num_samples})
        span.end()

    async def generate(self, request: ShardRequest) -> AsyncIterator[ShardChunk]:
        """Stream one choice. Bad input raises ValueError (the engine's check, naming the
        field), a full engine queue ``OverloadedError``, both before the first chunk."""
        from dspark.cluster.shard_stream import ChunkStream, Gather

        prompt_ids = self._prompt_ids(request)
        params = self._params(request, len(prompt_ids))
        stream = ChunkStream(self.texts, request, prompt_ids, params, self.replica_id)
        gather = Gather(request.stream_interval)
        req_id = f"{self.replica_id}-{next(self._ids)}"
        span = self._open_span(request, req_id, len(prompt_ids))
        try:
            async for out in self.engine.generate(prompt_ids, params, self.tokenizer.stop_ids,
                                                  req_id=req_id):
                chunk = gather.add(stream.push(out))
                if chunk is not None:
                    yield chunk
                if stream.done:
                    return  # NOTE: leaving the loop aborts the engine request
        finally:
            if span is not None:
                self._close_span(span, req_id, stream)

    def _open_span(self, request: ShardRequest, req_id: str, num_prompt: int):
        """The request's replica span, under the ingress's (None when not traced)."""
        if self.tracer is None or not request.trace_context:
            return None
        from dspark.cluster.tracing import extract

        span = self.tracer.start_span("dspark.replica", context=extract(request.trace_context),
                                      attributes={"dspark.replica": self.replica_id,
                                                  "dspark.ep_group": self.ep_group,
                                                  "dspark.request_id": req_id,
                                                  "gen_ai.usage.input_tokens": num_prompt})
        span.add_event("queued")
        self.step_events.open(req_id, span)
        return span

    def _close_span(self, span, req_id: str, stream) -> None:
        self.step_events.close(req_id, span)
        last = stream.last
        if last is not None:
            span.set_attribute("gen_ai.usage.output_tokens", last.completion_tokens)
            span.add_event("finish", {"finish_reason": last.finish_reason or "cancelled"})
        span.end()

    def _prompt_ids(self, request: ShardRequest) -> list[int]:
        if request.messages is not None:
            return self.tokenizer.render_chat(request.messages, add_generation_prompt=True)
        if request.prompt_ids is not None:
            return list(request.prompt_ids)
        return self.tokenizer.encode(request.prompt or "")

    def _params(self, request: ShardRequest, num_prompt: int):
        from dspark.models.generation import SamplingParams

        # NOTE: max_tokens is an upper bound; the context bounds generation too (what it
        # leaves after the prompt), ending with finish_reason "length". A prompt that
        # leaves nothing is the engine's error to report.
        room = max(1, self.context - num_prompt)
        max_tokens = 1 if request.max_tokens == 0 else min(request.max_tokens or room, room)
        logprobs = request.logprobs
        return SamplingParams(
            temperature=request.temperature, top_p=request.top_p, max_tokens=max_tokens,
            seed=request.seed, ignore_eos=request.ignore_eos,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, logit_bias=dict(request.logit_bias),
            # NOTE: at least min_tokens unless max_tokens or the context ends it first
            min_tokens=min(request.min_tokens, max_tokens), logprobs=logprobs,
            prompt_logprobs=logprobs if request.echo and logprobs is not None else None,
        )

    def load(self) -> dict:
        return {"replica_id": self.replica_id, **self.engine.load()}

    def status(self) -> dict:
        """The load, with the confidence head's calibration (for ``/v1/load``; the router
        and the board read ``load`` alone: the calibration scores its windows)."""
        return {**self.load(), "ep_group": self.ep_group, "calibration": self.calibration(),
                "board": self.board.state() if self.board is not None else None,
                "spec_decode_totals": self.metrics.totals() if self.metrics else None}

    def record_routing_stats(self) -> dict:
        return self.load()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What the board autoscaling policy reads (cluster/autoscaling.py): the tokens this
        replica owes over ``autoscaling_horizon_s``, and what it can deliver at its best
        batch."""
        from dspark.cluster.autoscaling import replica_stats

        table = self.engine.engine.cost_table
        return replica_stats(self.engine.load(), table.batch_sizes, table.steps_per_second,
                             self.cfg.max_num_seqs, horizon_s=self.cfg.autoscaling_horizon_s,
                             delivered_tps=self.delivered.rate())

    def check_health(self) -> None:
        if not self.engine.is_alive():
            failure = self.engine.failure
            raise RuntimeError(f"the engine loop stopped: {failure}" if failure is not None
                               else "the engine loop thread died")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if getattr(self, "board", None) is not None:
            self.board.close()


def _replica_id(shard: TargetShard) -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (direct construction in tools)
        return f"local-{id(shard):x}"
