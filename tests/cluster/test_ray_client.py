"""A platform team's batch job: another Python process connects to the running Ray cluster
and streams a completion through the app's ``DeploymentHandle`` (no HTTP), as the README
shows. Greedy, so its text equals the HTTP API's for the same request."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx

JOB = r"""
import json, sys
import ray
from ray import serve
from dspark.cluster.payloads import Message, ShardRequest

ray.init(address=sys.argv[1], log_to_driver=False)
handle = serve.get_deployment_handle("TargetShard", app_name="dspark")
request = ShardRequest(messages=(Message("user", sys.argv[2]),), max_tokens=24,
                       temperature=0.0)
chunks = list(handle.options(stream=True).generate.remote(request))
print(json.dumps({"text": "".join(c.text for c in chunks),
                  "finish_reason": chunks[-1].finish_reason,
                  "completion_tokens": chunks[-1].completion_tokens,
                  "pieces": len(chunks)}))
"""


def test_a_batch_job_in_another_process_streams_through_a_deployment_handle(
        ray_cluster, served_url):
    address = ray_cluster.get_runtime_context().gcs_address
    prompt = "What is 6 times 7?"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", JOB, address, prompt], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = json.loads(proc.stdout.strip().splitlines()[-1])
    resp = httpx.post(f"{served_url}/v1/chat/completions", timeout=120, json={
        "model": "dspark-demo", "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 24, "temperature": 0})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert job["text"] == choice["message"]["content"]
    assert job["finish_reason"] == choice["finish_reason"]
    assert job["completion_tokens"] == resp.json()["usage"]["completion_tokens"]
    assert job["pieces"] > 1  # streamed, not one final chunk
