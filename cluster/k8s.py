"""KubeRay manifests rendered from the serve config: the YAML users deploy is the config
``dspark serve`` runs (``dspark k8s render``).

One overlay per target machine:

- ``demo``: CPU pods, the committed demo checkpoints baked in the image, Redis in the
  cluster (Deployment + Service), metrics on Ray's port 8080;
- ``gpu``: H200-class GPU workers (``nvidia.com/gpu``, NCCL settings, a node selector and
  the GPU taint's toleration, shared memory for NCCL), the head without Serve replicas,
  Redis from an external URL held in a Secret, traces to an OpenTelemetry collector.

Every overlay renders: the RayService (its ``serveConfigV2`` deploys
``dspark.cluster.app:app_builder`` with the serve config as its args), Redis (or its
Secret), a ConfigMap with the Prometheus scrape config, and a ConfigMap with the Grafana
dashboards. ``tests/cluster/test_k8s.py`` validates them offline against the KubeRay CRDs,
Kubernetes' own schemas and Ray's ``ServeDeploySchema``, then deploys the same
``serveConfigV2`` on a local Ray cluster and asks it for a chat completion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from dspark.cluster.config import ServeConfig

RAY_VERSION = "2.60.0"
APP_ROOT = "/opt/dspark"
"""Where the image installs the repository (``k8s/Dockerfile``)."""
IMPORT_PATH = "dspark.cluster.app:app_builder"


@dataclass(frozen=True)
class Overlay:
    name: str
    image: str
    worker_group: str
    workers: int
    worker_cpu: str
    worker_memory: str
    gpus: int = 0
    head_serves: bool = True
    """The head takes Serve replicas (demo) or only the controller and the proxy (gpu)."""
    redis_secret: bool = False
    """Redis comes from an external URL in a Secret (else a Deployment in the cluster), and
    the API keys from another (``dspark-api-keys``): the secured, production-like overlay."""
    otlp_endpoint: str | None = None
    node_selector: tuple[tuple[str, str], ...] = ()


OVERLAYS = {
    "demo": Overlay("demo", f"dspark:0.1.0-ray{RAY_VERSION}-cpu", "cpu-group", 1, "2", "4Gi"),
    "gpu": Overlay("gpu", f"dspark:0.1.0-ray{RAY_VERSION}-cu128", "gpu-group", 2, "16",
                   "128Gi", gpus=1, head_serves=False, redis_secret=True,
                   otlp_endpoint="http://otel-collector:4318/v1/traces",
                   node_selector=(("nvidia.com/gpu.product", "NVIDIA-H200"),)),
}


def app_config(cfg: ServeConfig, overlay: Overlay) -> dict:
    """The serve config as the cluster runs it: container paths, the in-cluster services."""
    if overlay.gpus:
        # NOTE: one expert-parallel group over the GPU workers, one GPU per replica
        cfg = replace(cfg, replicas=overlay.workers, ep_size=overlay.workers,
                      replica_gpus=1.0, replica_cpus=8.0)
    cfg = replace(cfg, target=f"{APP_ROOT}/checkpoints/target",
                  redis_url=None if overlay.redis_secret else "redis://dspark-redis:6379/0",
                  otlp_traces_endpoint=overlay.otlp_endpoint or cfg.otlp_traces_endpoint,
                  metrics_export_port=None, host="0.0.0.0", port=8000)
    out = cfg.to_dict()
    if overlay.redis_secret:
        out["redis_url"] = "env:DSPARK_REDIS_URL"
        out["api_keys"] = ["env:DSPARK_API_KEYS"]
    else:  # NOTE: the in-cluster Redis asks for the password of the Secret dspark-redis
        out["redis_password"] = "env:DSPARK_REDIS_PASSWORD"
    return out


def serve_config_v2(cfg: ServeConfig, overlay: Overlay) -> dict:
    """The Ray Serve config KubeRay deploys (``ServeDeploySchema``)."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [{"name": "dspark", "route_prefix": "/", "import_path": IMPORT_PATH,
                          "args": app_config(cfg, overlay)}],
    }


def _container(overlay: Overlay, name: str, cpu: str, memory: str, gpus: int,
               ports: list[tuple[str, int]]) -> dict:
    limits = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    env = [{"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
           # NOTE: as `dspark serve` sets it (cluster/serve.py): Serve's traffic over gRPC
           {"name": "RAY_SERVE_USE_GRPC_BY_DEFAULT", "value": "1"}]
    if overlay.redis_secret:
        env += [{"name": "DSPARK_REDIS_URL", "valueFrom": {"secretKeyRef": {
                    "name": "dspark-redis", "key": "url"}}},
                {"name": "DSPARK_API_KEYS", "valueFrom": {"secretKeyRef": {
                    "name": "dspark-api-keys", "key": "keys"}}}]
    else:
        env += [redis_password_env("DSPARK_REDIS_PASSWORD")]
    if gpus:
        env += [{"name": "NCCL_SOCKET_IFNAME", "value": "eth0"},
                {"name": "NCCL_IB_DISABLE", "value": "0"},
                {"name": "NCCL_DEBUG", "value": "WARN"}]
    return {
        "name": name, "image": overlay.image, "imagePullPolicy": "IfNotPresent",
        "env": env, "resources": {"requests": dict(limits), "limits": limits},
        "ports": [{"name": n, "containerPort": p} for n, p in ports],
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }


def _pod(overlay: Overlay, container: dict, gpu: bool) -> dict:
    spec = {"containers": [container],
            "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]}
    if gpu:
        spec["nodeSelector"] = dict(overlay.node_selector)
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists",
                                "effect": "NoSchedule"}]
    return {"spec": spec}


def ray_service(cfg: ServeConfig, overlay: Overlay) -> dict:
    head_ports = [("gcs", 6379), ("dashboard", 8265), ("client", 10001), ("serve", 8000),
                  ("metrics", 8080)]
    head_start = {"dashboard-host": "0.0.0.0", "metrics-export-port": "8080"}
    if not overlay.head_serves:
        head_start.update({"num-cpus": "0", "num-gpus": "0"})
    worker_start = {"metrics-export-port": "8080"}
    if overlay.gpus:
        worker_start["num-gpus"] = str(overlay.gpus)
    head = _container(overlay, "ray-head", "2", "8Gi", 0, head_ports)
    worker = _container(overlay, "ray-worker", overlay.worker_cpu, overlay.worker_memory,
                        overlay.gpus, [("serve", 8000), ("metrics", 8080)])
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": f"dspark-{overlay.name}", "labels": {"app": "dspark"}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config_v2(cfg, overlay), sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": {"rayStartParams": head_start,
                                  "template": _pod(overlay, head, False)},
                "workerGroupSpecs": [{
                    "groupName": overlay.worker_group, "replicas": overlay.workers,
                    "minReplicas": overlay.workers, "maxReplicas": overlay.workers,
                    "rayStartParams": worker_start,
                    "template": _pod(overlay, worker, bool(overlay.gpus)),
                }],
            },
        },
    }


def redis_password_env(name: str) -> dict:
    """The variable ``name`` set from the Secret ``dspark-redis`` (key ``password``)."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": "dspark-redis",
                                                          "key": "password"}}}


def redis_objects(overlay: Overlay) -> list[dict]:
    """Redis for the load board: a Deployment asking for the password of the Secret
    ``dspark-redis`` (made by the user: docs/deploy.md), and its Service; or the Secret
    holding an external Redis URL (``rediss://`` with a password for a managed one)."""
    if overlay.redis_secret:
        return [{"apiVersion": "v1", "kind": "Secret",
                 "metadata": {"name": "dspark-redis", "labels": {"app": "dspark"}},
                 "type": "Opaque",
                 "stringData": {"url": "rediss://:CHANGE-ME@redis.example.internal:6380/0"}},
                {"apiVersion": "v1", "kind": "Secret",
                 "metadata": {"name": "dspark-api-keys", "labels": {"app": "dspark"}},
                 "type": "Opaque", "stringData": {"keys": "CHANGE-ME-1,CHANGE-ME-2"}}]
    labels = {"app": "dspark", "component": "redis"}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "dspark-redis", "labels": labels},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": {"containers": [{
                      "name": "redis", "image": "redis:7.2-alpine",
                      # NOTE: Kubernetes expands $(REDIS_PASSWORD) from the env below
                      "args": ["--save", "", "--appendonly", "no",
                               "--requirepass", "$(REDIS_PASSWORD)"],
                      "env": [redis_password_env("REDIS_PASSWORD")],
                      "ports": [{"name": "redis", "containerPort": 6379}],
                      "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                                    "limits": {"cpu": "500m", "memory": "256Mi"}},
                      "readinessProbe": {"tcpSocket": {"port": 6379}, "periodSeconds": 5},
                  }]}}}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "dspark-redis", "labels": labels},
         "spec": {"selector": labels, "ports": [{"name": "redis", "port": 6379,
                                                  "targetPort": 6379}]}},
    ]


def observability_objects() -> list[dict]:
    """The Prometheus scrape config for Ray's metrics ports and the Grafana dashboards."""
    from dspark.cluster.dashboards import DASHBOARDS, dashboard

    scrape = {"scrape_configs": [{
        "job_name": "ray", "kubernetes_sd_configs": [{"role": "pod"}],
        "relabel_configs": [
            {"source_labels": ["__meta_kubernetes_pod_label_ray_io_cluster"], "regex": ".+",
             "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "metrics",
             "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        ]}]}
    return [
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "dspark-prometheus", "labels": {"app": "dspark"}},
         "data": {"prometheus.yml": yaml.safe_dump(scrape, sort_keys=False)}},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "dspark-dashboards",
                      "labels": {"app": "dspark", "grafana_dashboard": "1"}},
         "data": {f"{uid}.json": json.dumps(dashboard(uid), indent=1) for uid in DASHBOARDS}},
    ]


def render(cfg: ServeConfig, overlay_name: str) -> list[dict]:
    """Every object of one overlay, in apply order."""
    if overlay_name not in OVERLAYS:
        raise ValueError(f"overlay must be one of {sorted(OVERLAYS)}, got {overlay_name!r}")
    overlay = OVERLAYS[overlay_name]
    return redis_objects(overlay) + observability_objects() + [ray_service(cfg, overlay)]


class _Plain(yaml.SafeDumper):
    """YAML without anchors and aliases (what people read and diff)."""

    def ignore_aliases(self, data) -> bool:
        return True


def write(cfg: ServeConfig, out: str | Path, overlays=tuple(OVERLAYS)) -> list[Path]:
    """``<out>/<overlay>/dspark.yaml`` per overlay (one multi-document file each)."""
    paths = []
    for name in overlays:
        path = Path(out) / name / "dspark.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        header = (f"# Rendered by `dspark k8s render --overlay {name}` from the serve config "
                  "(cluster/config.py);\n# edit the config and render again rather than "
                  "editing this file.\n")
        path.write_text(header + yaml.dump_all(render(cfg, name), Dumper=_Plain,
                                               sort_keys=False))
        paths.append(path)
    return paths
