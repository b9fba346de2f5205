"""dspark tried as an attacker: each bad input and abuse case against a running app, with the
status it got and whether that is the one expected.

    python -m dspark.bench.attacks [--json out.json]

Starts the demo app on loopback (a local Ray cluster, the embedded Redis) with two API keys,
``api_key_max_streams=1`` and ``api_key_rate_limit=600``, then sends every case in
``CASES`` and the board cases (writing to its Redis without the password, and with it, a
hostile entry). For every answer it also checks the body: an OpenAI-shaped error that shows
no key, no traceback and no file path. Prints a table and exits 1 when any case got another
status than expected. ``run_attacks`` is what the test calls against its own app.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

KEY, OTHER_KEY, BURST_KEY = "sk-attack-1", "sk-attack-2", "sk-attack-3"
MODEL = "attacked"


@dataclass
class Attempt:
    case: str
    expected: int | str
    got: int | str
    clean: bool
    """The body showed no key, no traceback and no file path (and errors are OpenAI-shaped)."""

    @property
    def ok(self) -> bool:
        return self.expected == self.got and self.clean


def _chat(**over) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 4, "temperature": 0, **over}


def _bearer(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


# (case, method, path, headers, body (dict: JSON; bytes: raw), expected status)
CASES: list[tuple[str, str, str, dict, object, int]] = [
    ("no API key", "POST", "/v1/chat/completions", {}, _chat(), 401),
    ("wrong API key", "POST", "/v1/chat/completions", _bearer("sk-guess"), _chat(), 401),
    ("a key's prefix", "POST", "/v1/chat/completions", _bearer(KEY[:-1]), _chat(), 401),
    ("key in the query string", "POST", f"/v1/chat/completions?api_key={KEY}", {}, _chat(),
     401),
    ("Basic instead of Bearer", "POST", "/v1/chat/completions",
     {"Authorization": f"Basic {KEY}"}, _chat(), 401),
    ("a 64 KiB key", "POST", "/v1/chat/completions", _bearer("k" * 65536), _chat(), 401),
    ("operator route /v1/load without a key", "GET", "/v1/load", {}, None, 401),
    ("model list without a key", "GET", "/v1/models", {}, None, 401),
    ("probe /health without a key (open by design)", "GET", "/health", {}, None, 200),
    ("public /openapi.json without a key (open by design)", "GET", "/openapi.json", {}, None,
     200),
    ("the right key", "POST", "/v1/chat/completions", _bearer(), _chat(), 200),
    ("body past max_request_bytes", "POST", "/v1/chat/completions", _bearer(),
     json.dumps(_chat(messages=[{"role": "user", "content": "x" * 1_100_000}])).encode(), 413),
    ("JSON nested 100 000 deep", "POST", "/v1/chat/completions", _bearer(),
     b"[" * 100_000 + b"]" * 100_000, 400),
    ("not JSON", "POST", "/v1/chat/completions", _bearer(), b"{'model': 1", 400),
    ("max_tokens 10^12", "POST", "/v1/chat/completions", _bearer(), _chat(max_tokens=10**12),
     400),
    ("n = 1 000 000", "POST", "/v1/chat/completions", _bearer(), _chat(n=1_000_000), 400),
    ("negative temperature", "POST", "/v1/chat/completions", _bearer(),
     _chat(temperature=-1), 400),
    ("100 000 logit_bias entries", "POST", "/v1/chat/completions", _bearer(),
     _chat(logit_bias={str(i): 1 for i in range(100_000)}), 400),
    ("token id past the vocabulary", "POST", "/v1/completions", _bearer(),
     {"model": MODEL, "prompt": [10**9], "max_tokens": 2}, 400),
    ("a lone surrogate in the prompt", "POST", "/v1/completions", _bearer(),
     b'{"model": "attacked", "prompt": "\\ud800", "max_tokens": 2}', 400),
    ("unknown model", "POST", "/v1/chat/completions", _bearer(), _chat(model="gpt-4"), 404),
    ("path traversal in a model id", "GET", "/v1/models/..%2F..%2Fetc%2Fpasswd", _bearer(),
     None, 404),
    ("unknown route", "GET", "/admin", _bearer(), None, 404),
    ("wrong method", "DELETE", "/v1/chat/completions", _bearer(), None, 405),
    ("stop sequences: 10 000 of them", "POST", "/v1/chat/completions", _bearer(),
     _chat(stop=["x"] * 10_000), 400),
]


def _clean(text: str, status: int) -> bool:
    """The body shows no key, no traceback and no path; an error is in the OpenAI shape."""
    if any(k in text for k in (KEY, OTHER_KEY, BURST_KEY)) or "Traceback" in text or "/site-packages/" in text:
        return False
    if status >= 400:
        try:
            error = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            return False
        return {"message", "type", "param", "code"} <= set(error)
    return True


def http_cases(base: str) -> list[Attempt]:
    import httpx

    out = []
    for case, method, path, headers, body, expected in CASES:
        kw = {"content": body} if isinstance(body, bytes) else (
            {"json": body} if body is not None else {})
        if isinstance(body, bytes):
            headers = {**headers, "Content-Type": "application/json"}
        resp = httpx.request(method, base + path, headers=headers, timeout=120, **kw)
        out.append(Attempt(case, expected, resp.status_code, _clean(resp.text, resp.status_code)))
    return out


def limit_cases(base: str) -> list[Attempt]:
    """The per-key limits: a second stream of a key at ``api_key_max_streams=1`` (429 while
    another key is served), and a burst past the requests-per-minute limit."""
    import httpx

    out = []
    long = _chat(max_tokens=256, min_tokens=256, stream=True)
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=long, headers=_bearer(),
                      timeout=120) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        second = httpx.post(f"{base}/v1/chat/completions", json=_chat(), headers=_bearer(),
                            timeout=60)
        other = httpx.post(f"{base}/v1/chat/completions", json=_chat(),
                           headers=_bearer(OTHER_KEY), timeout=120)
        list(lines)
    out.append(Attempt("a second stream past api_key_max_streams", 429, second.status_code,
                       _clean(second.text, second.status_code)
                       and "retry-after" in second.headers))
    out.append(Attempt("another key meanwhile", 200, other.status_code, True))
    statuses = []
    for _ in range(RATE + 5):  # NOTE: short requests, one at a time, well within a minute
        resp = httpx.post(f"{base}/v1/completions", headers=_bearer(BURST_KEY), timeout=60,
                          json={"model": MODEL, "prompt": "a", "max_tokens": 1})
        statuses.append(resp.status_code)
    burst = 429 if statuses == [200] * RATE + [429] * 5 else (
        f"{statuses.count(200)}x200, {statuses.count(429)}x429")
    out.append(Attempt(f"{RATE + 5} requests in a minute past api_key_rate_limit={RATE}", 429,
                       burst, True))
    return out


RATE = 40
"""The app's requests per minute per key (the other cases' requests of a key fit in it;
the burst has a key of its own)."""


def board_cases(redis_url: str, cluster: str, base: str) -> list[Attempt]:
    """Writing to the board: without the password it is refused; with it (an insider), a
    hostile entry is rejected by the readers and requests are still answered."""
    from urllib.parse import urlsplit

    import httpx
    import redis

    from dspark.router.board import replica_key

    parts = urlsplit(redis_url)
    bare = redis.Redis(host=parts.hostname, port=parts.port, socket_timeout=2)
    try:
        bare.hset(replica_key(cluster, "intruder"), mapping={"running": "0"})
        got: int | str = "written"
    except redis.AuthenticationError:
        got = "refused (NOAUTH)"
    out = [Attempt("write the board without Redis's password", "refused (NOAUTH)", got, True)]
    insider = redis.Redis.from_url(redis_url, socket_timeout=2)
    hostile = {"replica_id": "x", "running": "-1000000", "acceptance_length": "nan",
               "timestamp": str(time.time() + 10**6), "version": "2"}
    for rid in [k.decode().rsplit(":", 1)[1]
                for k in insider.scan_iter(match=replica_key(cluster, "*"))]:
        insider.hset(replica_key(cluster, rid), mapping=hostile)  # NOTE: overwritten within 0.1 s
    answered = httpx.post(f"{base}/v1/chat/completions", json=_chat(), headers=_bearer(),
                          timeout=120)
    out.append(Attempt("hostile entries over every replica's (with the password)", 200,
                       answered.status_code, _clean(answered.text, answered.status_code)))
    return out


def run_attacks(base: str, redis_url: str, cluster: str) -> list[Attempt]:
    """Every case against the app at ``base`` (served with ``KEY`` and ``OTHER_KEY``,
    ``api_key_max_streams=1``, ``api_key_rate_limit=RATE``, on ``redis_url``)."""
    return http_cases(base) + limit_cases(base) + board_cases(redis_url, cluster, base)


def app_config(**over):
    from dspark.cluster.config import ServeConfig

    return ServeConfig(**{"model_name": MODEL, "api_keys": (KEY, OTHER_KEY, BURST_KEY),
                          "api_key_max_streams": 1, "api_key_rate_limit": RATE,
                          "max_num_seqs": 4, "num_blocks": 256, "threads": 1, **over})


def table(rows: list[Attempt]) -> str:
    lines = ["| case | expected | got | body clean |", "|---|---|---|---|"]
    lines += [f"| {r.case} | {r.expected} | {r.got}{'' if r.ok else ' ✗'} | "
              f"{'yes' if r.clean else 'NO'} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None, start: Callable | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dspark bench attacks",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    from dspark.cluster.serve import app_url, start_local, stop
    from dspark.router.redis_server import free_port

    cfg, redis = start_local(app_config(port=free_port()))
    try:
        rows = run_attacks(app_url(cfg), cfg.redis_url, cfg.cluster)
    finally:
        stop(redis)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump([{**asdict(r), "ok": r.ok} for r in rows], out, indent=1)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
