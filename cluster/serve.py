"""`dspark serve`: a local Ray cluster, an embedded Redis (unless one is given), the Serve
application, a printed URL and curl; Ctrl-C stops all of it and leaves nothing running. A
start that fails prints one line (``dspark serve: cannot start: <reason>``) and leaves
nothing running either."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from dspark.cluster.config import ServeConfig
from dspark.cluster.start_guard import STATUS, SigtermGuard, kill_descendants
from dspark.workers.modes import BudgetMode

READY_TIMEOUT_S = 900.0
"""How long the app may take to load its replicas before the start counts as failed."""


def curl_example(url: str, model: str, keyed: bool = False) -> str:
    """A streamed chat request to paste (``keyed``: with a key from ``$DSPARK_API_KEY``)."""
    auth = "-H \"Authorization: Bearer $DSPARK_API_KEY\" " if keyed else ""
    return (
        f"curl -N {url}/v1/chat/completions {auth}-H 'Content-Type: application/json' -d "
        f"'{{\"model\": \"{model}\", \"stream\": true, \"max_tokens\": 64, \"messages\": "
        f"[{{\"role\": \"user\", \"content\": \"What is 7 * 8?\"}}]}}'"
    )


def local_cpus() -> int:
    return max(2, os.cpu_count() or 2)


@contextmanager
def quiet_serve_logs():
    """Hide Ray Serve's driver-side INFO lines while starting and stopping.

    NOTE: ``serve.run`` and ``serve.run_many`` always call Serve's own start; after our
    ``serve.start`` (the only way to give the HTTP host and port) it finds the controller we
    just made and logs
    "Connecting to existing Serve app ... will not be applied" on a brand-new cluster. Its
    "Started Serve" and "Application ... is ready" lines repeat what dspark prints itself.
    Warnings and errors still show."""
    serve_logger = logging.getLogger("ray.serve")
    level = serve_logger.level
    serve_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        serve_logger.setLevel(level)


def start(cfg: ServeConfig, num_cpus: float | None = None, app_name: str = "dspark",
          route_prefix: str = "/", on_ray_init: Callable[[], None] | None = None):
    """Start Ray, Redis (if needed) and the app and return once every replica is up;
    returns (cfg with redis_url, redis or None). On failure everything started is stopped.

    Without a Ray connection in this process it starts a new local cluster (never one that
    RAY_ADDRESS or ``ray start`` points at), which ``stop`` ends."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # NOTE: Serve's proxy and handles reach replicas over gRPC instead of Ray's actor calls
    # and object streams: a streamed event costs less on the way to the client (docs/serving.md,
    # session 21). Read by every Serve process of the cluster this call starts; 0 opts out.
    os.environ.setdefault("RAY_SERVE_USE_GRPC_BY_DEFAULT", "1")
    import ray
    from ray import serve

    from dspark.cluster.app import build_app
    from dspark.router.redis_server import EmbeddedRedis

    redis = None
    if cfg.redis_url is None:
        redis = EmbeddedRedis().start().supervise()
        cfg = replace(cfg, redis_url=redis.url)
    try:
        if not ray.is_initialized():
            ray.init(address="local", num_cpus=num_cpus or local_cpus(),
                     include_dashboard=False, log_to_driver=False, configure_logging=False,
                     _metrics_export_port=cfg.metrics_export_port)
            if on_ray_init is not None:
                on_ray_init()
        from dspark.cluster import drain

        drain.clear(app_name)  # NOTE: an earlier drain of the same app on this cluster
        with quiet_serve_logs():
            serve.start(http_options={"host": cfg.host, "port": cfg.port})
            serve.run_many([serve.RunTarget(build_app(cfg), name=app_name,
                                            route_prefix=route_prefix)],
                           wait_for_applications_running=False)
        wait_until_running(app_name)
    except BaseException:
        stop(redis)
        raise
    return cfg, redis


def wait_until_running(app_name: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll until every replica of the app is up (what ``serve.run`` waits for, but polled
    every 0.1 s rather than every 1 s)."""
    from ray import serve

    deadline = time.time() + timeout_s
    while True:
        app = serve.status().applications.get(app_name)
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(deploy_failure(app_name, app))
        if time.time() > deadline:
            raise TimeoutError(f"application {app_name!r} not running after {timeout_s:.0f} s"
                               + (f": {app.message}" if app is not None and app.message else ""))
        time.sleep(0.1)


def deploy_failure(app_name: str, app) -> str:
    """Which deployment failed and why: the last line of its replica's traceback."""
    for name, deployment in app.deployments.items():
        lines = [line.strip() for line in (deployment.message or "").splitlines() if line.strip()]
        if deployment.status in ("DEPLOY_FAILED", "UNHEALTHY") and lines:
            return f"{name} failed to start: {lines[-1]}"
    return f"application {app_name!r} failed to deploy: {app.message}"


def app_url(cfg: ServeConfig, route_prefix: str = "/") -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(cfg.host, cfg.host)
    return f"http://{host}:{cfg.port}{route_prefix.rstrip('/')}"


def wait_until_answers(url: str, timeout_s: float = 60.0) -> None:
    """Poll ``/health`` until the HTTP proxy routes to the app and a shard serves (200).

    NOTE: ``/health``, not ``/v1/models``: it asks for no API key (an app served with keys
    answers ``/v1/models`` 401 without one)."""
    import httpx

    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"{url}/health did not answer within {timeout_s:.0f} s")
        time.sleep(0.1)


def stop(redis) -> None:
    """Delete the Serve apps (their replicas drain), end the Ray cluster ``start`` started,
    stop the embedded Redis.

    NOTE: not ``serve.shutdown()``: its call to the Serve controller never returns by
    design (the controller kills itself), and as that call is retried forever Ray prints
    "Task ServeController.graceful_shutdown failed ... killed by ray.kill" on every stop.
    Ending the local cluster ends the controller and the HTTP proxy with it."""
    try:
        import ray
        from ray import serve

        if ray.is_initialized():
            try:
                if cluster_answers(ray):
                    with quiet_serve_logs():
                        delete_apps(serve)
                else:  # NOTE: a SIGTERM to the process group ended Ray's processes, not all
                    end_cluster()
            finally:
                ray.shutdown()
    finally:
        if redis is not None:
            redis.stop()


def cluster_answers(ray, timeout_s: float = 1.0) -> bool:
    """Whether this process is connected to a cluster whose GCS accepts a connection (a
    Serve call to a GCS that is gone waits 60 s, then ends the process)."""
    if not ray.is_initialized():  # NOTE: asking for the runtime context would start one
        return False
    host, port = ray.get_runtime_context().gcs_address.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def end_cluster() -> None:
    """Kill what is left of the cluster this process started, the embedded Redis aside: a
    GCS and raylet that no longer answer, and the actors and workers they started."""
    from dspark.router.redis_server import EmbeddedRedis

    kill_descendants({r.proc.pid for r in list(EmbeddedRedis.running) if r.proc is not None})


def delete_apps(serve, timeout_s: float = 60.0) -> None:
    names = list(serve.status().applications)
    for name in names:
        serve.delete(name, _blocking=False)
    deadline = time.time() + timeout_s
    while serve.status().applications and time.time() < deadline:
        time.sleep(0.1)


def check_startable(cfg: ServeConfig) -> None:
    """Fail fast, before anything starts, on what would otherwise fail minutes in."""
    for what, path in (("target", cfg.target), ("drafter", cfg.drafter_path),
                       ("light_drafter", cfg.light_drafter_path)):
        if path is not None and not (Path(path) / "config.json").is_file():
            raise ValueError(f"{what} checkpoint {path!r} not found (no config.json in it)")
    if (cfg.drafter_path is not None and cfg.budget_mode.needs_confidence
            and not cfg.drafter_has_confidence):
        raise ValueError(f"budget {cfg.effective_budget!r} needs a drafter with a confidence head "
                         f"(dspark); {cfg.drafter!r} has none: use --budget fixed")
    if cfg.light_drafter_path is not None and cfg.budget_mode not in (
            BudgetMode.CLUSTER, BudgetMode.ALGORITHM1, BudgetMode.TOPK):
        raise ValueError(f"light_drafter needs a gated budget (cluster, algorithm1 or topk); "
                         f"budget is {cfg.effective_budget!r}")
    most = cfg.max_replicas if cfg.autoscaling != "none" else cfg.replicas
    needed = most * cfg.replica_cpus + 0.1  # + the ingress
    if needed > local_cpus():
        raise ValueError(f"{most} replicas of {cfg.replica_cpus} CPU need {needed:g} "
                         f"CPUs; this machine has {local_cpus()}")
    if cfg.port:
        with socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server
            try:
                sock.bind((cfg.host, cfg.port))
            except OSError as exc:
                raise ValueError(f"cannot listen on {cfg.host}:{cfg.port} "
                                 f"({exc.strerror or exc})") from None


def failure_reason(exc: BaseException) -> str:
    """One line for the user: the root cause's message, without Ray's wrapping, colours or
    traceback (a message of several lines gives its first and last)."""
    cause = getattr(exc, "cause", None)  # Ray's task and actor errors carry the remote one
    if isinstance(cause, BaseException):
        exc = cause
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def start_local(cfg: ServeConfig, on_ray_init: Callable[[], None] | None = None):
    """``start`` on a new local cluster, then wait until the app answers over HTTP on its
    port; on any failure everything is stopped before the exception propagates."""
    check_startable(cfg)
    cfg, redis = start(cfg, num_cpus=local_cpus(), on_ray_init=on_ray_init)
    try:
        wait_until_answers(app_url(cfg))
    except BaseException:
        stop(redis)
        raise
    return cfg, redis


def start_guard() -> SigtermGuard:
    """SIGTERM stops the start-up as Ctrl-C does, and ends the process when Ray's GCS is
    gone under a main thread waiting on it (``start_guard`` module)."""
    import ray

    from dspark.router.redis_server import EmbeddedRedis

    def on_exit():
        end_cluster()
        EmbeddedRedis.stop_all()

    return SigtermGuard(lambda: cluster_answers(ray), on_exit).install()


def observability_line(cfg: ServeConfig) -> str:
    """Where the metrics and the traces go (docs/observability.md)."""
    import ray

    metrics = "off"
    if cfg.metrics:
        ports = [n.get("MetricsExportPort") for n in ray.nodes() if n.get("Alive")]
        metrics = ", ".join(f"http://{cfg.host}:{p}/metrics" for p in ports if p) or "on"
    traces = cfg.otlp_traces_endpoint or "off (--otlp-traces-endpoint URL)"
    return f"metrics (Prometheus): {metrics}; traces (OTLP): {traces}"


def main(cfg: ServeConfig) -> int:
    # NOTE: token authentication is Ray's default for a new local cluster; choosing it
    # explicitly keeps it and spares the warning Ray prints when the mode is unset. Only
    # before Ray is imported: the process caches the mode then, and a later change would
    # leave it unable to authenticate to the cluster it starts.
    if "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    light = cfg.light_drafter_path
    drafters = cfg.drafter + (f" (light: {Path(light).name})" if light else "")
    print(f"starting dspark: model {cfg.model_name}, drafter {drafters}, budget "
          f"{cfg.effective_budget}, {cfg.replicas} replica(s) ...", file=sys.stderr, flush=True)
    started, guard = time.time(), start_guard()
    try:
        try:
            cfg, redis = start_local(cfg, on_ray_init=guard.handle)
        except (KeyboardInterrupt, SystemExit) as exc:  # NOTE: Ray's own handler, while
            # ``ray.init`` runs, exits with the signal's number; Ray's calls may raise a
            # plain KeyboardInterrupt for ``Terminated``
            end_cluster()  # NOTE: what a ``ray.init`` stopped midway started and left
            if not (guard.taken.is_set() or getattr(exc, "code", None) == signal.SIGTERM):
                raise
            print("dspark serve: stopped while starting (SIGTERM)", file=sys.stderr,
                  flush=True)
            return STATUS
        except Exception as exc:
            print(f"dspark serve: cannot start: {failure_reason(exc)}", file=sys.stderr,
                  flush=True)
            return 1
        return serve_until_signal(cfg, redis, started)
    finally:
        guard.close()


def serve_until_signal(cfg: ServeConfig, redis, started: float) -> int:
    """Print where the server answers, wait for SIGINT or SIGTERM, drain (unless Ray's
    GCS is gone), stop."""
    import ray

    from dspark.router.redis_link import redact

    signals = threading.Semaphore(0)
    try:  # NOTE: the drain's handlers before "ready": a signal from then on drains
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: signals.release())
        url = app_url(cfg)
        print(f"ready in {time.time() - started:.0f} s: {url}  (OpenAI API: {url}/v1, load "
              f"board: {redact(cfg.redis_url)})", flush=True)
        print(curl_example(url, cfg.model_name, bool(cfg.api_keys)), flush=True)
        print(observability_line(cfg), flush=True)
        print("Ctrl-C stops the server (twice: without waiting for requests in flight).",
              file=sys.stderr, flush=True)
        while not signals.acquire(timeout=1.0):
            pass
        if cluster_answers(ray):
            drain_requests(cfg, lambda: signals.acquire(blocking=False))
        else:  # NOTE: a signal to the process group ended Ray's processes too
            print("no drain: Ray's processes have ended", file=sys.stderr, flush=True)
    finally:
        print("stopping ...", file=sys.stderr, flush=True)
        stop(redis)
    return 0


def drain_requests(cfg: ServeConfig, again, app_name: str = "dspark") -> None:
    """Refuse new requests and give those in flight ``cfg.drain_timeout_s`` to finish
    (``cluster.drain``); ``again()`` true (a second signal) stops waiting."""
    from ray import serve

    from dspark.cluster import drain

    try:
        status = serve.status().applications[app_name].deployments["OpenAIIngress"]
        ingresses = sum(n for state, n in status.replica_states.items()
                        if str(state).endswith("RUNNING"))
        deadline = drain.begin(app_name, cfg.drain_timeout_s)
    except Exception as exc:  # NOTE: nothing to drain (the app is gone): stop
        print(f"no drain: {failure_reason(exc)}", file=sys.stderr, flush=True)
        return
    print(f"draining: new requests get 503; requests in flight have up to "
          f"{cfg.drain_timeout_s:g} s", file=sys.stderr, flush=True)
    held = drain.wait(app_name, deadline, max(1, ingresses), again)
    if any(held.values()):
        print(f"drain: {sum(held.values())} request(s) still held at the deadline",
              file=sys.stderr, flush=True)
