"""The Ray Serve application: ``TargetShard`` replicas (``dspark.cluster.shard``) run the
engine; ``OpenAIIngress`` (``dspark.cluster.ingress``) is the OpenAI-compatible HTTP front
that streams their chunks; ``build_app`` binds the two with the serve configuration."""

from __future__ import annotations

from dspark.cluster.config import ServeConfig
from dspark.cluster.ingress import OpenAIIngress
from dspark.cluster.shard import TargetShard

__all__ = ["OpenAIIngress", "TargetShard", "app_builder", "build_app"]

PUSH_INTERVAL_S = 1.0
"""How often a replica pushes its autoscaling report under the board policy."""


def app_builder(args: dict):
    """The app of a Serve config file (``import_path: dspark.cluster.app:app_builder``,
    ``args``: the serve config's fields), as KubeRay's ``serveConfigV2`` deploys it."""
    return build_app(ServeConfig.from_dict(dict(args or {})))


HEAD_RESOURCE = "node:__internal_head__"
"""The resource Ray gives its head node alone (``ingress_on_head`` asks for a sliver)."""


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
                                   "redis_password": cfg.redis_password,
                                   "otlp_traces_endpoint": cfg.otlp_traces_endpoint,
                                   "trace_sample_ratio": cfg.trace_sample_ratio},
        )
    if cfg.ep_size > 1:
        options.update(gang_options(cfg))
    # NOTE: check_health fails once the engine loop has stopped; asked every 2 s (Serve's
    # default is 10) so that a broken replica is replaced within seconds
    options.setdefault("health_check_period_s", 2.0)
    scaling = replica_options(cfg)
    runtime_env = scaling.pop("runtime_env", None)
    shard = TargetShard.options(
        **scaling,
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus,
                           **({"runtime_env": runtime_env} if runtime_env else {})},
        **shutdown,
        **options,
    ).bind(cfg.to_dict())
    ingress = {"num_cpus": 0.1}
    if cfg.ingress_on_head:
        ingress["resources"] = {HEAD_RESOURCE: 0.001}
    return OpenAIIngress.options(
        max_ongoing_requests=1000,
        ray_actor_options=ingress,
        **shutdown,
    ).bind(shard, cfg.to_dict())


def gang_options(cfg: ServeConfig) -> dict:
    """An expert-parallel group is one Serve gang: placed together (PACK), restarted whole
    when a member fails (RESTART_GANG); health checked every 2 s, so a dead member is found
    within seconds, not Serve's default 10."""
    from ray.serve.config import (
        GangPlacementStrategy,
        GangRuntimeFailurePolicy,
        GangSchedulingConfig,
    )

    return {"gang_scheduling_config": GangSchedulingConfig(
        gang_size=cfg.ep_size, gang_placement_strategy=GangPlacementStrategy.PACK,
        runtime_failure_policy=GangRuntimeFailurePolicy.RESTART_GANG),
        "health_check_period_s": 2.0}


def replica_options(cfg: ServeConfig) -> dict:
    """A fixed number of replicas, or an autoscaling config (cluster/autoscaling.py)."""
    if cfg.autoscaling == "none":
        return {"num_replicas": cfg.replicas}
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

    bounds = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
              "initial_replicas": cfg.replicas, "upscale_delay_s": cfg.upscale_delay_s,
              "downscale_delay_s": cfg.downscale_delay_s}
    if cfg.autoscaling == "requests":
        # NOTE: Serve's default: ongoing requests per replica against a target (70 % of a
        # replica's batch), over its look-back window
        return {"autoscaling_config": AutoscalingConfig(
            **bounds, target_ongoing_requests=max(1.0, 0.7 * cfg.max_num_seqs))}
    from dspark.cluster.autoscaling import BoardAutoscaler

    # NOTE: Serve holds each decision for the delays, averages each replica's report over the
    # look-back window, and replicas push reports every second (Serve's default: 10 s);
    # metrics_interval_s (deprecated for the environment variable, which sets the push)
    # tells Serve's check that the window spans several pushes, and the handles push as often
    return {"autoscaling_config": AutoscalingConfig(
        **bounds, look_back_period_s=5.0, metrics_interval_s=PUSH_INTERVAL_S,
        policy=AutoscalingPolicy(policy_function=BoardAutoscaler,
                                 policy_kwargs={"group_size": cfg.ep_size})),
        "runtime_env": {"env_vars": {
            "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": str(PUSH_INTERVAL_S)}}}
