"""A ``TargetShard`` replica joins its expert-parallel group: a seat from the Redis
rendezvous (``dspark.router.rendezvous``), then the ``torch.distributed`` process group
(gloo on CPU, NCCL on GPU) and this rank's share of the experts."""

from __future__ import annotations

from dspark.cluster.config import ServeConfig


def join_expert_parallel_group(cfg: ServeConfig, target) -> tuple[str, object]:
    """(group name, process group) of this replica, with ``target``'s experts sharded to
    its rank."""
    import torch
    import torch.distributed as dist
    from ray.util import get_node_ip_address

    from dspark.router.rendezvous import join_group
    from dspark.workers.expert_parallel import shard_experts

    if not cfg.redis_url:
        raise ValueError("ep_size > 1 needs redis_url: the group meets through the load board")
    seat = join_group(cfg.redis_url, cfg.cluster, cfg.ep_size, get_node_ip_address())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=seat.init_method, rank=seat.rank,
                            world_size=seat.world_size)
    group = dist.group.WORLD
    shard_experts(target, group, seat.rank, seat.world_size)
    return seat.group, group
