"""`dspark serve`: a local Ray cluster, an embedded Redis (unless one is given), the Serve
application, a printed URL and curl; Ctrl-C stops all of it and leaves nothing running."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import replace

from dspark.cluster.config import ServeConfig


def curl_example(url: str, model: str) -> str:
    return (
        f"curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' -d "
        f"'{{\"model\": \"{model}\", \"stream\": true, \"max_tokens\": 64, \"messages\": "
        f"[{{\"role\": \"user\", \"content\": \"What is 7 * 8?\"}}]}}'"
    )


def start(cfg: ServeConfig, num_cpus: float | None = None, app_name: str = "dspark",
          route_prefix: str = "/"):
    """Start Ray, Redis (if needed) and the app; returns (cfg with redis_url, redis or None)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from dspark.cluster.app import build_app
    from dspark.router.redis_server import EmbeddedRedis

    redis = None
    if cfg.redis_url is None:
        redis = EmbeddedRedis().start()
        cfg = replace(cfg, redis_url=redis.url)
    try:
        if not ray.is_initialized():
            ray.init(num_cpus=num_cpus or max(2, os.cpu_count() or 2), include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(build_app(cfg), name=app_name, route_prefix=route_prefix)
    except BaseException:
        stop(redis)
        raise
    return cfg, redis


def stop(redis) -> None:
    try:
        import ray
        from ray import serve

        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    finally:
        if redis is not None:
            redis.stop()


def main(cfg: ServeConfig) -> int:
    print(f"starting dspark: model {cfg.model_name}, drafter {cfg.drafter}, budget "
          f"{cfg.budget}, {cfg.replicas} replica(s) ...", file=sys.stderr, flush=True)
    started = time.time()
    cfg, redis = start(cfg)
    url = f"http://{cfg.host}:{cfg.port}"
    print(f"ready in {time.time() - started:.0f} s: {url}  (OpenAI API: {url}/v1, load board: "
          f"{cfg.redis_url})", flush=True)
    print(curl_example(url, cfg.model_name), flush=True)
    print("Ctrl-C stops the server.", file=sys.stderr, flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        while not done.wait(1.0):
            pass
    finally:
        print("stopping ...", file=sys.stderr, flush=True)
        stop(redis)
    return 0
