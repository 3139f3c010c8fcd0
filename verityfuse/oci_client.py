"""The OCI distribution API calls verityfuse needs, over urllib3 (pure: no pyfuse3, no trio).

urllib3 rather than hand-written HTTP: connection pooling with HTTP/1.1
keep-alive (a lazy mount makes one small range request per read), TLS with a
CA file, connect/read timeouts and redirect handling, in one well-kept library
that most Python HTTP stacks already build on.

Nothing a registry returns is trusted here: this module only refuses answers
that are malformed (a wrong status, a Content-Range that is not exactly the
range asked for, a body shorter or longer than announced, a blob whose bytes
do not hash to its name) so that the error names the cause.  What makes a
byte trustworthy is decided by the caller (oci_source: the Merkle tree of the
signed manifest).

Credentials and tokens go to the registry's own origin only, and a registry reached
over HTTPS is never left for plain HTTP (a redirect, an upload Location, a token realm).

Each request has a connect and a read timeout, and its whole answer a deadline
(oci_http: a server dripping its headers or body one byte per read timeout
cannot hold a reader for longer);
5xx answers, connection errors and bodies broken off are retried with exponential
backoff, ``retries`` times in all for one fetch, whatever the causes.  The push half
(uploads) is oci_upload's.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import urllib.parse
from typing import Any, Callable, Dict, Optional, Tuple

try:
    import urllib3
except ModuleNotFoundError:  # the [oci] extra: local and share mounts do not need it
    raise ImportError("serving from or pushing to an OCI registry needs urllib3: "
                      "pip install 'verityfuse[oci]'") from None

from .oci_http import (MIN_RATE, OCI_MANIFEST, READ_TIMEOUTS, WATCHDOG, AnswerTooSlow,
                       BodyBroken, PlainHTTP, RegistryError, TooSlow, Tries, answered_by,
                       content_length, cut, discard, error_text, leaves_tls, origin, reason,
                       redirects, sha256_digest, watched)
from .oci_ref import Ref
from .oci_upload import Uploads

_RETRY_STATUS = {500, 502, 503, 504}
_CHUNK = 1 << 16


class Client(Uploads):
    """One repository of one registry.  Thread-safe (urllib3's pool is)."""

    def __init__(self, ref: Ref, *, https: bool = False, ca_file: Optional[str] = None,
                 auth: Optional[Tuple[str, str]] = None, timeout: float = 10.0,
                 retries: int = 3, backoff: float = 0.2, pool_size: int = 24):
        self.ref = ref
        self.base = f"{'https' if https else 'http'}://{ref.host}"
        self.tls = https
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.headers: Dict[str, str] = {"User-Agent": "verityfuse"}
        self.basic: Optional[str] = None
        if auth is not None:
            self.basic = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            self.headers["Authorization"] = self.basic
        self.token_lock = threading.Lock()
        # pool_size: connections kept for reuse, at least the threads that may use them at
        # once (a mount's 16 readers and its readahead): a full pool closes a connection
        # when it is given back, and urllib3 warns each time.
        # HTTPS always verifies the certificate: against ca_file, else the system's CAs.
        # Each answer must arrive whole within a few read timeouts (oci_http).
        self.http = watched(urllib3.PoolManager(
            maxsize=pool_size, block=False, cert_reqs="CERT_REQUIRED" if https else None,
            ca_certs=ca_file if https else None,
            timeout=urllib3.Timeout(connect=min(timeout, 5.0), read=timeout)),
            READ_TIMEOUTS * timeout)
        self.lock = threading.Lock()
        self.requests: Dict[str, int] = {}  # method -> count, for tests and status
        self.bytes_fetched = 0

    # -- transport --------------------------------------------------------------------

    def _url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return self.base + path

    def _count(self, method: str):
        with self.lock:
            self.requests[method] = self.requests.get(method, 0) + 1

    def request(self, method: str, path: str, what: str, headers=None,
                body: Optional[Callable[[], Any]] = None, ok=(200,),
                tries: Optional[Tries] = None) -> urllib3.BaseHTTPResponse:
        """One call, retried on 5xx and connection errors; the response's body is not
        read yet (the caller reads it with ``read_body`` and releases it).  Any status
        not in ``ok`` is a RegistryError naming ``what``.  ``tries``: the attempts left
        to the fetch this call is part of (``_again``), else ``retries`` of its own."""
        url = self._url(path)
        delay = self.backoff
        renewed = False
        tries = tries or Tries(self.retries)
        while True:
            last = tries.left == 0
            h = dict(self.headers)
            if origin(url) != origin(self.base):
                # Another host's URL (an upload Location): the registry's credentials and
                # tokens are the registry's only (urllib3 drops them on redirects).
                h.pop("Authorization", None)
            h.update(headers or {})
            try:
                self._count(method)
                r = self.http.request(method, url, headers=h,
                                      body=None if body is None else body(),
                                      preload_content=False, redirect=True,
                                      retries=redirects(self.tls))
                if cut(r.connection):  # cut inside the headers, yet parsed: as below
                    discard(r)
                    raise AnswerTooSlow()
            except urllib3.exceptions.HTTPError as e:
                if last:
                    timed_out = isinstance(getattr(e, "reason", None) or e,
                                           urllib3.exceptions.TimeoutError)
                    raise (TooSlow if timed_out else RegistryError)(
                        f"{what}: {self.ref.host}: {reason(e)}") from None
            except AnswerTooSlow:  # headers dripped past the deadline: refused, no retry
                raise TooSlow(f"{what}: {self.ref.host}: {self._too_slow()}") from None
            except PlainHTTP as e:
                raise self._plain(what, e.url) from None
            except (ValueError, UnicodeError) as e:  # a Location or header urllib3 refuses
                raise RegistryError(f"{what}: {self.ref.host}: a malformed answer "
                                    f"({type(e).__name__}: {str(e)[:200]!r})") from None
            else:
                if r.status in ok:
                    return r
                challenge = r.headers.get("WWW-Authenticate", "")
                if r.status == 401 and challenge.startswith("Bearer ") and not renewed:
                    discard(r)
                    answered = answered_by(r, url)
                    if origin(answered) != origin(self.base):
                        # A redirect's target (a blob store) asking for a token: the
                        # registry's credentials and tokens are the registry's only.
                        raise RegistryError(f"{what}: {origin(answered)[1]!r}, where "
                                            f"{self.ref.host} redirected, asks for a token; "
                                            f"credentials are given to the registry only")
                    self._bearer(challenge, h.get("Authorization"), what)
                    renewed = True
                    continue  # at once, with the token: not a failed attempt
                text = error_text(r)
                if r.status not in _RETRY_STATUS or last:
                    raise RegistryError(f"{what}: {self.ref.host} answered {r.status}{text}")
            time.sleep(delay)
            delay *= 2
            tries.left -= 1

    def _plain(self, what: str, url: str) -> RegistryError:
        """The error of a request an HTTPS registry sent to plain HTTP (``url``, named
        without its query: a presigned URL's signature is the registry's secret)."""
        url = url.split("?", 1)[0].split("#", 1)[0]
        return RegistryError(f"{what}: sent to {url[:200]!r}, over plain HTTP: refused, the "
                             f"registry {self.ref.host} is reached over HTTPS")

    def _bearer(self, challenge: str, used: Optional[str], what: str):
        """Token authentication (the distribution spec's): ask the challenge's realm for a
        token for its service and scope, with the basic credentials if any; later requests
        carry it.  Another thread may have renewed it meanwhile: then nothing is asked."""
        fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = fields.pop("realm", "")
        if not realm.lower().startswith(("https://", "http://")):
            raise RegistryError(f"{what}: {self.ref.host} asks for a token from {realm!r}, "
                                f"not an http(s) URL")
        if leaves_tls(self.base, realm):
            raise self._plain(what, realm)
        where = f"{what}: token from {realm!r}"  # the registry's text: quoted, escaped
        with self.token_lock:
            if self.headers.get("Authorization") != used:
                return
            query = urllib.parse.urlencode({k: v for k, v in fields.items()
                                            if k in ("service", "scope")})
            url = f"{realm}{'&' if '?' in realm else '?'}{query}"
            h = {"User-Agent": "verityfuse"}
            # The password goes to a token service over TLS, or to the registry's own host
            # (a plain-http registry of one's own); elsewhere the token is asked for
            # anonymously.
            if self.basic and (realm.startswith("https://")
                               or origin(realm) == origin(self.base)):
                h["Authorization"] = self.basic
            try:
                self._count("token")
                r = self.http.request("GET", url, headers=h, preload_content=False,
                                      retries=redirects(self.tls))
            except urllib3.exceptions.HTTPError as e:
                raise RegistryError(f"{where}: {reason(e)}") from None
            except PlainHTTP as e:
                raise self._plain(where, e.url) from None
            except (ValueError, UnicodeError) as e:
                raise RegistryError(f"{where}: {type(e).__name__}: {str(e)[:200]!r}") from None
            if r.status != 200:
                raise RegistryError(f"{where}: answered {r.status}{error_text(r)}")
            body = self.read_body(r, where, 1 << 20)
            try:
                doc = json.loads(body)
                token = doc.get("token") or doc.get("access_token")
            except (ValueError, AttributeError, RecursionError):
                token = None
            # An HTTP header value: printable ASCII only (no CR/LF, nothing urllib3 cannot send).
            if not isinstance(token, str) or not re.fullmatch(r"[\x21-\x7e]+", token):
                raise RegistryError(f"{where}: no token in the answer")
            self.headers["Authorization"] = f"Bearer {token}"

    def _too_slow(self, seconds: Optional[float] = None) -> str:
        return f"the answer took longer than {seconds or READ_TIMEOUTS * self.timeout:.3g}s"

    def read_body(self, r: urllib3.BaseHTTPResponse, what: str, limit: int,
                  exact: Optional[int] = None) -> bytes:
        """The response's body, at most ``limit`` bytes (exactly ``exact`` if given), read
        before the response's deadline (oci_http: a few read timeouts, and more for a
        large body)."""
        want = limit if exact is None else exact
        # The answer's deadline, extended by what its announced size (at most ``want``)
        # needs at MIN_RATE: a large blob over a slow but honest link is not cut.
        seconds = READ_TIMEOUTS * self.timeout + min(content_length(r) or 0, want) / MIN_RATE
        deadline = time.monotonic() + seconds
        conn = r.connection  # (released, and None, if a read fails)
        if conn is not None:
            WATCHDOG.arm(conn, seconds)
        parts, n = [], 0
        try:
            while True:
                chunk = r.read(min(_CHUNK, want + 1 - n))
                if not chunk:
                    break
                parts.append(chunk)
                n += len(chunk)
                if n > want:
                    raise RegistryError(f"{what}: the body is longer than the {want} bytes "
                                        f"{'asked for' if exact is not None else 'allowed'}")
                if time.monotonic() > deadline:
                    raise TooSlow(f"{what}: {self._too_slow(seconds)}")
        except urllib3.exceptions.HTTPError as e:
            if cut(conn):  # the watchdog's doing: not worth another try
                raise TooSlow(f"{what}: {self._too_slow(seconds)}") from None
            raise BodyBroken(f"{what}: {reason(e)}") from None
        finally:
            # A body read to its end returns the connection to the pool; any other is
            # closed (its rest is not worth reading).
            discard(r)
            with self.lock:
                self.bytes_fetched += n
        if exact is not None and n != exact:
            raise RegistryError(f"{what}: the body is {n} bytes, {exact} were asked for")
        return b"".join(parts)

    # -- the distribution API -----------------------------------------------------------

    def _blob_path(self, digest: str) -> str:
        return f"/v2/{self.ref.repo}/blobs/{digest}"

    def check(self):
        """GET /v2/: the registry speaks the API (and the credentials are accepted)."""
        discard(self.request("GET", "/v2/", "registry API check"))

    def get_manifest(self, reference: str, limit: int) -> bytes:
        """GET an OCI image manifest by tag or digest (a digest is checked)."""
        what = f"manifest {self.ref.repo}:{reference}"
        r = self.request("GET", f"/v2/{self.ref.repo}/manifests/{reference}", what,
                         headers={"Accept": OCI_MANIFEST})
        body = self.read_body(r, what, limit)
        if reference.startswith("sha256:") and sha256_digest(body) != reference:
            raise RegistryError(f"{what}: the bytes hash to {sha256_digest(body)}")
        return body

    def _again(self, fetch: Callable[[Tries], bytes]) -> bytes:
        """``fetch(tries)``, tried again (with backoff) when the connection broke in the
        middle of the body: ``retries`` more requests at most in all, whatever failed (a
        5xx, a refused connection, a broken body), not ``retries`` for each cause."""
        delay = self.backoff
        tries = Tries(self.retries)
        while True:
            try:
                return fetch(tries)
            except BodyBroken:
                if tries.left == 0:
                    raise
                tries.left -= 1
                time.sleep(delay)
                delay *= 2

    def get_blob(self, digest: str, size: int, what: str) -> bytes:
        """A whole blob of ``size`` bytes whose SHA-256 must be ``digest``."""
        what = f"{what} (blob {digest})"

        def fetch(tries):
            r = self.request("GET", self._blob_path(digest), what, tries=tries)
            return self.read_body(r, what, size, exact=size)
        body = self._again(fetch)
        if sha256_digest(body) != digest:
            raise RegistryError(f"{what}: the bytes hash to {sha256_digest(body)}")
        return body

    def get_range(self, digest: str, start: int, length: int, what: str) -> bytes:
        """Bytes [start, start+length) of a blob: a 206 whose Content-Range is exactly
        that range, with exactly that many bytes."""
        end = start + length - 1

        def fetch(tries):
            r = self.request("GET", self._blob_path(digest), what, ok=(206,),
                             headers={"Range": f"bytes={start}-{end}"}, tries=tries)
            cr = r.headers.get("Content-Range", "")
            m = re.fullmatch(r"bytes (\d{1,20})-(\d{1,20})/(\d{1,20}|\*)", cr.strip())
            if not m or int(m.group(1)) != start or int(m.group(2)) != end:
                discard(r)
                raise RegistryError(f"{what}: asked for bytes {start}-{end}, the registry "
                                    f"answered Content-Range {cr[:80]!r}")
            return self.read_body(r, what, length, exact=length)
        return self._again(fetch)

    def close(self):
        self.http.clear()

