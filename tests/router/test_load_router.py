"""The global router's ranking reads a real board, and in a running two-replica app it
routes from the board, keeps serving while Redis is down, and uses the board again after;
a request it cannot rank falls back to Serve's choice instead of waiting forever."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import httpx
import pytest
import redis

from dspark.router.board import BoardConfig, BoardPublisher, BoardReader, ReplicaLoad
from dspark.router.load_router import prefix_hash, prefix_key, rank, service_rate


def test_rank_prefers_the_replica_the_board_says_is_less_loaded(redis_server):
    cfg = BoardConfig(redis_server.url, cluster=f"rank-{uuid.uuid4().hex[:6]}", min_interval_s=0)
    pub = BoardPublisher(cfg)
    pub.publish(ReplicaLoad("busy", running=6, queued=2, pending_tokens=800, free_blocks=10,
                            total_blocks=100, acceptance_length=2.5), force=True)
    pub.publish(ReplicaLoad("idle", running=1, pending_tokens=100, free_blocks=90,
                            total_blocks=100, acceptance_length=2.0), force=True)
    pub.publish(ReplicaLoad("full", running=0, free_blocks=0, total_blocks=100,
                            acceptance_length=3.0), force=True)
    reader = BoardReader(cfg, start=False)
    reader.refresh()
    board = reader.fresh()
    in_flight = {"busy": 8, "idle": 1, "full": 0}  # the handle's own count of live requests
    tiers = rank(["busy", "full", "idle"], board, in_flight.get, prefix=None)
    assert [t[0] for t in tiers] == ["idle", "busy", "full"]
    assert service_rate(board["full"], 0) == 0.0  # no free KV: last
    # the count is the handle's (exact); the board says how much work each request owes
    tiers = rank(["busy", "idle"], board, {"busy": 1, "idle": 20}.get, prefix=None)
    assert tiers[0] == ["busy"]
    # a candidate without a fresh entry: fall back (None = one tier, shortest queue)
    assert rank(["busy", "ghost"], board, lambda rid: 0, prefix=None) is None


def test_remaining_work_outweighs_queue_length():
    """Two long requests in flight cost a new request more than three nearly done ones."""
    board = {
        "long": ReplicaLoad("long", running=2, pending_tokens=400, free_blocks=50,
                            total_blocks=100, acceptance_length=2.0),
        "short": ReplicaLoad("short", running=3, pending_tokens=30, free_blocks=50,
                             total_blocks=100, acceptance_length=2.0),
    }
    live = {"long": 2, "short": 3}.get
    assert rank(["long", "short"], board, live, None, length=16)[0] == ["short"]
    # when the three owe as much work each, they count in full: fewer requests win again
    board["short"].pending_tokens = 600
    assert rank(["long", "short"], board, live, None, length=16)[0] == ["long"]


def test_prefix_affinity_breaks_ties_consistently():
    load = ReplicaLoad("x", running=1, free_blocks=50, total_blocks=100, acceptance_length=2.0)
    board = {rid: ReplicaLoad(rid, **{k: v for k, v in vars(load).items()
                                      if k != "replica_id"}) for rid in "abcd"}
    picks = {rank(list("abcd"), board, lambda r: 1, prefix=f"prompt {i}")[0][0]
             for i in range(40)}
    assert len(picks) > 1  # different prefixes spread
    again = {rank(list("dcba"), board, lambda r: 1, prefix="same prompt")[0][0] for _ in range(5)}
    assert len(again) == 1  # the same prefix always meets the same replica


def test_a_lone_surrogate_prefix_hashes_and_ranks():
    """JSON allows "\\ud800", which has no UTF-8 encoding; such a prefix hashes and ranks."""
    assert prefix_hash("\ud800 hi") == prefix_hash("\ud800 hi")
    assert prefix_hash("\ud800 hi") != prefix_hash("\udbff hi")
    board = {rid: ReplicaLoad(rid, running=1, free_blocks=50, total_blocks=100,
                              acceptance_length=2.0) for rid in "ab"}
    tiers = rank(["a", "b"], board, lambda rid: 1, prefix="\ud800 hi")
    assert sorted(t[0] for t in tiers) == ["a", "b"]


def test_prefix_key_reads_every_shard_request_shape():
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    from dspark.cluster.payloads import Message, ShardRequest

    requests = [
        ShardRequest(messages=(Message("user", "hi"), Message("user", " there"))),
        ShardRequest(messages=(Message("user", ""),)),
        ShardRequest(prompt="a prompt"),
        ShardRequest(prompt_ids=(5, 6, 7)),
        ShardRequest(),
        "not a shard request",
    ]

    async def keys():  # a PendingRequest holds an asyncio future: made inside a loop
        return [prefix_key(PendingRequest(args=[r], kwargs={},
                                          metadata=RequestMetadata("r", "r")))
                for r in requests]

    assert asyncio.run(keys()) == ["hi there", None, "a prompt", "5,6,7", None, None]
    assert prefix_key(None) is None


@pytest.fixture(scope="module")
def routed_app(ray_cluster, served_app):
    """A second app: two replicas, the board router, its own Redis (stopped mid-test).

    NOTE: after ``served_app``, whose port the suite's one HTTP proxy then listens on."""
    from dspark.cluster.config import ServeConfig
    from dspark.cluster.serve import start
    from dspark.router.redis_server import EmbeddedRedis

    server = EmbeddedRedis().start()
    cfg = ServeConfig(replicas=2, redis_url=server.url, cluster="routed", max_num_seqs=4,
                      num_blocks=128, threads=1, replica_cpus=0.5, drafter="mtp",
                      budget="fixed", model_name="routed")
    from ray import serve

    cfg, _ = start(cfg, app_name="routed", route_prefix="/routed")
    yield cfg, server
    serve.delete("routed")
    server.stop()


def router_counters(url: str, mine: bool = False) -> dict:
    """The counters of the ingress's routers, or with ``mine`` of this process's (the
    router of the handles a test makes itself)."""
    client = redis.Redis.from_url(url, socket_timeout=1)
    out = {"board_decisions": 0, "fallbacks": 0}
    for key in client.scan_iter(match="dspark:routed:router:*"):
        if key.decode().startswith(f"dspark:routed:router:{os.getpid()}-") != mine:
            continue
        for k, v in client.hgetall(key).items():
            out[k.decode()] += int(v)
    return out


def ask(base: str, n: int) -> set[str]:
    replicas = set()
    for i in range(n):
        resp = httpx.post(f"{base}/v1/completions", timeout=60, json={
            "model": "routed", "prompt": f"Count to {i}", "max_tokens": 4, "temperature": 0})
        assert resp.status_code == 200, resp.text
        replicas.add(resp.headers["x-dspark-replica"])
    return replicas


def test_a_request_the_router_cannot_rank_is_still_answered(routed_app):
    """An exception inside ``choose_replicas`` would leave the request waiting forever (Serve
    drops the routing task), so any failure to rank falls back to Serve's choice, is counted
    in ``fallbacks``, and the request gets the replica's answer."""
    from ray import serve

    from dspark.cluster.payloads import Message, ShardChunk, ShardRequest

    cfg, server = routed_app
    handle = serve.get_deployment_handle("TargetShard", app_name="routed")

    def request(max_tokens) -> ShardRequest:
        return ShardRequest(messages=(Message("user", "hi"),), max_tokens=max_tokens,
                            temperature=0.0)

    async def answer(req: ShardRequest, timeout_s: float = 60.0):
        """The first chunk, or the exception the replica answered with."""
        stream = handle.options(stream=True).generate.remote(req)
        try:
            return await asyncio.wait_for(stream.__anext__(), timeout_s)
        except TimeoutError:
            raise AssertionError(f"no answer within {timeout_s} s: {req}") from None
        except Exception as exc:
            return exc
        finally:
            stream.cancel()

    assert isinstance(asyncio.run(answer(request(1))), ShardChunk)  # this process's router is up
    deadline = time.time() + 10  # it exports its counters every 0.25 s
    while time.time() < deadline:
        before = router_counters(server.url, mine=True)
        if before["board_decisions"]:
            break
        time.sleep(0.1)
    # ranking raises on a max_tokens that is not a number; the replica then says why
    reply = asyncio.run(answer(request("many")))
    assert isinstance(reply, Exception), reply
    assert isinstance(asyncio.run(answer(request(1))), ShardChunk)  # routing goes on
    deadline = time.time() + 10
    while router_counters(server.url, mine=True)["fallbacks"] <= before["fallbacks"]:
        assert time.time() < deadline, ("fallback not counted", before)
        time.sleep(0.1)


def test_router_uses_the_board_survives_redis_down_and_recovers(routed_app, served_app):
    cfg, server = routed_app
    base = f"http://{served_app.host}:{served_app.port}/routed"
    reader = BoardReader(BoardConfig(server.url, cluster="routed"), start=False)
    deadline = time.time() + 20
    while time.time() < deadline and len(reader.fresh()) < 2:
        reader.refresh()
        time.sleep(0.2)
    assert len(reader.fresh()) == 2, "both replicas publish their load"
    served = ask(base, 8)
    assert served <= set(reader.fresh())
    time.sleep(0.6)
    before = router_counters(server.url)
    assert before["board_decisions"] >= 8 and before["fallbacks"] == 0
    port = server.port
    server.stop()  # Redis goes away mid-test: serving goes on
    time.sleep(0.5)  # the router's reader notices within its refresh period (0.1 s)
    ask(base, 6)
    from dspark.router.redis_server import EmbeddedRedis

    restarted = EmbeddedRedis(port=port).start()
    try:
        time.sleep(2.5)  # replicas republish (heartbeat) and the router's cache refreshes
        ask(base, 6)
        time.sleep(0.6)
        after = router_counters(restarted.url)
        assert after["fallbacks"] >= 6
        assert after["board_decisions"] >= before["board_decisions"] + 6
    finally:
        restarted.stop()


def test_unknown_in_flight_count_falls_back_to_the_board():
    """Serve's queue-length cache forgets idle replicas; the board's count stands in."""
    board = {
        "a": ReplicaLoad("a", running=5, pending_tokens=500, free_blocks=50, total_blocks=100),
        "b": ReplicaLoad("b", running=1, pending_tokens=100, free_blocks=50, total_blocks=100),
    }
    assert rank(["a", "b"], board, lambda rid: None, None, length=100)[0] == ["b"]
