"""Reaching the board's Redis: a password (in the URL, the config or an environment
variable) and TLS against real servers, never printed; the embedded Redis asks for a
password it never shows on its command line, and comes back when it dies."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from dspark.router.redis_link import redact, redis_client
from dspark.router.redis_server import EmbeddedRedis, free_port, redis_binary


def test_redact_hides_only_the_password():
    assert redact("redis://:s3cret@10.0.0.5:6379/0") == "redis://:***@10.0.0.5:6379/0"
    assert redact("rediss://user:pw@[::1]:6380/1?ssl_ca_certs=/ca.pem") == (
        "rediss://user:***@[::1]:6380/1?ssl_ca_certs=/ca.pem")
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact("env:BOARD_URL") == "env:BOARD_URL"


def test_the_embedded_redis_asks_for_its_password(monkeypatch):
    """Issue 15, finding 3: any local process could write the board the router and the
    budget trust. Now a client without the password is refused, and the password is not
    on the server's command line (which every local user can read)."""
    with EmbeddedRedis() as server:
        assert server.password in server.url
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, socket_timeout=2).set("board", "hostile")
        cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes()
        assert server.password.encode() not in cmdline
        bare = f"redis://127.0.0.1:{server.port}/0"
        assert redis_client(bare, server.password).ping()  # the config's redis_password
        monkeypatch.setenv("BOARD_PASSWORD", server.password)
        assert redis_client(bare, "env:BOARD_PASSWORD").ping()  # a Secret's variable
        monkeypatch.setenv("BOARD_URL", server.url)
        assert redis_client("env:BOARD_URL").ping()
        with pytest.raises(ValueError, match="redis_password names the environment variable"):
            redis_client(bare, "env:NOT_SET_ANYWHERE")


def test_the_supervised_redis_comes_back_after_it_dies():
    server = EmbeddedRedis().start().supervise(poll_s=0.05)
    try:
        client = redis_client(server.url)
        client.set("k", "v")
        first = server.proc.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.time() + 15
        while server.restarts < 1:
            assert time.time() < deadline, "the embedded Redis was not restarted"
            time.sleep(0.05)
        assert server.proc.pid != first and client.ping()  # same port, same password
        assert client.get("k") is None  # NOTE: it restarts empty; replicas refill it
    finally:
        server.stop()
    assert server.proc is None


def self_signed(directory: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_a_tls_redis_with_a_password(tmp_path):
    """An external Redis over TLS (``rediss://`` and redis-py's ``ssl_ca_certs``), with
    its password from the config: the board reads and writes through it."""
    cert, key = self_signed(tmp_path)
    port = free_port()
    log = tmp_path / "redis.log"
    proc = subprocess.Popen([redis_binary(), "--port", "0", "--tls-port", str(port), "--bind",
                             "127.0.0.1", "--tls-cert-file", str(cert), "--tls-key-file",
                             str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients",
                             "no", "--save", "", "--dir", str(tmp_path)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        client = redis_client(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}", None, 2)
        deadline = time.time() + 15
        while True:
            try:
                client.config_set("requirepass", "tls-secret")
                break
            except redis.ConnectionError:
                if proc.poll() is not None and "Bad directive" in log.read_text():
                    pytest.skip("this redis-server has no TLS (Debian's redis-server has)")
                assert time.time() < deadline, "the TLS Redis did not answer"
                time.sleep(0.05)
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        with pytest.raises(redis.AuthenticationError):
            redis_client(url, None, 2).ping()
        from dspark.router.board import BoardConfig, BoardPublisher, BoardReader, ReplicaLoad

        cfg = BoardConfig(url, cluster="tls", password="tls-secret")
        assert BoardPublisher(cfg).publish(ReplicaLoad("r1", running=3))
        reader = BoardReader(cfg, start=False)
        assert reader.refresh().ok and reader.fresh()["r1"].running == 3
        with pytest.raises(redis.ConnectionError):  # the plain protocol is not served
            redis_client(f"redis://127.0.0.1:{port}/0", "tls-secret", 2).ping()
    finally:
        proc.kill()
        proc.wait()


def test_the_embedded_redis_dies_with_its_owner_even_on_sigkill():
    """Its own session keeps a terminal's Ctrl-C away from it (``dspark serve`` drains,
    then stops it); it still never outlives the process that started it."""
    import socket
    import sys

    owner = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom dspark.router.redis_server import "
         "EmbeddedRedis\nr = EmbeddedRedis().start()\nprint(r.port, r.proc.pid, flush=True)\n"
         "time.sleep(300)"], stdout=subprocess.PIPE, text=True)
    try:
        port, pid = map(int, owner.stdout.readline().split())
        assert os.getsid(pid) == pid != os.getsid(owner.pid)
    finally:
        owner.kill()
        owner.wait()

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    deadline = time.time() + 15
    while listening():
        assert time.time() < deadline, "the Redis outlived its owner"
        time.sleep(0.05)


def test_a_free_port_lies_outside_the_ports_the_kernel_hands_out(monkeypatch):
    """``free_port`` picks from ``QUIET_PORTS`` where the kernel's ephemeral range lies
    above it (a process binding port 0 meanwhile cannot take it), and the port binds; else
    the kernel's own pick."""
    import socket

    from dspark.router import redis_server

    low, high = redis_server.QUIET_PORTS
    monkeypatch.setattr(redis_server, "_ephemeral_low", lambda: high + 1)
    for _ in range(20):
        port = free_port()
        assert low <= port <= high
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    monkeypatch.setattr(redis_server, "_ephemeral_low", lambda: 1024)
    assert 0 < free_port() < 65536
