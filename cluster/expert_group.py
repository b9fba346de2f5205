"""A ``TargetShard`` replica joins its expert-parallel group: its seat, then the
``torch.distributed`` process group (gloo on CPU, NCCL on GPU) and this rank's share of the
experts.

The group is a Ray Serve gang (``GangSchedulingConfig``, ``RESTART_GANG``: see
``cluster.app``): Serve places its ep_size replicas together, gives each its rank, and when
one member dies it stops the others and starts the whole gang again, which meets again
here. The gang's master address goes through Redis (``router.rendezvous.join_gang``). A
replica that Serve did not start as a gang member (no gang context) takes the next seat of
the Redis rendezvous instead (``join_group``).
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

from dspark.cluster.config import ServeConfig

COLLECTIVE_TIMEOUT_S = 120.0
"""How long a collective waits for a peer before it fails (then the engine loop stops, the
replica's health check fails, and Serve restarts the gang): longer than any step."""


def gang_context():
    """This replica's Serve gang context (None when it is not a gang member)."""
    try:
        from ray import serve

        return getattr(serve.get_replica_context(), "gang_context", None)
    except Exception:  # NOTE: outside a replica
        return None


def gang_name(ctx) -> str:
    """This incarnation of the gang: its id and its members (new replicas, new name)."""
    members = ",".join(ctx.member_replica_ids)
    return f"{ctx.gang_id}-{hashlib.sha1(members.encode()).hexdigest()[:12]}"


def join_expert_parallel_group(cfg: ServeConfig, target) -> tuple[str, object]:
    """(group name, process group) of this replica, with ``target``'s experts sharded to
    its rank."""
    import torch
    import torch.distributed as dist
    from ray.util import get_node_ip_address

    from dspark.router.rendezvous import join_gang, join_group
    from dspark.workers.expert_parallel import shard_experts

    if not cfg.redis_url:
        raise ValueError("ep_size > 1 needs redis_url: the group meets through the load board")
    ctx = gang_context()
    if ctx is not None and ctx.world_size == cfg.ep_size:
        seat = join_gang(cfg.redis_url, cfg.cluster, gang_name(ctx), ctx.rank, ctx.world_size,
                         get_node_ip_address(), password=cfg.redis_password)
    else:
        seat = join_group(cfg.redis_url, cfg.cluster, cfg.ep_size, get_node_ip_address(),
                          password=cfg.redis_password)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=seat.init_method, rank=seat.rank,
                            world_size=seat.world_size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    group = dist.group.WORLD
    shard_experts(target, group, seat.rank, seat.world_size)
    return seat.group, group
