"""dspark on several Ray nodes of this machine, and a node lost under load.

    python -m dspark.bench.multinode [--groups 2] [--requests 48] [--concurrency 4] [--json out.json]

A ``ray.cluster_utils.Cluster`` of three nodes: a head with no room for a replica (one CPU:
Serve's controller, the HTTP proxy (head only) and the ingress, 0.1 CPU, pinned to the head
with ``ingress_on_head``) and two worker nodes of two CPUs. The app serves ``--groups``
expert-parallel groups of ep_size 2 (``TargetShard`` replicas of one CPU with one group,
half a CPU with more; each group one Serve gang placed PACK), with the load-board router
and the cluster budget, on an embedded Redis. Then:

1. it records where each replica runs and what the board holds (per replica: its node, its
   group; the router and the budget read them across nodes);
2. it starts ``--requests`` streamed greedy requests from ``--concurrency`` clients;
3. when a quarter of them have finished, it removes a worker node that hosts replicas (what
   a lost Kubernetes pod does);
4. every request is accounted for: ``ok`` (its stream ends with a finish reason and
   ``[DONE]``, and its text equals the same request served without faults), ``error``
   (an OpenAI error body, or an error chunk and ``[DONE]``), ``lost`` (a stream cut with
   neither, or no response), ``hung`` (no end within the deadline), ``wrong`` (a finished
   text that differs);
5. it waits until every group runs again on the remaining nodes and a request succeeds:
   the time to recover.

Prints one JSON document (and writes it to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from dspark.bench.streams import PROMPTS, stream_chat, wait_until

HEAD_CPUS, WORKER_CPUS, EP_SIZE = 1, 2, 2


def _stream(url: str, prompt: str, max_tokens: int, timeout_s: float,
            codes: list | None = None) -> tuple[str, str]:
    """(outcome, text) of one streamed greedy request (outcome as in the module doc, before
    the text check); the code of an error it got is appended to ``codes``."""
    reply = stream_chat(url, prompt, max_tokens, timeout_s, extra={"model": "multinode"})
    if codes is not None and reply.code:
        codes.append(reply.code)
    return reply.kind, reply.text


def _placement(app: str) -> dict[str, dict]:
    """Every live TargetShard replica of ``app`` on a live node: its node and pid (the state
    API may still call an actor of a removed node alive for a while)."""
    import ray
    from ray.util.state import list_actors

    live_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    out = {}
    for actor in list_actors(filters=[("class_name", "=", f"ServeReplica:{app}:TargetShard")],
                             limit=100):
        if actor.state == "ALIVE" and actor.node_id in live_nodes:
            out[actor.name.rsplit("#", 1)[1]] = {"node": actor.node_id, "pid": actor.pid}
    return out


def _ingress_nodes(app: str) -> list[str]:
    """The nodes of ``app``'s live ingress replicas."""
    from ray.util.state import list_actors

    return sorted({a.node_id for a in list_actors(
        filters=[("class_name", "=", f"ServeReplica:{app}:OpenAIIngress")], limit=100)
        if a.state == "ALIVE"})


def _board_groups(cfg, replicas: int) -> list[str]:
    """The expert-parallel groups on the board once every replica has published."""
    from dspark.router.board import BoardConfig, BoardReader

    reader = BoardReader(BoardConfig(cfg.redis_url, cluster=cfg.cluster), start=False)

    def board_full():
        reader.refresh()
        return len(reader.fresh()) >= replicas and reader.fresh()
    board = wait_until(board_full, 60, "every replica on the board")
    return sorted({load.ep_group for load in board.values()})


def _load_with_a_node_lost(cluster, victim, url: str, prompts: list[str],
                           expected: dict[str, str], concurrency: int,
                           max_tokens: int) -> tuple[dict, dict, float]:
    """The load, with ``victim`` removed once a quarter of it has finished: (outcome
    counts, error codes, the removal's time)."""
    done = threading.Semaphore(0)
    removed: dict = {}
    codes: list[str] = []

    def remove_after_a_quarter():
        for _ in range(max(1, len(prompts) // 4)):
            done.acquire()
        removed["at"] = time.monotonic()
        cluster.remove_node(victim, allow_graceful=False)

    def one(prompt):
        outcome, text = _stream(url, prompt, max_tokens, 180, codes)
        done.release()
        if outcome == "ok" and text != expected[prompt]:
            outcome = "wrong"
        return outcome

    remover = threading.Thread(target=remove_after_a_quarter, daemon=True)
    remover.start()
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(one, prompts))
    remover.join(timeout=60)
    return ({k: outcomes.count(k) for k in ("ok", "error", "lost", "hung", "wrong")},
            {c: codes.count(c) for c in sorted(set(codes))}, removed["at"])


def run(num_requests: int, concurrency: int, max_tokens: int, port: int, groups: int = 1
        ) -> dict:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from dspark.cluster.config import ServeConfig
    from dspark.cluster.serve import start, stop

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": HEAD_CPUS, "include_dashboard": True, "dashboard_port": None})
    workers = [cluster.add_node(num_cpus=WORKER_CPUS) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    cluster.wait_for_nodes()
    replicas = EP_SIZE * groups
    cfg = ServeConfig(model_name="multinode", replicas=replicas, ep_size=EP_SIZE,
                      drafter="dspark", budget="cluster", router="board", max_num_seqs=4,
                      num_blocks=128, threads=1, replica_cpus=1.0 if groups == 1 else 0.5,
                      port=port, cluster="multinode", ingress_on_head=True)
    redis = None
    try:
        # NOTE: the clients reach the cluster through the head's proxy, and the ingress
        # runs on the head too: a lost worker takes shards only. With a proxy on every
        # node, all three would share port 8123 of this one host, and the removed node's
        # proxy would take the connections the kernel gave it down with it.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1",
                                                              "port": port})
        cfg, redis = start(cfg)
        url = f"http://127.0.0.1:{port}"
        before = _placement("dspark")
        result: dict = {"nodes": {"head": cluster.head_node.node_id,
                                  "workers": [w.node_id for w in workers]},
                        "placement_before": before,
                        "ingress_nodes": _ingress_nodes("dspark"),
                        "board_groups": _board_groups(cfg, replicas)}
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num_requests)]
        expected = {p: _stream(url, p, max_tokens, 120)[1] for p in set(prompts)}
        victim = next(w for w in workers if any(r["node"] == w.node_id for r in before.values()))
        result["removed_node"] = victim.node_id
        result["outcomes"], result["error_codes"], removed_at = _load_with_a_node_lost(
            cluster, victim, url, prompts, expected, concurrency, max_tokens)

        def recovered():
            # NOTE: the removed node can still count as alive, with its actors, for a while
            # after it went (its heartbeats time out later under load): wait until no
            # replica is placed there
            placed = _placement("dspark")
            moved = all(r["node"] != victim.node_id for r in placed.values())
            return (len(placed) == replicas and moved and _stream(
                url, prompts[0], max_tokens, 120) == ("ok", expected[prompts[0]]) and placed)
        result["placement_after"] = wait_until(recovered, 300, "the group serving again", poll_s=1.0)
        result["recovery_s"] = round(time.monotonic() - removed_at, 1)
        return result
    finally:
        try:
            serve.shutdown()
        finally:
            stop(redis)
            ray.shutdown()
            cluster.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=1, help="expert-parallel groups")
    parser.add_argument("--requests", type=int, default=48, help="streamed requests")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent clients")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per request")
    parser.add_argument("--port", type=int, default=8123, help="HTTP port of the app")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    result = run(args.requests, args.concurrency, args.max_tokens, args.port, args.groups)
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
