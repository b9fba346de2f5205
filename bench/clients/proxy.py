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

HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
       "trailers", "transfer-encoding", "upgrade", "host", "content-length"}
KEEP_HEADERS = {"content-type", "accept", "user-agent", "authorization", "x-request-id"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--upstream", default="http://127.0.0.1:8100")
    ap.add_argument("--log", required=True)
    ap.add_argument("--flatten-content-parts", action="store_true",
                    help="pre-check only: join chat text parts into a string before forwarding")
    args = ap.parse_args()
    up = urllib.parse.urlsplit(args.upstream)
    lock = threading.Lock()
    logf = open(args.log, "a", buffering=1)

    def write(rec):
        with lock:
            logf.write(json.dumps(rec, ensure_ascii=False) + "\n")

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _do(self):
            t0 = time.time()
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = self._read_chunked()
            rec = {"ts": round(t0, 3), "method": self.command, "path": self.path,
                   "headers": {k.lower(): v for k, v in self.headers.items()
                               if k.lower() in KEEP_HEADERS}}
            try:
                rec["body"] = json.loads(body) if body else None
            except Exception:
                rec["body_raw"] = body[:2000].decode("utf-8", "replace")
            if args.flatten_content_parts and isinstance(rec.get("body"), dict):
                fwd = json.loads(body)
                for m in fwd.get("messages") or []:
                    if isinstance(m.get("content"), list):
                        m["content"] = "".join(p.get("text", "") for p in m["content"])
                        rec["flattened"] = True
                body = json.dumps(fwd).encode()
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            headers["Host"] = up.netloc
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=600)
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
            except Exception as e:  # upstream down
                rec.update(status=599, error=repr(e))
                write(rec)
                msg = json.dumps({"error": {"message": repr(e)}}).encode()
                self.send_response(502)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg)
                return
            rec["status"] = resp.status
            ctype = resp.getheader("Content-Type", "")
            rec["resp_type"] = ctype
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in HOP:
                    self.send_header(k, v)
            nobody = self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200
            if nobody:
                self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
                self.end_headers()
                resp.read()
                conn.close()
                rec["secs"] = round(time.time() - t0, 3)
                write(rec)
                return
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
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
            conn.close()
            text = got.decode("utf-8", "replace")
            if "event-stream" in ctype:
                events = [e for e in text.split("\n\n") if e.strip()]
                rec["resp_events"] = len(events)
                rec["resp_first"] = events[:2]
                rec["resp_last"] = events[-2:]
            else:
                rec["resp"] = text[:2000]
            rec["secs"] = round(time.time() - t0, 3)
            write(rec)

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

    srv = ThreadingHTTPServer(("127.0.0.1", args.listen), H)
    srv.daemon_threads = True
    print(f"proxy 127.0.0.1:{args.listen} -> {args.upstream}, log {args.log}", file=sys.stderr)
    srv.serve_forever()


if __name__ == "__main__":
    main()
