"""The load board: every replica publishes its load and step-cost table to Redis; routers
and verification budgets read them through a local cache.

Keys (ARCHITECTURE.md; one cluster = one key prefix):
- ``dspark:{cluster}:replica:{replica_id}``: hash with a TTL, rewritten at most every
  ``min_interval_s``: running and queued requests, tokens scheduled last step, pending
  tokens (work still owed), free KV blocks, acceptance length, mean survival, step-cost
  table id, expert-parallel group, timestamp, schema version;
- ``dspark:{cluster}:costs:{table_id}``: the profiled SPS(B) table (JSON).

NOTE (stale load is safe): a reader never blocks on Redis. It serves its last snapshot,
drops entries older than the TTL, rejects entries of another schema version, and counts
failures; when Redis is unreachable the board is simply empty and callers fall back to
local information.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field

import redis

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2


def replica_key(cluster: str, replica_id: str) -> str:
    return f"dspark:{cluster}:replica:{replica_id}"


def costs_key(cluster: str, table_id: str) -> str:
    return f"dspark:{cluster}:costs:{table_id}"


@dataclass
class ReplicaLoad:
    replica_id: str
    running: int = 0
    queued: int = 0
    tokens_scheduled: int = 0
    """Verify tokens of the replica's last step."""
    pending_tokens: int = 0
    """Remaining max_tokens summed over the replica's live requests (work still owed)."""
    free_blocks: int = 0
    total_blocks: int = 0
    acceptance_length: float = 0.0
    mean_survival: float = 0.0
    cost_table_id: str = ""
    ep_group: str = ""
    timestamp: float = 0.0
    version: int = SCHEMA_VERSION

    def to_redis(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_redis(cls, raw: dict) -> ReplicaLoad:
        data = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes)
                else v for k, v in raw.items()}
        version = int(data.get("version", -1))
        if version != SCHEMA_VERSION:
            raise ValueError(f"load entry has schema version {version}, expected {SCHEMA_VERSION}")
        kinds = {f.name: f.type for f in cls.__dataclass_fields__.values()}
        out = {}
        for name, kind in kinds.items():
            if name not in data:
                raise ValueError(f"load entry lacks field {name!r}")
            value = data[name]
            out[name] = (int(value) if kind == "int" else float(value) if kind == "float"
                         else value)
        return cls(**out)


@dataclass(frozen=True)
class StepCosts:
    """A replica's profiled step-cost table as the board holds it (``costs:{table_id}``):
    target steps per second at each verify batch size (tokens per step)."""

    batch_sizes: tuple[int, ...]
    """Increasing verify batch sizes B that were measured."""
    steps_per_second: tuple[float, ...]
    """SPS at each B."""

    def __post_init__(self) -> None:
        if not self.batch_sizes or len(self.batch_sizes) != len(self.steps_per_second):
            raise ValueError("batch_sizes and steps_per_second must be non-empty, equal length")
        if any(b <= a for a, b in zip(self.batch_sizes, self.batch_sizes[1:])):
            raise ValueError("batch_sizes must be strictly increasing")
        if min(self.steps_per_second) <= 0:
            raise ValueError("steps_per_second must be positive")

    @classmethod
    def from_redis(cls, raw: bytes | str) -> StepCosts:
        data = json.loads(raw)
        if data.get("version") != SCHEMA_VERSION:
            raise ValueError(f"cost table has schema version {data.get('version')}, "
                             f"expected {SCHEMA_VERSION}")
        return cls(tuple(int(b) for b in data["batch_sizes"]),
                   tuple(float(s) for s in data["steps_per_second"]))

    def step_time(self, tokens: float) -> float:
        """Seconds of one step of ``tokens`` verify tokens: linear between the measured step
        times, flat below the smallest B, and beyond the largest B along the last segment's
        slope (a step of more tokens than were profiled costs more, not the same)."""
        sizes = self.batch_sizes
        times = [1.0 / s for s in self.steps_per_second]
        if tokens <= sizes[0] or len(sizes) == 1:
            return times[0] if tokens <= sizes[0] else times[0] * tokens / sizes[0]
        i = min(max(1, bisect.bisect_left(sizes, tokens)), len(sizes) - 1)
        slope = (times[i] - times[i - 1]) / (sizes[i] - sizes[i - 1])
        return max(times[i - 1], times[i - 1] + slope * (tokens - sizes[i - 1]))


@dataclass
class BoardConfig:
    redis_url: str
    cluster: str = "default"
    ttl_s: float = 2.0
    """Entries expire (and readers treat them as missing) after this many seconds."""
    min_interval_s: float = 0.1
    """A replica rewrites its entry at most this often."""
    refresh_s: float = 0.1
    """How often a reader refreshes its local cache."""

    def __post_init__(self) -> None:
        if self.ttl_s <= 0 or self.min_interval_s < 0 or self.refresh_s <= 0:
            raise ValueError("ttl_s and refresh_s must be > 0, min_interval_s >= 0")


def resolve_redis_url(url: str) -> str:
    """``url``, or, for ``env:NAME``, the URL in the environment variable NAME (how a
    Kubernetes Secret hands a password or a ``rediss://`` URL to every pod without the
    serve config, which Serve shows, ever holding it)."""
    if not url.startswith("env:"):
        return url
    name = url[4:]
    value = os.environ.get(name)
    if not value:
        raise ValueError(f"redis_url names the environment variable {name}, which is not set")
    return value


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(resolve_redis_url(url), socket_timeout=0.5,
                                socket_connect_timeout=0.5)


class BoardPublisher:
    """Writes one replica's load (and its cost table once); never raises into the caller."""

    def __init__(self, cfg: BoardConfig) -> None:
        self.cfg = cfg
        self.redis = _client(cfg.redis_url)
        self._last = 0.0
        self.failures = 0
        self._published_tables: set[str] = set()

    def publish(self, load: ReplicaLoad, force: bool = False) -> bool:
        now = time.time()
        if not force and now - self._last < self.cfg.min_interval_s:
            return False
        load.timestamp = now
        key = replica_key(self.cfg.cluster, load.replica_id)
        try:
            pipe = self.redis.pipeline()
            pipe.hset(key, mapping=load.to_redis())
            pipe.pexpire(key, int(self.cfg.ttl_s * 1000))
            pipe.execute()
        except redis.RedisError as exc:
            self.failures += 1
            logger.debug("load board publish failed: %s", exc)
            return False
        self._last = now
        return True

    def publish_costs(self, table_id: str, table: dict) -> bool:
        if table_id in self._published_tables:
            return True
        try:
            self.redis.set(costs_key(self.cfg.cluster, table_id),
                           json.dumps({"version": SCHEMA_VERSION, **table}))
        except redis.RedisError:
            self.failures += 1
            return False
        self._published_tables.add(table_id)
        return True

    def remove(self, replica_id: str) -> None:
        try:
            self.redis.delete(replica_key(self.cfg.cluster, replica_id))
        except redis.RedisError:
            self.failures += 1


@dataclass
class BoardSnapshot:
    loads: dict[str, ReplicaLoad] = field(default_factory=dict)
    fetched_at: float = 0.0
    ok: bool = False
    """False when the last refresh could not reach Redis."""


class BoardReader:
    """A local cache of every fresh replica entry, refreshed on a daemon thread."""

    def __init__(self, cfg: BoardConfig, start: bool = True) -> None:
        self.cfg = cfg
        self.redis = _client(cfg.redis_url)
        self._snapshot = BoardSnapshot()
        self._costs: dict[str, StepCosts] = {}
        self._bad_costs: set[str] = set()
        self.failures = 0
        self.rejected = 0
        self.ok_at = 0.0
        """Wall time of the last refresh that reached Redis (0: none yet)."""
        self._stop = threading.Event()
        self._thread = None
        if start:
            self._thread = threading.Thread(target=self._loop, name="dspark-board", daemon=True)
            self._thread.start()

    def refresh(self) -> BoardSnapshot:
        pattern = replica_key(self.cfg.cluster, "*")
        try:
            keys = list(self.redis.scan_iter(match=pattern, count=100))
            pipe = self.redis.pipeline()
            for key in keys:
                pipe.hgetall(key)
            raws = pipe.execute()
        except redis.RedisError:
            self.failures += 1
            self._snapshot = BoardSnapshot(self._snapshot.loads, self._snapshot.fetched_at, False)
            return self._snapshot
        loads = {}
        for raw in raws:
            if not raw:
                continue
            try:
                load = ReplicaLoad.from_redis(raw)
            except (ValueError, TypeError) as exc:
                self.rejected += 1
                logger.debug("load board entry rejected: %s", exc)
                continue
            loads[load.replica_id] = load
        self._snapshot = BoardSnapshot(loads, time.time(), True)
        self.ok_at = self._snapshot.fetched_at
        self._fetch_costs({load.cost_table_id for load in loads.values()}
                          - set(self._costs) - self._bad_costs)
        return self._snapshot

    def _fetch_costs(self, table_ids: set[str]) -> None:
        """Read the cost tables not read yet (a table id names one table for good: each is
        written once, by the replica that profiled it)."""
        table_ids.discard("")
        if not table_ids:
            return
        ids = sorted(table_ids)
        try:
            raws = self.redis.mget([costs_key(self.cfg.cluster, t) for t in ids])
        except redis.RedisError:
            self.failures += 1
            return
        for table_id, raw in zip(ids, raws):
            if raw is None:
                continue  # not published (yet): asked again at the next refresh
            try:
                self._costs[table_id] = StepCosts.from_redis(raw)
            except (ValueError, TypeError, KeyError) as exc:
                self.rejected += 1
                self._bad_costs.add(table_id)
                logger.debug("cost table %s rejected: %s", table_id, exc)

    def costs(self, table_id: str) -> StepCosts | None:
        """The cost table ``table_id`` (None when it has not been read)."""
        return self._costs.get(table_id)

    def fresh(self) -> dict[str, ReplicaLoad]:
        """Entries younger than the TTL (stale ones count as missing)."""
        now = time.time()
        return {rid: load for rid, load in self._snapshot.loads.items()
                if now - load.timestamp <= self.cfg.ttl_s}

    @property
    def reachable(self) -> bool:
        return self._snapshot.ok

    def close(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.cfg.refresh_s)
