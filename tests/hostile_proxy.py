"""A hostile HTTP proxy between a mount and the test registry (127.0.0.1 only).

Every request is forwarded to the registry and recorded (method, path, Range,
bytes of the answer); ``rule(request) -> fault name or None`` picks requests to
damage.  Faults: ``flip`` (one byte of the body inverted), ``other`` (the same
range of ``other_blob``), ``short`` (one byte fewer, honestly announced),
``truncated`` (one byte fewer than announced, then the connection closes),
``long`` (one byte more), ``range`` (a Content-Range shifted by one block),
``500`` (an error answer), ``stall`` (no answer until the proxy stops),
``redirect`` (a 307 to the registry itself: must work), ``loop`` (a 307 to
the same URL, for ever).  With ``token_users`` set it also plays a token
server in front of the registry (the distribution spec's Bearer challenge).
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable, List, Optional


@dataclass
class Request:
    method: str
    path: str
    range: Optional[tuple]  # (start, end) asked for
    fault: Optional[str] = None
    sent: int = 0           # body bytes answered

    @property
    def blob(self) -> Optional[str]:
        m = re.search(r"/blobs/(sha256:[0-9a-f]{64})$", self.path.split("?")[0])
        return m.group(1) if m else None


class HostileProxy:
    def __init__(self, upstream: str):
        self.upstream = upstream
        self.rule: Callable[[Request], Optional[str]] = lambda r: None
        self.other_blob: Optional[str] = None
        self.requests: List[Request] = []
        self.lock = threading.Lock()
        self.released = threading.Event()  # ends every stall
        # Token authentication in front of the registry: {user: password} allowed to get
        # the token at /token (None: the registry's own rules only).
        self.token_users: Optional[dict] = None
        self.token = "token-" + base64.b16encode(os.urandom(8)).decode()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _handle(self):
                proxy._serve(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count(self, method: str, pred=lambda r: True) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r.method == method and pred(r))

    def _forward(self, method: str, path: str, headers: dict, body: Optional[bytes]):
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        # A HEAD's Content-Length is the blob's size: kept; other bodies are re-sent.
        drop = ("connection", "transfer-encoding") + (() if method == "HEAD" else
                                                      ("content-length",))
        return resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in drop], data

    def _token_gate(self, h, req) -> bool:
        """True if the request was answered here: a token, or a 401 asking for one."""
        if h.path.startswith("/token"):
            auth = h.headers.get("Authorization", "")
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":") \
                if auth.startswith("Basic ") else ("", "", "")
            if self.token_users.get(user) != password or not user:
                self._answer(h, req, 401, [], b'{"errors":[{"code":"UNAUTHORIZED"}]}')
            else:
                self._answer(h, req, 200, [("Content-Type", "application/json")],
                             json.dumps({"token": self.token, "expires_in": 300}).encode())
            return True
        if h.headers.get("Authorization") != f"Bearer {self.token}":
            n = int(h.headers.get("Content-Length") or 0)
            if n:
                h.rfile.read(n)
            repo = re.match(r"/v2/(.+?)/(?:blobs|manifests)/", h.path)
            scope = f',scope="repository:{repo.group(1)}:pull,push"' if repo else ""
            self._answer(h, req, 401, [("WWW-Authenticate", f'Bearer realm="http://{self.host}'
                                        f'/token",service="test-registry"{scope}')],
                         b'{"errors":[{"code":"UNAUTHORIZED"}]}')
            return True
        return False

    def _serve(self, h):
        rng = None
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", h.headers.get("Range", ""))
        if m:
            rng = (int(m.group(1)), int(m.group(2)))
        req = Request(h.command, h.path, rng)
        req.fault = self.rule(req)
        with self.lock:
            self.requests.append(req)
        if self.token_users is not None and self._token_gate(h, req):
            return
        n = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(n) if n else None
        headers = {k: v for k, v in h.headers.items() if k.lower() != "connection"}
        fault = req.fault
        if fault == "stall":
            self.released.wait(60)
            h.close_connection = True
            return
        if fault == "500":
            return self._answer(h, req, 500, [], b'{"errors":[{"code":"UNAVAILABLE"}]}')
        if fault in ("redirect", "loop"):
            target = f"http://{self.upstream if fault == 'redirect' else self.host}{h.path}"
            return self._answer(h, req, 307, [("Location", target)], b"")
        path = h.path
        if fault == "other" and self.other_blob:
            path = re.sub(r"sha256:[0-9a-f]{64}$", self.other_blob, path)
        status, out_headers, data = self._forward(h.command, path, headers, body)
        announced = None
        if fault == "flip" and data:
            i = len(data) // 2
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
        elif fault == "short" and data:
            data = data[:-1]
        elif fault == "truncated" and data:
            announced, data = len(data), data[:-1]
        elif fault == "long":
            data = data + b"!"
        elif fault == "range" and rng:
            bs = rng[1] - rng[0] + 1
            out_headers = [(k, v) for k, v in out_headers if k.lower() != "content-range"]
            out_headers.append(("Content-Range", f"bytes {rng[0] + bs}-{rng[1] + bs}/*"))
        self._answer(h, req, status, out_headers, data, announced)

    def _answer(self, h, req, status, headers, data, announced=None):
        h.send_response(status)
        for k, v in headers:
            h.send_header(k, v)
        if h.command != "HEAD":
            h.send_header("Content-Length", str(len(data) if announced is None else announced))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
            req.sent = len(data)
        if announced is not None:
            h.close_connection = True

    def stop(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
