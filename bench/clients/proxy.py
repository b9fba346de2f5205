#!/usr/bin/env python3
"""Tiny logging reverse proxy (stdlib only).

    python3 proxy.py --listen 8101 --upstream http://127.0.0.1:8100 --log out/aiperf.requests.jsonl

Forwards every request to the upstream unchanged and streams the answer back (SSE included,
re-chunked), and appends one JSON line per request: method, path, selected request headers,
request body (parsed JSON when it is JSON), status, response content type, and the response
body (first 2,000 characters; for a streamed answer, the first and last events).
"""

import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
KEEP_HEADERS = {"content-type", "accept", "user-agent", "authorization", "x-request-id"}


class RequestLog:
    """Appends one JSON line per request; shared by the server's handler threads."""

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._file = open(path, "a", buffering=1)

    def write(self, rec: dict) -> None:
        with self._lock:
            self._file.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _flatten_content_parts(body: bytes, rec: dict) -> bytes:
    """Joins the text parts of every list-valued message content into one string."""
    fwd = json.loads(body)
    for m in fwd.get("messages") or []:
        if isinstance(m.get("content"), list):
            m["content"] = "".join(p.get("text", "") for p in m["content"])
            rec["flattened"] = True
    return json.dumps(fwd).encode()


def _record_response_body(rec: dict, got: bytes, ctype: str) -> None:
    text = got.decode("utf-8", "replace")
    if "event-stream" in ctype:
        events = [e for e in text.split("\n\n") if e.strip()]
        rec["resp_events"] = len(events)
        rec["resp_first"] = events[:2]
        rec["resp_last"] = events[-2:]
    else:
        rec["resp"] = text[:2000]


class ProxyHandler(BaseHTTPRequestHandler):
    """Forwards any method to ``upstream`` and logs it; ``main`` sets the class attributes."""

    protocol_version = "HTTP/1.1"
    upstream: urllib.parse.SplitResult
    log: RequestLog
    flatten_content_parts = False

    def log_message(self, *a):
        pass

    def _do(self):
        t0 = time.time()
        body = self._read_body()
        rec = self._request_record(t0, body)
        if self.flatten_content_parts and isinstance(rec.get("body"), dict):
            body = _flatten_content_parts(body, rec)
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=600)
        try:
            conn.request(self.command, self.path, body=body or None, headers=self._fwd_headers())
            resp = conn.getresponse()
        except Exception as e:  # upstream down
            self._reply_upstream_down(rec, e)
            return
        rec["status"] = resp.status
        ctype = resp.getheader("Content-Type", "")
        rec["resp_type"] = ctype
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in HOP:
                self.send_header(k, v)
        if self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200:
            self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
            self.end_headers()
            resp.read()
            conn.close()
        else:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            got = self._relay_chunked(resp, rec)
            conn.close()
            _record_response_body(rec, got, ctype)
        rec["secs"] = round(time.time() - t0, 3)
        self.log.write(rec)

    def _read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        return body

    def _request_record(self, t0: float, body: bytes) -> dict:
        rec = {
            "ts": round(t0, 3),
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items() if k.lower() in KEEP_HEADERS},
        }
        try:
            rec["body"] = json.loads(body) if body else None
        except Exception:
            rec["body_raw"] = body[:2000].decode("utf-8", "replace")
        return rec

    def _fwd_headers(self) -> dict:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        headers["Host"] = self.upstream.netloc
        return headers

    def _reply_upstream_down(self, rec: dict, e: Exception) -> None:
        rec.update(status=599, error=repr(e))
        self.log.write(rec)
        msg = json.dumps({"error": {"message": repr(e)}}).encode()
        self.send_response(502)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(msg)))
        self.end_headers()
        self.wfile.write(msg)

    def _relay_chunked(self, resp: http.client.HTTPResponse, rec: dict) -> bytearray:
        """Re-chunks the upstream body to the client as it arrives; returns what was read."""
        got = bytearray()
        while True:
            piece = resp.read1(65536)
            if not piece:
                break
            got += piece
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
            except Exception:
                rec["client_gone"] = True
                break
        try:
            self.wfile.write(b"0\r\n\r\n")
        except Exception:
            pass
        return got

    def _read_chunked(self):
        out = b""
        while True:
            size = int(self.rfile.readline().strip().split(b";")[0], 16)
            if size == 0:
                self.rfile.readline()
                return out
            out += self.rfile.read(size)
            self.rfile.readline()

    def __getattr__(self, name):  # any method (GET, POST, TRACE, QUERY, ...) is forwarded
        if name.startswith("do_"):
            return self._do
        raise AttributeError(name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--upstream", default="http://127.0.0.1:8100")
    ap.add_argument("--log", required=True)
    ap.add_argument(
        "--flatten-content-parts",
        action="store_true",
        help="pre-check only: join chat text parts into a string before forwarding",
    )
    args = ap.parse_args()
    handler = type(
        "Handler",
        (ProxyHandler,),
        {
            "upstream": urllib.parse.urlsplit(args.upstream),
            "log": RequestLog(args.log),
            "flatten_content_parts": args.flatten_content_parts,
        },
    )
    srv = ThreadingHTTPServer(("127.0.0.1", args.listen), handler)
    srv.daemon_threads = True
    print(f"proxy 127.0.0.1:{args.listen} -> {args.upstream}, log {args.log}", file=sys.stderr)
    srv.serve_forever()


if __name__ == "__main__":
    main()
