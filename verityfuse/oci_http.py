"""The HTTP layer under oci_client: a deadline for each registry answer, the few things
done with any response, and the registry's errors (pure: urllib3 and threading only).

urllib3's timeouts bound each socket operation, not a request: a registry that drips its
status line, its headers or its body one byte per read timeout keeps a reader (and the
FUSE request behind it) waiting for as long as it likes.  Here every connection the
client's pools make arms a deadline once it has sent a request; the response's status
line, headers and body must be complete by then, or one watchdog thread shuts the socket
down, and the blocked read fails at once (the caller reports it as a RegistryError: EIO).  The
deadline is disarmed when the connection goes back to its pool (the response read, or
drained after a redirect) or is closed.

A deadline is kept per connection object, not per socket or response: arming again
(the connection reused for the next request) replaces it, so a watchdog that fires late
can never cut a request that started after the one it was set for.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import re
import socket
import threading
import time
import urllib.parse
from typing import Dict, List, Optional, Tuple

try:
    import urllib3
    from urllib3.connection import HTTPConnection, HTTPSConnection
except ModuleNotFoundError:  # the [oci] extra, as oci_client says
    raise ImportError("serving from or pushing to an OCI registry needs urllib3: "
                      "pip install 'verityfuse[oci]'") from None

from .errors import VerityError


class Watchdog:
    """Shuts down the socket of each armed connection whose deadline passes."""

    def __init__(self):
        self._cond = threading.Condition()
        self._armed: Dict[int, Tuple[int, object]] = {}  # id(conn) -> (arming, conn)
        self._heap: List[Tuple[float, int, int]] = []    # (deadline, arming, id(conn))
        self._arming = itertools.count()
        self._thread = None
        self.fired = 0

    def arm(self, conn, seconds: float) -> None:
        with self._cond:
            n = next(self._arming)
            self._armed[id(conn)] = (n, conn)
            heapq.heappush(self._heap, (time.monotonic() + seconds, n, id(conn)))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="registry-deadlines",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def disarm(self, conn) -> None:
        with self._cond:
            self._armed.pop(id(conn), None)

    def _run(self):
        while True:
            with self._cond:
                while True:
                    while self._heap and self._armed.get(self._heap[0][2], (None,))[0] \
                            != self._heap[0][1]:
                        heapq.heappop(self._heap)  # disarmed or armed again since
                    if not self._heap:
                        self._cond.wait()
                        continue
                    deadline, n, key = self._heap[0]
                    left = deadline - time.monotonic()
                    if left <= 0:
                        heapq.heappop(self._heap)
                        conn = self._armed.pop(key)[1]
                        self.fired += 1
                        # Under the lock, so that the connection cannot be given back and
                        # armed for another request in between (shutdown never blocks).
                        conn.deadline_passed = True  # read by cut()
                        sock = getattr(conn, "sock", None)
                        if sock is not None:
                            try:
                                sock.shutdown(socket.SHUT_RDWR)  # the blocked recv returns
                            except OSError:
                                pass
                        continue
                    self._cond.wait(left)


WATCHDOG = Watchdog()
# A response's whole answer (status line, headers, body) within this many read timeouts,
# and a body of N bytes N / MIN_RATE seconds more (oci_client.read_body extends it).
READ_TIMEOUTS = 3
MIN_RATE = 64 << 10  # bytes a second


def cut(conn) -> bool:
    """Whether the watchdog cut ``conn``'s last response (its deadline passed)."""
    return bool(getattr(conn, "deadline_passed", False))


class AnswerTooSlow(Exception):
    """The watchdog cut a response's status line or headers.  Not an OSError nor an HTTP
    error, so that urllib3 does not take it for a broken connection and try again."""


class _Watched:
    budget = 30.0  # seconds: set per client by ``watched``
    deadline_passed = False

    def getresponse(self):
        # From the request sent (an upload's body is not timed: push may send large
        # chunks) to the response's last byte.
        self.deadline_passed = False
        WATCHDOG.arm(self, self.budget)
        try:
            return super().getresponse()
        except BaseException:
            WATCHDOG.disarm(self)
            if self.deadline_passed:
                raise AnswerTooSlow() from None
            raise

    def close(self):
        WATCHDOG.disarm(self)
        super().close()


class _WatchedPool:
    def _put_conn(self, conn):
        if conn is not None:  # its response is done with (read, drained after a redirect)
            WATCHDOG.disarm(conn)
        super()._put_conn(conn)


def watched(pool_manager: urllib3.PoolManager, seconds: float) -> urllib3.PoolManager:
    """``pool_manager``, whose connections give each response ``seconds`` to arrive whole."""
    http = type("WatchedHTTPConnection", (_Watched, HTTPConnection), {"budget": seconds})
    https = type("WatchedHTTPSConnection", (_Watched, HTTPSConnection), {"budget": seconds})
    pool_manager.pool_classes_by_scheme = {
        "http": type("WatchedPool", (_WatchedPool, urllib3.HTTPConnectionPool),
                     {"ConnectionCls": http}),
        "https": type("WatchedHTTPSPool", (_WatchedPool, urllib3.HTTPSConnectionPool),
                      {"ConnectionCls": https})}
    return pool_manager


# -- redirects --------------------------------------------------------------------------

class PlainHTTP(Exception):
    """A registry reached over HTTPS sent a request to plain HTTP (``url``)."""

    def __init__(self, url: str):
        super().__init__(url)
        self.url = url


class Redirects(urllib3.Retry):
    """urllib3's redirect handling, except that for a client of a registry reached over
    HTTPS (``tls``) a redirect from HTTPS to plain HTTP is refused (``PlainHTTP``) before
    anything is sent there: what TLS protects (a blob's bytes, an upload, a token) would
    otherwise cross the network in clear."""

    tls = False

    def new(self, **kw):  # each redirect makes a new one: it keeps the client's rule
        made = super().new(**kw)
        made.tls = self.tls
        return made

    def increment(self, method=None, url=None, response=None, error=None, _pool=None,
                  _stacktrace=None):
        loc = response.get_redirect_location() if response is not None else None
        if self.tls and loc and url and _pool is not None and _pool.scheme == "https":
            here = url if "://" in url else f"https://{_pool.host}:{_pool.port}{url}"
            target = urllib.parse.urljoin(here, loc)
            if leaves_tls(here, target):
                discard(response)  # its connection back to the pool, or closed
                raise PlainHTTP(target)
        return super().increment(method, url, response, error, _pool, _stacktrace)


def leaves_tls(base: str, url: str) -> bool:
    """Whether ``url`` takes a client of the registry at ``base`` from HTTPS to plain HTTP."""
    return origin(base)[0] == "https" and origin(url)[0] != "https"


def redirects(tls: bool, n: int = 3) -> Redirects:
    """A request's retry policy: no retries of urllib3's own (the client retries), up to
    ``n`` redirects; with ``tls`` (the registry is reached over HTTPS) never from HTTPS to
    plain HTTP."""
    r = Redirects(total=None, connect=0, read=0, status=0, other=0, redirect=n)
    r.tls = tls
    return r


# -- responses --------------------------------------------------------------------------

def answered_by(r, url: str) -> str:
    """The URL that gave response ``r`` to a request for ``url``: each redirect's Location
    resolved against the URL before it (a relative one stays on the host that sent it;
    urllib3's ``r.url`` is only the last Location as written)."""
    retries = getattr(r, "retries", None)
    for step in (retries.history if retries is not None else ()):
        if step.redirect_location:
            url = urllib.parse.urljoin(url, step.redirect_location)
    return url


def content_length(r) -> Optional[int]:
    """The response's Content-Length, None if absent or not a number (of at most 20
    digits: what Python parses without complaint)."""
    text = r.headers.get("Content-Length", "")
    return int(text) if re.fullmatch(r"\d{1,20}", text) else None


def origin(url: str) -> Tuple[str, str]:
    """(scheme, host[:port]) of a URL: who a credential or token would be given to."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def discard(r):
    """Done with a response: its connection goes back to the pool if the body was read
    to its end (a small rest is read first, within the response's deadline), else it is
    closed, never reused mid-body."""
    try:
        if not r.isclosed():
            r.read(1 << 16)
    except Exception:
        pass
    if r.isclosed():
        r.release_conn()
    else:
        r.close()
        r.release_conn()


def reason(e: Exception) -> str:
    inner = getattr(e, "reason", None) or e
    if isinstance(inner, urllib3.exceptions.ConnectTimeoutError):
        # urllib3 names its connection object first ("WatchedHTTPConnection(host=...,
        # port=...)", or its repr): our class, not the user's business.  The host is said
        # by the caller; what is left is why.
        cause = inner.__cause__ or inner.__context__
        if isinstance(inner, urllib3.exceptions.NewConnectionError) and \
                isinstance(cause, OSError) and cause.strerror:
            return f"cannot connect: {cause.strerror}"
        if len(inner.args) == 2 and isinstance(inner.args[1], str):
            return inner.args[1]
    if isinstance(inner, urllib3.exceptions.PoolError):  # "WatchedPool(host=...): Read ..."
        text, prefix = str(inner), f"{inner.pool}: "
        if text.startswith(prefix):
            return text[len(prefix):]
    return str(inner) or type(inner).__name__


def error_text(r) -> str:
    """A short excerpt of an error body (OCI errors are JSON with a code and message)."""
    try:
        text = r.read(512).decode("utf-8", "replace")
    except Exception:
        return ""
    finally:
        discard(r)
    text = " ".join(text.split())
    return f": {text[:200]!r}" if text else ""


# -- what the client's callers see ----------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class RegistryError(VerityError):
    """The registry could not give what was asked (EIO): availability, never trust."""


class BodyBroken(RegistryError):
    """The connection failed in the middle of a body: worth another try."""


class TooSlow(RegistryError):
    """The registry did not answer in time (a stall, or a drip past the deadline): the
    readers of what it was asked for fail at once for a while (oci_reader) instead of
    each waiting out a deadline of its own, and so do the requests of its file that
    waited for a worker thread meanwhile (ops_read.ThreadGates)."""

    stall = True


def sha256_digest(data) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Tries:
    """The requests one fetch may still retry (``Client._again`` and ``request`` share it)."""

    __slots__ = ("left",)

    def __init__(self, left: int):
        self.left = left
