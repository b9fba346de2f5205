"""The load board: every replica publishes its load and step-cost table to Redis; routers
and verification budgets read them through a local cache.

Keys (ARCHITECTURE.md; one cluster = one key prefix):
- ``dspark:{cluster}:replica:{replica_id}``: hash with a TTL, rewritten at most every
  ``min_interval_s``: running and queued requests, tokens scheduled last step, pending
  tokens (work still owed), free KV blocks, acceptance length, mean survival, step-cost
  table id, expert-parallel group, timestamp, schema version;
- ``dspark:{cluster}:costs:{table_id}``: the profiled SPS(B) table (JSON), with a longer
  TTL, rewritten every third of the entries' TTL.

NOTE (stale load is safe): a reader never blocks on Redis. It serves its last snapshot,
drops entries older than the TTL, rejects entries of another schema version or out of their
ranges (a malformed or hostile entry cannot crash the reader or push a score past what a
real replica could report), and counts failures; when Redis is unreachable the board is
simply empty and callers fall back to local information. An outage is logged once when it
starts and once when it ends (router/redis_link.py).
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field

import redis

from dspark.router.redis_link import Outage, redis_client, resolve_redis_url

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
    def from_redis(cls, raw: dict, key: str | None = None,
                   now: float | None = None) -> ReplicaLoad:
        """The entry ``raw`` read from ``key``; ValueError for one of another schema, with a
        field missing, out of its range (``LIMITS``) or not finite, a timestamp in the
        future, or a replica id that is not the one its key names (an entry cannot speak
        for another replica)."""
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
            out[name] = _field(name, kind, data[name])
        load = cls(**out)
        if key is not None and not key.endswith(f":replica:{load.replica_id}"):
            raise ValueError(f"load entry under {key!r} names replica {load.replica_id!r}")
        if load.free_blocks > load.total_blocks:
            raise ValueError(f"free_blocks {load.free_blocks} > total_blocks "
                             f"{load.total_blocks}")
        if load.timestamp > (now or time.time()) + MAX_CLOCK_SKEW_S:
            raise ValueError(f"timestamp {load.timestamp} is in the future")
        return load


MAX_COUNT = 1 << 24
"""Largest count a load entry may hold (requests, tokens, blocks)."""
MAX_CLOCK_SKEW_S = 1.0
"""How far in the future an entry's timestamp may lie (clocks of a cluster's nodes differ a
little; an entry from the future would stay fresh past its TTL)."""
MAX_ID_CHARS = 256
LIMITS = {"acceptance_length": (0.0, 64.0), "mean_survival": (0.0, 1.0),
          "timestamp": (0.0, 1e11)}
"""Allowed [low, high] of each float field of a load entry; ints lie in [0, MAX_COUNT]."""


def _field(name: str, kind: str, value: str) -> int | float | str:
    """One field of a load entry, parsed and checked against its range."""
    if kind == "str":
        if len(value) > MAX_ID_CHARS:
            raise ValueError(f"{name} is longer than {MAX_ID_CHARS} characters")
        return value
    number = int(value) if kind == "int" else float(value)
    low, high = LIMITS.get(name, (0, MAX_COUNT))
    if not low <= number <= high:  # NOTE: false for NaN too
        raise ValueError(f"{name}={value!r} is outside [{low}, {high}]")
    return number


MIN_SPS, MAX_SPS = 1e-3, 1e7
"""Allowed range of a cost table's steps per second."""
MAX_TABLE_ROWS, MAX_TABLE_BYTES = 256, 64 * 1024


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
        if not all(MIN_SPS <= s <= MAX_SPS for s in self.steps_per_second):
            raise ValueError(f"steps_per_second must lie in [{MIN_SPS}, {MAX_SPS}]")
        if len(self.batch_sizes) > MAX_TABLE_ROWS or not (
                1 <= self.batch_sizes[0] and self.batch_sizes[-1] <= MAX_COUNT):
            raise ValueError(f"at most {MAX_TABLE_ROWS} batch sizes, in [1, {MAX_COUNT}]")

    @classmethod
    def from_redis(cls, raw: bytes | str) -> StepCosts:
        if len(raw) > MAX_TABLE_BYTES:
            raise ValueError(f"cost table is larger than {MAX_TABLE_BYTES} bytes")
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("cost table is not a JSON object")
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
    password: str | None = None
    """Redis password (or ``env:NAME``) when the URL has none (router/redis_link.py)."""

    def __post_init__(self) -> None:
        if self.ttl_s <= 0 or self.min_interval_s < 0 or self.refresh_s <= 0:
            raise ValueError("ttl_s and refresh_s must be > 0, min_interval_s >= 0")


class BoardPublisher:
    """Writes one replica's load and its step-cost table; never raises into the caller.

    The cost table is written again every third of the TTL (it expires after
    ``COSTS_TTL_TTLS`` TTLs) and right after an outage: a Redis that restarted empty, or
    another Redis behind the same address, holds everything again within a heartbeat."""

    def __init__(self, cfg: BoardConfig) -> None:
        self.cfg = cfg
        self.redis = redis_client(cfg.redis_url, cfg.password)
        self.outage = Outage("board publisher", resolve_redis_url(cfg.redis_url))
        self._last = 0.0
        self._costs: dict[str, str] = {}
        self._costs_at = 0.0

    @property
    def failures(self) -> int:
        return self.outage.failures

    def publish(self, load: ReplicaLoad, force: bool = False) -> bool:
        now = time.time()
        if not force and now - self._last < self.cfg.min_interval_s:
            return False
        load.timestamp = now
        key = replica_key(self.cfg.cluster, load.replica_id)
        costs_due = self.outage.down or now - self._costs_at >= self.cfg.ttl_s / 3
        try:
            pipe = self.redis.pipeline()
            pipe.hset(key, mapping=load.to_redis())
            pipe.pexpire(key, int(self.cfg.ttl_s * 1000))
            if costs_due:
                self._write_costs(pipe)
            pipe.execute()
        except redis.RedisError as exc:
            self.outage.failed(exc)
            return False
        self.outage.succeeded()
        self._last = now
        if costs_due:
            self._costs_at = now
        return True

    def _write_costs(self, pipe) -> None:
        ttl_ms = int(self.cfg.ttl_s * COSTS_TTL_TTLS * 1000)
        for table_id, text in self._costs.items():
            pipe.set(costs_key(self.cfg.cluster, table_id), text, px=ttl_ms)

    def publish_costs(self, table_id: str, table: dict) -> bool:
        """Keep ``table`` as ``table_id`` on the board (written now and with the load)."""
        self._costs[table_id] = json.dumps({"version": SCHEMA_VERSION, **table})
        try:
            pipe = self.redis.pipeline()
            self._write_costs(pipe)
            pipe.execute()
        except redis.RedisError as exc:
            self.outage.failed(exc)
            return False
        self.outage.succeeded()
        self._costs_at = time.time()
        return True

    def remove(self, replica_id: str) -> None:
        """Take ``replica_id``'s entry and the cost tables off the board."""
        keys = [replica_key(self.cfg.cluster, replica_id)] + [
            costs_key(self.cfg.cluster, t) for t in self._costs]
        self._costs.clear()
        try:
            self.redis.delete(*keys)
        except redis.RedisError as exc:
            self.outage.failed(exc)


COSTS_TTL_TTLS = 10
"""A cost table outlives its replica's last write by this many TTLs."""


@dataclass
class BoardSnapshot:
    loads: dict[str, ReplicaLoad] = field(default_factory=dict)
    fetched_at: float = 0.0
    ok: bool = False
    """False when the last refresh could not reach Redis."""


class BoardReader:
    """A local cache of every fresh replica entry, refreshed on a daemon thread.

    An entry or a cost table that fails validation (``ReplicaLoad.from_redis``,
    ``StepCosts``) is left out and counted in ``rejected``; the first rejection of each key
    is logged as a warning. A rejected cost table is read again after a TTL (its replica
    may write a valid one over it)."""

    def __init__(self, cfg: BoardConfig, start: bool = True) -> None:
        self.cfg = cfg
        self.redis = redis_client(cfg.redis_url, cfg.password)
        self.outage = Outage("board reader", resolve_redis_url(cfg.redis_url))
        self._snapshot = BoardSnapshot()
        self._costs: dict[str, StepCosts] = {}
        self._bad_costs: dict[str, float] = {}
        self._logged: set[str] = set()
        self.rejected = 0
        self.ok_at = 0.0
        """Wall time of the last refresh that reached Redis (0: none yet)."""
        self._stop = threading.Event()
        self._thread = None
        if start:
            self._thread = threading.Thread(target=self._loop, name="dspark-board", daemon=True)
            self._thread.start()

    @property
    def failures(self) -> int:
        return self.outage.failures

    def refresh(self) -> BoardSnapshot:
        pattern = replica_key(self.cfg.cluster, "*")
        try:
            keys = list(self.redis.scan_iter(match=pattern, count=100))
            pipe = self.redis.pipeline()
            for key in keys:
                pipe.hgetall(key)
            raws = pipe.execute()
        except redis.RedisError as exc:
            self.outage.failed(exc)
            self._snapshot = BoardSnapshot(self._snapshot.loads, self._snapshot.fetched_at, False)
            return self._snapshot
        self.outage.succeeded()
        now = time.time()
        loads = {}
        for key, raw in zip(keys, raws):
            if not raw:
                continue
            name = key.decode(errors="replace") if isinstance(key, bytes) else key
            try:
                load = ReplicaLoad.from_redis(raw, name, now)
            except (ValueError, TypeError) as exc:
                self._reject(name, exc)
                continue
            loads[load.replica_id] = load
        self._snapshot = BoardSnapshot(loads, now, True)
        self.ok_at = now
        self._bad_costs = {t: at for t, at in self._bad_costs.items()
                           if now - at < self.cfg.ttl_s}
        self._fetch_costs({load.cost_table_id for load in loads.values()}
                          - set(self._costs) - set(self._bad_costs))
        return self._snapshot

    def _reject(self, key: str, exc: BaseException) -> None:
        self.rejected += 1
        if key not in self._logged and len(self._logged) < 1000:
            self._logged.add(key)
            logger.warning("load board: %s rejected and left out: %s (logged once per key)",
                           key[:300], exc)

    def _fetch_costs(self, table_ids: set[str]) -> None:
        """Read the cost tables not read yet (a table id names one table for good: the
        replica that profiled it)."""
        table_ids.discard("")
        if not table_ids:
            return
        ids = sorted(table_ids)
        try:
            raws = self.redis.mget([costs_key(self.cfg.cluster, t) for t in ids])
        except redis.RedisError as exc:
            self.outage.failed(exc)
            return
        for table_id, raw in zip(ids, raws):
            if raw is None:
                continue  # not published (yet): asked again at the next refresh
            try:
                self._costs[table_id] = StepCosts.from_redis(raw)
            except (ValueError, TypeError, KeyError, RecursionError) as exc:
                self._bad_costs[table_id] = time.time()
                self._reject(costs_key(self.cfg.cluster, table_id), exc)

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
            try:
                self.refresh()
            except Exception:  # NOTE: a reader that stops would freeze the board it serves
                logger.exception("load board refresh failed")
            self._stop.wait(self.cfg.refresh_s)
