"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``, in its own process, so
the suite's cluster is untouched): two expert-parallel gangs are placed (PACK: each on one
node where it fits), the ingress on the head, and they serve streamed requests with the
board router and the cluster budget; when a worker that hosts a gang is removed under load,
no request is lost or hung, every finished text is the greedy one, and both gangs serve
again from the remaining nodes (``bench/multinode.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from dspark.router.redis_server import free_port


def test_removing_a_node_under_load_loses_no_request_and_the_gang_moves(tmp_path):
    out = tmp_path / "multinode.json"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    # NOTE: 16 tokens a request are enough: the node goes when 4 of the 16 have finished,
    # and the requests started as those finished are still mid-stream then (cut on the lost
    # node, or served by the other gang); longer streams only lengthen every phase.
    proc = subprocess.run(
        [sys.executable, "-m", "dspark.bench.multinode", "--groups", "2", "--requests", "16",
         "--concurrency", "4", "--max-tokens", "16", "--port", str(free_port()),
         "--json", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    head, workers = result["nodes"]["head"], result["nodes"]["workers"]
    before = {r["node"] for r in result["placement_before"].values()}
    after = {r["node"] for r in result["placement_after"].values()}
    assert before <= {head, *workers} and result["removed_node"] in before
    assert after and result["removed_node"] not in after  # it came back elsewhere
    assert len(result["placement_after"]) == 4
    assert len(result["board_groups"]) == 2
    assert result["ingress_nodes"] == [head]
    outcomes = result["outcomes"]
    assert outcomes["lost"] == outcomes["hung"] == outcomes["wrong"] == 0, result
    assert outcomes["ok"] > 0 and sum(outcomes.values()) == 16
    assert set(result["error_codes"]) <= {"chunk replica_failed", "chunk expert_group_failed",
                                          "503 replica_failed", "503 expert_group_failed"}
