"""The Ray Serve application: ``TargetShard`` replicas (``dspark.cluster.shard``) run the
engine; ``OpenAIIngress`` (``dspark.cluster.ingress``) is the OpenAI-compatible HTTP front
that streams their chunks; ``build_app`` binds the two with the serve configuration."""

from __future__ import annotations

from dspark.cluster.config import ServeConfig
from dspark.cluster.ingress import OpenAIIngress
from dspark.cluster.shard import TargetShard

__all__ = ["OpenAIIngress", "TargetShard", "app_builder", "build_app"]


def app_builder(args: dict):
    """The app of a Serve config file (``import_path: dspark.cluster.app:app_builder``,
    ``args``: the serve config's fields), as KubeRay's ``serveConfigV2`` deploys it."""
    return build_app(ServeConfig.from_dict(dict(args or {})))


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
            request_router_kwargs={"redis_url": cfg.redis_url, "cluster": cfg.cluster,
                                   "otlp_traces_endpoint": cfg.otlp_traces_endpoint,
                                   "trace_sample_ratio": cfg.trace_sample_ratio},
        )
    shard = TargetShard.options(
        num_replicas=cfg.replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus},
        **shutdown,
        **options,
    ).bind(cfg.to_dict())
    return OpenAIIngress.options(
        max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0.1},
        **shutdown,
    ).bind(shard, cfg.to_dict())
