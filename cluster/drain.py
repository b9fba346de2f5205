"""Graceful drain of a served app: what ``dspark serve`` does on SIGINT or SIGTERM.

The process that stops the app (``begin``) writes a deadline into Ray's internal key-value
store (the GCS, which every process of the cluster reaches). Each ingress replica watches
for it (``IngressDrain``, a daemon thread):

- from the moment it sees the deadline, a new completion request is refused with 503,
  ``code: shutting_down`` and ``Retry-After`` (nothing of it is started);
- requests in flight go on; at the deadline, a stream still running ends with an error
  chunk naming the shutdown and ``[DONE]``, and a request waiting for its whole answer
  gets the same 503; the shard's requests are cancelled with them;
- it reports how many requests it still holds, so the stopping process (``wait``) stops
  the app as soon as every ingress is empty, or at the deadline.

Nothing of this runs while the app serves normally but the watch, one read of the store
every ``POLL_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator

from dspark.cluster.openai_errors import APIError

POLL_S = 0.2
"""How often an ingress reads the drain deadline."""
NAMESPACE = "dspark"


def _key(app: str) -> bytes:
    return f"drain:{app}".encode()


def _ack_prefix(app: str) -> bytes:
    return f"drain-ack:{app}:".encode()


def begin(app: str, timeout_s: float) -> float:
    """Start draining ``app``: its ingresses refuse new requests from now on and end what
    is still running ``timeout_s`` later. Returns the deadline (epoch seconds)."""
    from ray.experimental.internal_kv import _internal_kv_put

    deadline = time.time() + timeout_s
    _internal_kv_put(_key(app), str(deadline).encode(), overwrite=True, namespace=NAMESPACE)
    return deadline


def held(app: str) -> dict[str, int]:
    """Requests each draining ingress replica still holds (replicas that have seen the
    drain)."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    out = {}
    for key in _internal_kv_list(_ack_prefix(app), namespace=NAMESPACE):
        value = _internal_kv_get(key, namespace=NAMESPACE)
        if value is not None:
            out[key.decode().rsplit(":", 1)[-1]] = int(value)
    return out


def wait(app: str, deadline: float, replicas: int, stop_early=lambda: False) -> dict[str, int]:
    """Until every one of ``replicas`` ingress replicas reports no request held, the
    deadline (plus the time to end the streams) passes, or ``stop_early()``; returns the
    last report."""
    report: dict[str, int] = {}
    while time.time() < deadline + 2.0 and not stop_early():
        report = held(app)
        if len(report) >= replicas and not any(report.values()):
            break
        time.sleep(POLL_S)
    return report


def shutting_down() -> APIError:
    """503: the server is draining (or past its drain deadline)."""
    return APIError(503, "the server is shutting down; send the request again (to another "
                    "replica or once it is back)", kind="server_error", code="shutting_down",
                    headers={"Retry-After": "5"})


class IngressDrain:
    """One ingress replica's side of the drain (module docstring). A daemon thread
    watches the store, so an idle replica reports too."""

    def __init__(self, app: str, replica: str) -> None:
        self.app, self.replica = app, replica
        self.deadline: float | None = None
        self.active = 0
        """Completion requests this replica holds (streams until their last chunk)."""
        threading.Thread(target=self._watch, name="dspark-drain", daemon=True).start()

    @property
    def refusing(self) -> bool:
        return self.deadline is not None

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    def _watch(self) -> None:
        """Read the deadline every ``POLL_S``; once draining, report what is held."""
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

        ack = _ack_prefix(self.app) + self.replica.encode()
        while True:
            try:
                if self.deadline is None:
                    value = _internal_kv_get(_key(self.app), namespace=NAMESPACE)
                    if value is not None:  # NOTE: a drain, once seen, is never taken back
                        self.deadline = float(value)
                if self.deadline is not None:
                    _internal_kv_put(ack, str(self.active).encode(), namespace=NAMESPACE)
            except Exception:  # NOTE: the store unreachable: keep serving, look again later
                pass
            time.sleep(POLL_S)

    @contextlib.contextmanager
    def holding(self):
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    async def until_expired(self, work):
        """``work`` (an awaitable), or ``shutting_down`` once the drain deadline passes
        (``work`` is cancelled)."""
        task = asyncio.ensure_future(work)
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                return task.result()
            if self.expired:
                task.cancel()
                raise shutting_down()

    async def track(self, events: AsyncIterator):
        """A streamed response's events, counted as held until the last one."""
        with self.holding():
            async for event in events:
                yield event


def clear(app: str) -> None:
    """Forget an earlier drain of ``app`` (before deploying it again on the same cluster)."""
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(_key(app), namespace=NAMESPACE)
    _internal_kv_del(_ack_prefix(app), del_by_prefix=True, namespace=NAMESPACE)
