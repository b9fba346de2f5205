"""One ``TargetShard`` replica on the load board: it publishes its load after every step
(rate-limited) and on a heartbeat while idle, with its step-cost table every third of the
TTL (so a Redis that restarted empty holds both again within a heartbeat), and, for the
cluster budget, reads what the rest of its expert-parallel group schedules.

NOTE: the reader exists before the engine is built (the engine takes ``group_reader``);
publishing starts once the engine runs (``start``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from dspark.router.board import BoardConfig, BoardPublisher, BoardReader, ReplicaLoad
from dspark.workers.budget import GroupLoad


class ReplicaBoard:
    """This replica's entry on the board (``replica_id``, in ``ep_group``)."""

    def __init__(self, redis_url: str, cluster: str, replica_id: str, ep_group: str,
                 read_group: bool, password: str | None = None) -> None:
        """``read_group``: also read the board, for ``group_load`` (the cluster budget);
        ``password``: the Redis password when the URL has none."""
        cfg = BoardConfig(redis_url, cluster=cluster, password=password)
        self.replica_id, self.ep_group = replica_id, ep_group
        self.publisher = BoardPublisher(cfg)
        self.reader = BoardReader(cfg) if read_group else None
        self._load: Callable[[], dict] | None = None
        self._closed = threading.Event()

    def group_load(self) -> GroupLoad:
        """What the other replicas of this expert-parallel group did in their last step
        (fresh entries only; nobody without a reader): each one's verify tokens, and the
        tokens they commit per step (running requests times their acceptance length)."""
        if self.reader is None:
            return GroupLoad()
        others = [load for rid, load in self.reader.fresh().items()
                  if load.ep_group == self.ep_group and rid != self.replica_id]
        return GroupLoad(tuple(load.tokens_scheduled for load in others),
                         sum(load.running * max(1.0, load.acceptance_length)
                             for load in others))

    def age(self) -> float | None:
        """Seconds since this replica last read the board (None: it does not read it, or
        has not yet)."""
        if self.reader is None or not self.reader.ok_at:
            return None
        return max(0.0, time.time() - self.reader.ok_at)

    @property
    def group_reader(self) -> Callable[[], GroupLoad] | None:
        """What the engine's cluster budget reads (``group_load``), or None when this board
        does not read the group."""
        return self.group_load if self.reader is not None else None

    def start(self, cost_table, load: Callable[[], dict],
              listeners: list[Callable]) -> None:
        """Publish ``cost_table`` (SPS(B)), then ``load()`` now, after every step (a
        listener appended to ``listeners``) and every third of the TTL while idle."""
        self._load = load
        self.publisher.publish_costs(self.replica_id, {
            "batch_sizes": list(cost_table.batch_sizes),
            "steps_per_second": list(cost_table.steps_per_second),
        })
        listeners.append(lambda _stats: self.publish())
        self.publish(force=True)
        threading.Thread(target=self._heartbeat, name="dspark-board-heartbeat",
                         daemon=True).start()

    def publish(self, force: bool = False) -> None:
        load = self._load
        if load is not None and not self._closed.is_set():
            self.publisher.publish(ReplicaLoad(self.replica_id, cost_table_id=self.replica_id,
                                               ep_group=self.ep_group, **load()), force=force)

    def _heartbeat(self) -> None:
        """An idle replica stays on the board."""
        while not self._closed.wait(self.publisher.cfg.ttl_s / 3):
            self.publish(force=True)

    def state(self) -> dict:
        """Whether this replica reaches Redis (for ``/v1/load``)."""
        return self.publisher.outage.state()

    def close(self) -> None:
        """Stop the heartbeat and take this replica off the board."""
        self._closed.set()
        self.publisher.remove(self.replica_id)
