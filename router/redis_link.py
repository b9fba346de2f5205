"""How every dspark process reaches the load board's Redis, and what it does when it cannot.

- ``redis_client(url, password)``: the one way to connect. ``url`` is a ``redis://`` or
  ``rediss://`` (TLS) URL, with redis-py's query arguments (``?ssl_ca_certs=...``), or
  ``env:NAME`` for the URL in the environment variable NAME. ``password`` (``redis_password``
  in the serve config), a literal or ``env:NAME`` too, is used when the URL has none: a
  Kubernetes Secret reaches every pod as an environment variable, and the serve config,
  which Serve shows, never holds it.
- ``redact(url)``: the URL as it may be printed or logged (its password as ``***``).
- ``Outage``: one process's view of whether Redis answers. The first failure after success
  is logged once, as a warning naming the (redacted) URL and the error, and counted
  (``outages``, and the ``dspark_board_outages`` metric); the first success after it is
  logged once too, with the outage's length. Callers go on with local information in
  between (router/board.py's NOTE on stale load).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import redis

logger = logging.getLogger(__name__)


def resolve_secret(value: str | None, field: str) -> str | None:
    """``value``, or for ``env:NAME`` the environment variable NAME (ValueError naming
    ``field`` when it is not set)."""
    if value is None or not value.startswith("env:"):
        return value
    name = value[4:]
    found = os.environ.get(name)
    if not found:
        raise ValueError(f"{field} names the environment variable {name}, which is not set")
    return found


def resolve_redis_url(url: str) -> str:
    """``url``, or, for ``env:NAME``, the URL in the environment variable NAME."""
    return resolve_secret(url, "redis_url")


def redact(url: str | None) -> str | None:
    """``url`` with its password (if any) replaced by ``***``; ``env:NAME`` as it is."""
    if not url or url.startswith("env:"):
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redis_client(url: str, password: str | None = None, timeout_s: float = 0.5,
                 connect_timeout_s: float | None = None) -> redis.Redis:
    """A client of the Redis at ``url`` (module docstring); it connects on first use."""
    resolved = resolve_redis_url(url)
    extra = {}
    if password and urlsplit(resolved).password is None:  # NOTE: the URL's comes first
        extra["password"] = resolve_secret(password, "redis_password")
    return redis.Redis.from_url(resolved, socket_timeout=timeout_s,
                                socket_connect_timeout=connect_timeout_s or timeout_s,
                                **extra)


_outage_metric = None


def _count_outage(component: str) -> None:
    global _outage_metric
    try:
        if _outage_metric is None:
            from ray.util.metrics import Counter

            _outage_metric = Counter("dspark_board_outages",
                                     description="Times the load board's Redis became "
                                                 "unreachable, as each component saw it.",
                                     tag_keys=("component",))
        _outage_metric.inc(1, tags={"component": component})
    except Exception:  # NOTE: outside a Ray worker; metrics never fail the caller
        logger.debug("outage metric not recorded", exc_info=True)


class Outage:
    """Whether Redis answered ``component`` last time (module docstring)."""

    def __init__(self, component: str, url: str) -> None:
        self.component = component
        self.url = redact(url)
        self.down_since: float | None = None
        self.outages = 0
        self.failures = 0
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def down_for(self) -> float:
        since = self.down_since
        return 0.0 if since is None else time.time() - since

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self.failures += 1
            if self.down_since is not None:
                return
            self.down_since = time.time()
            self.outages += 1
        logger.warning("%s: the load board's Redis at %s is unreachable (%s): going on with "
                       "local information until it answers again", self.component, self.url,
                       f"{type(exc).__name__}: {exc}")
        _count_outage(self.component)

    def succeeded(self) -> bool:
        """Record an answer; True when it ends an outage."""
        if self.down_since is None:
            return False
        with self._lock:
            since, self.down_since = self.down_since, None
        if since is None:
            return False
        logger.warning("%s: the load board's Redis at %s answers again, after %.1f s",
                       self.component, self.url, time.time() - since)
        return True

    def state(self) -> dict:
        return {"reachable": not self.down, "down_for_s": round(self.down_for(), 3),
                "outages": self.outages}

