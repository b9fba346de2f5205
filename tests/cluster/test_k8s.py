"""The KubeRay manifests, checked offline as a platform team's CI would: the committed files
are what ``dspark k8s render`` writes; every RayService validates against the KubeRay CRD
(v1 ``openAPIV3Schema``), every plain object against Kubernetes' schemas, every
``serveConfigV2`` against Ray's ``ServeDeploySchema``; and the demo's ``serveConfigV2``,
deployed through Serve's declarative API (what KubeRay calls) on a fresh local Ray cluster,
answers a chat completion."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from dspark.cluster import k8s
from dspark.cluster.config import ServeConfig

ROOT = Path(__file__).resolve().parents[2]
# NOTE: the workspace's copy of the KubeRay CRDs (next to the repository; a clone elsewhere
# names it with DSPARK_K8S_SCHEMAS)
SCHEMAS = next((p for p in (Path(os.environ.get("DSPARK_K8S_SCHEMAS", "/nonexistent")),
                            ROOT.parent / "shared" / "k8s-schemas",
                            Path("/work/shared/k8s-schemas")) if p.is_dir()),
               ROOT.parent / "shared" / "k8s-schemas")
KUBERNETES = "1.33.0"


def manifests(overlay: str) -> list[dict]:
    return list(yaml.safe_load_all((ROOT / "k8s" / overlay / "dspark.yaml").read_text()))


def test_committed_manifests_are_the_rendered_ones(tmp_path):
    for path in k8s.write(ServeConfig(), tmp_path):
        committed = ROOT / "k8s" / path.parent.name / "dspark.yaml"
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale: run `dspark k8s render`")


def crd_schema(name: str) -> dict:
    crd = yaml.safe_load((SCHEMAS / name).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _defaults_not_required(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def _defaults_not_required(schema):
    """The API server fills defaults before it validates; jsonschema does not, so a
    property that has a default is not required here (the CRD marks minReplicas and
    maxReplicas both required and defaulted)."""
    if isinstance(schema, dict):
        props = schema.get("properties", {})
        if "required" in schema:
            schema["required"] = [r for r in schema["required"]
                                  if "default" not in props.get(r, {})]
        for value in schema.values():
            _defaults_not_required(value)
    elif isinstance(schema, list):
        for value in schema:
            _defaults_not_required(value)
    return schema


@pytest.fixture(scope="module")
def rayservice_schema():
    if not SCHEMAS.is_dir():
        pytest.skip(f"the KubeRay CRDs are not at {SCHEMAS}")
    return crd_schema("ray.io_rayservices.yaml")


@pytest.mark.parametrize("overlay", sorted(k8s.OVERLAYS))
def test_every_object_validates(overlay, rayservice_schema):
    docs = manifests(overlay)
    kinds = [d["kind"] for d in docs]
    assert kinds.count("RayService") == 1 and "ConfigMap" in kinds
    for doc in docs:
        if doc["kind"] == "RayService":
            errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in
                      jsonschema.Draft7Validator(rayservice_schema).iter_errors(doc)]
            assert not errors, errors
            config = yaml.safe_load(doc["spec"]["serveConfigV2"])
            from ray.serve.schema import ServeDeploySchema

            ServeDeploySchema.model_validate(config)
            app = config["applications"][0]
            ServeConfig.from_dict(app["args"])  # the app builder's args are a serve config
        else:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_a_mistake_in_a_manifest_is_caught(rayservice_schema):
    """The validation can fail: a number where KubeRay wants a string, a bad Service port."""
    service = next(d for d in manifests("gpu") if d["kind"] == "RayService")
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"][
        "num-gpus"] = 1
    errors = list(jsonschema.Draft7Validator(rayservice_schema).iter_errors(service))
    assert any("is not of type 'string'" in e.message for e in errors)
    redis = next(d for d in manifests("demo") if d["kind"] == "Service")
    redis["spec"]["ports"][0]["port"] = "six"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(redis, KUBERNETES, strict=True)


DEPLOY = r"""
import json, os, sys, time
import httpx, ray, yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema
from dspark.router.redis_server import EmbeddedRedis, free_port

config = yaml.safe_load(sys.argv[1])
redis = EmbeddedRedis().start()
port = free_port()
app = config["applications"][0]
app["args"].update(target=sys.argv[2], redis_url=redis.url, replica_cpus=0.5,
                   max_num_seqs=4, num_blocks=128, threads=1)
config["http_options"] = {"host": "127.0.0.1", "port": port}
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
try:
    serve.start(http_options=config["http_options"])
    serve.context._get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    deadline = time.time() + 240
    while True:
        status = serve.status().applications.get(app["name"])
        if status is not None and status.status == "RUNNING":
            break
        assert status is None or status.status not in ("DEPLOY_FAILED", "UNHEALTHY"), status
        assert time.time() < deadline, status
        time.sleep(0.2)
    reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
        "model": app["args"]["model_name"], "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "What is 7 * 8?"}]})
    print(json.dumps({"status": reply.status_code, "body": reply.json()}))
finally:
    serve.shutdown()
    ray.shutdown()
    redis.stop()
"""


def test_the_demo_serve_config_deploys_and_answers(tmp_path):
    """The demo RayService's ``serveConfigV2``, as KubeRay submits it (Serve's declarative
    ``deploy_apps``), on a fresh local Ray cluster in a subprocess; only what the cluster
    provides differs: the checkpoint path in the image, Redis, and a small engine."""
    service = next(d for d in manifests("demo") if d["kind"] == "RayService")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([sys.executable, "-P", "-c", DEPLOY, service["spec"]["serveConfigV2"],
                          str(ROOT / "checkpoints" / "target")],
                         capture_output=True, text=True, timeout=420, env=env, cwd=tmp_path)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    result = json.loads(lines[-1])
    assert result["status"] == 200, result
    assert result["body"]["choices"][0]["message"]["content"]
    assert result["body"]["usage"]["completion_tokens"] >= 1
