"""An HTTP proxy on 127.0.0.1 in front of an S3-compatible server, which waits ``delay_ms``
before each answer (real S3 takes tens of milliseconds to its first byte, a local server
none), counts the requests, and on request damages answers: ``corrupt`` flips a byte in the
middle of a body (and drops the ``x-amz-checksum-*`` headers boto3 would check it against, as
a store that keeps no checksum sends none), ``truncate`` sends half a body and closes the
connection, ``stall`` sends half a body and then nothing (a download that hangs), each for
the first N whole-object GETs (no ``Range``) of an object whose key ends with the given name.

    python -m benchmarks.s3_proxy http://127.0.0.1:5000 --delay-ms 30
    python -m benchmarks.s3_proxy http://127.0.0.1:5000 --corrupt train-000001.tar:1

It prints ``listening on http://127.0.0.1:PORT`` once it answers, and serves until stopped;
``GET /__proxy_stats__`` answers ``{"requests": N}``, the requests it forwarded.
The S3 benchmark (benchmarks/s3_cache.py) runs it in its own process; the tests run it as a
process of its own too, a real server between boto3 and moto_server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

CHUNK = 1 << 20
STATS = "/__proxy_stats__"  # GET: {"requests": forwarded so far}
FAULTS = ("corrupt", "truncate", "stall")
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class Proxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, target: str, delay_ms: float = 0.0, faults: dict | None = None, port: int = 0
    ) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        t = urlsplit(target)
        self.target = (t.hostname, t.port or 80)
        self.delay = delay_ms / 1000
        self.faults = {k: list(v) for k, v in (faults or {}).items()}  # name -> [kind, left]
        self.requests = 0
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def fault_for(self, method: str, path: str, ranged: bool) -> str | None:
        """The damage to do to this answer, if any (counted down): whole-object GETs only."""
        if method != "GET" or ranged:
            return None
        with self.lock:
            for name, spec in self.faults.items():
                if path.split("?")[0].endswith("/" + name) and spec[1] > 0:
                    spec[1] -= 1
                    return spec[0]
        return None

    def start(self) -> Proxy:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Proxy

    def log_message(self, *args) -> None:  # quiet
        pass

    def _forward(self) -> None:
        if self.path == STATS:  # the proxy's own answer: the requests it forwarded
            text = json.dumps({"requests": self.server.requests}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)
            return
        with self.server.lock:
            self.server.requests += 1
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        resp, data = self._ask(body)
        time.sleep(self.server.delay)
        ranged = "Range" in self.headers
        fault = (
            self.server.fault_for(self.command, self.path, ranged) if resp.status < 300 else None
        )
        self.send_response(resp.status, resp.reason)
        head = self.command == "HEAD"  # its Content-Length is the object's
        for k, v in resp.getheaders():
            if k.lower() in _HOP or (not head and k.lower() == "content-length"):
                continue
            if fault == "corrupt" and k.lower().startswith("x-amz-checksum-"):
                continue  # as a store that keeps no checksum: only the reader's check sees it
            self.send_header(k, v)
        if not head:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault == "corrupt" and data:
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
        if fault in ("truncate", "stall"):
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if fault == "stall":
                time.sleep(3600)
            self.close_connection = True
            return
        for i in range(0, len(data), CHUNK):
            self.wfile.write(data[i : i + CHUNK])

    def _ask(self, body: bytes | None) -> tuple[http.client.HTTPResponse, bytes]:
        """The server's answer to this request (on this thread's connection, made anew once
        if the server closed it)."""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        for attempt in (1, 2):
            upstream = getattr(self, "_upstream", None)
            if upstream is None:
                upstream = self._upstream = http.client.HTTPConnection(*self.server.target)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                resp = upstream.getresponse()
                return resp, resp.read()
            except (http.client.HTTPException, OSError):
                upstream.close()
                self._upstream = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


def parse_faults(specs: dict[str, list[str]]) -> dict[str, tuple[str, int]]:
    """``{"corrupt": ["train-000001.tar:1"]}`` -> ``{"train-000001.tar": ("corrupt", 1)}``."""
    out = {}
    for kind, items in specs.items():
        for item in items or ():
            name, _, count = item.partition(":")
            out[name] = (kind, int(count or 1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="the S3 endpoint to forward to, e.g. http://127.0.0.1:5000")
    p.add_argument("--delay-ms", type=float, default=0.0, help="wait before each answer")
    p.add_argument("--port", type=int, default=0, help="0: a free one")
    for kind in FAULTS:
        p.add_argument(f"--{kind}", action="append", metavar="NAME[:N]")
    args = p.parse_args(argv)
    faults = parse_faults({k: getattr(args, k) for k in FAULTS})
    proxy = Proxy(args.target, args.delay_ms, faults, args.port)
    print(f"listening on {proxy.url}", flush=True)
    proxy.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
