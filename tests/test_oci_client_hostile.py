"""oci_client.Client against registries that lie, on 127.0.0.1 (no mount, no real registry).

Each test serves a few hand-written answers from a tiny HTTP server and checks what the
client sends back (credentials above all) and that every bad answer is a RegistryError,
never another exception (which the daemon would report as a bug) or a credential given
away.  tests/test_oci.py covers the same client through mounts and the real registry.
"""

import base64
import http.server
import io
import json
import threading
import time

import pytest

pytest.importorskip("urllib3")

from verityfuse.jsonout import error  # noqa: E402
from verityfuse.oci_client import Client, RegistryError  # noqa: E402
from verityfuse.oci_ref import parse_ref  # noqa: E402

BLOB = "sha256:" + "cd" * 32
ALICE = "Basic " + base64.b64encode(b"alice:s3cret").decode()


class Server:
    """Answers each request with ``answer(path) -> (status, headers, body)`` and records
    (method, path, Authorization) of each."""

    def __init__(self, tls=None):
        self.answer = lambda path: (404, [], b"")
        self.seen = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self):
                owner.seen.append((self.command, self.path, self.headers.get("Authorization")))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, headers, body = owner.answer(self.path)
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                if not any(k.lower() == "content-length" for k, _ in headers):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = do_PATCH = do_PUT = _any

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:  # an ssl.SSLContext: this server speaks HTTPS
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def servers():
    made = []

    def make(tls=None):
        made.append(Server(tls))
        return made[-1]
    yield make
    for s in made:
        s.stop()


def client(reg, timeout=2, retries=0, **kw):
    return Client(parse_ref(f"{reg.host}/vf/t"), timeout=timeout, retries=retries, **kw)


def test_a_redirect_target_asking_for_a_token_gets_no_credentials(servers):
    """A registry may send blob reads to a blob store on another host (urllib3 gives that
    host no Authorization); if that host answers with a token challenge naming a token
    service of its choosing, the registry's password must not go there, and no token
    from there may be sent to the registry."""
    reg, store, thief = servers(), servers(), servers()
    reg.answer = lambda p: (307, [("Location", f"http://{store.host}{p}")], b"")
    store.answer = lambda p: (401, [("WWW-Authenticate",
                                     f'Bearer realm="http://{thief.host}/token",service="x"')],
                              b"")
    thief.answer = lambda p: (200, [], json.dumps({"token": "evil"}).encode())
    c = client(reg, auth=("alice", "s3cret"))
    with pytest.raises(RegistryError) as e:
        c.get_range(BLOB, 0, 10, "blob")
    assert f"'{store.host}', where {reg.host} redirected, asks for a token" in str(e.value)
    assert thief.seen == []
    assert [a for *_, a in store.seen] == [None]
    assert c.headers["Authorization"] == ALICE


def test_a_relative_redirect_stays_with_the_host_that_sent_it(servers):
    """The registry sends a read to a blob store, which redirects to itself with a
    relative Location and then asks for a token: still the blob store's challenge (urllib3
    reports only the last Location, as written), so no credential or token goes there."""
    reg, store, thief = servers(), servers(), servers()
    reg.answer = lambda p: (307, [("Location", f"http://{store.host}/x")], b"")
    store.answer = lambda p: ((302, [("Location", "/y")], b"") if p == "/x" else
                              (401, [("WWW-Authenticate",
                                      f'Bearer realm="https://{thief.host}/token"')], b""))
    c = client(reg, auth=("alice", "s3cret"))
    with pytest.raises(RegistryError) as e:
        c.get_range(BLOB, 0, 10, "blob")
    assert f"'{store.host}', where {reg.host} redirected, asks for a token" in str(e.value)
    assert thief.seen == [] and c.headers["Authorization"] == ALICE


def test_an_upload_location_elsewhere_gets_no_credentials(servers):
    """The registry's answer to an upload's POST names where the bytes go; on another
    host, the registry's credentials must not follow them there."""
    reg, other = servers(), servers()
    reg.answer = lambda p: (202, [("Location", f"http://{other.host}/up/1?state=x")], b"")
    other.answer = lambda p: (201, [], b"")
    c = client(reg, auth=("alice", "s3cret"))
    c.upload_blob(BLOB, 3, lambda: io.BytesIO(b"abc"))
    assert reg.seen == [("POST", "/v2/vf/t/blobs/uploads/", ALICE)]
    assert other.seen == [("PUT", f"/up/1?state=x&digest={BLOB.replace(':', '%3A')}", None)]


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """(server context, CA file) of a self-signed certificate for 127.0.0.1."""
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vf-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    d = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    return ctx, str(d / "cert.pem")


@pytest.mark.parametrize("how", ["blob redirect", "upload location", "token realm"])
def test_an_https_registry_is_never_left_for_plain_http(servers, tls, how):
    """A registry reached over HTTPS that sends a read, an upload or a token request to
    plain HTTP: refused before anything is sent there (the image's bytes, its uploads,
    a token or a password would cross the network in clear).  The error names the URL
    without its query (a presigned URL's signature is the registry's secret)."""
    ctx, ca = tls
    reg, plain = servers(ctx), servers()
    target = f"http://{plain.host}/elsewhere?X-Amz-Signature=s3cr3t"
    reg.answer = {
        "blob redirect": lambda p: (307, [("Location", target)], b""),
        "upload location": lambda p: (202, [("Location", target)], b""),
        "token realm": lambda p: (401, [("WWW-Authenticate", f'Bearer realm="{target}"')],
                                  b""),
    }[how]
    plain.answer = lambda p: (200, [], json.dumps({"token": "t"}).encode())
    c = client(reg, auth=("alice", "s3cret"), https=True, ca_file=ca)
    with pytest.raises(RegistryError) as e:
        if how == "upload location":
            c.upload_blob(BLOB, 3, lambda: io.BytesIO(b"abc"))
        else:
            c.get_range(BLOB, 0, 10, "blob")
    shown = f"http://{plain.host}/elsewhere"
    assert f"{shown!r}" in str(e.value) and "plain HTTP" in str(e.value), str(e.value)
    assert "s3cr3t" not in str(e.value)
    assert plain.seen == []
    assert len(reg.seen) == 1


def test_a_plain_http_registrys_redirects_are_followed_whatever_their_scheme():
    """The HTTPS rule is the client's: one of a plain-HTTP registry follows a blob store's
    redirect from HTTPS to HTTP (as before), each redirect keeping the rule."""
    from verityfuse.oci_http import Redirects, redirects

    class Pool:
        scheme, host, port = "https", "store.example", 443

    class Response:
        status = 307

        def get_redirect_location(self):
            return "http://plain.example/b"

    for tls in (False, True):
        r = redirects(tls)
        assert type(r) is Redirects and r.tls is tls
    after = redirects(False).increment("GET", "https://store.example/a", Response(), _pool=Pool())
    assert type(after) is Redirects and after.tls is False and len(after.history) == 1


def test_an_https_registry_may_redirect_to_another_https_host(servers, tls):
    ctx, ca = tls
    reg, store = servers(ctx), servers(ctx)
    reg.answer = lambda p: (307, [("Location", f"https://{store.host}/b")], b"")
    store.answer = lambda p: (206, [("Content-Range", "bytes 0-2/3")], b"abc")
    c = client(reg, auth=("alice", "s3cret"), https=True, ca_file=ca)
    assert c.get_range(BLOB, 0, 3, "blob") == b"abc"
    assert [a for *_, a in store.seen] == [None]  # urllib3 strips it across hosts


@pytest.mark.parametrize("realm_on", ["registry", "other host"])
def test_basic_credentials_go_to_the_registrys_own_token_service_only(servers, realm_on):
    """Over plain http the password goes to a token service on the registry's own host
    only; another host's (named by the registry's challenge) is asked anonymously."""
    reg, other = servers(), servers()
    svc = reg if realm_on == "registry" else other

    def registry(path):
        if path.startswith("/token"):
            return 200, [], json.dumps({"token": "tok"}).encode()
        if reg.seen[-1][2] == "Bearer tok":
            return 200, [], b"{}"
        return 401, [("WWW-Authenticate", f'Bearer realm="http://{svc.host}/token"')], b""
    reg.answer = registry
    other.answer = lambda p: (200, [], json.dumps({"token": "tok"}).encode())
    c = client(reg, auth=("alice", "s3cret"))
    c.check()
    [(_, path, auth)] = [s for s in svc.seen if s[1].startswith("/token")]
    assert auth == (ALICE if realm_on == "registry" else None)
    assert reg.seen[-1][2] == "Bearer tok"


@pytest.mark.parametrize("token", ["t\u20ac", "a b", "", "x\x1b[2J"])
def test_a_token_that_is_not_printable_ascii_is_refused(servers, token):
    reg = servers()
    reg.answer = lambda p: ((200, [], json.dumps({"token": token}).encode())
                            if p.startswith("/token") else
                            (401, [("WWW-Authenticate", f'Bearer realm="http://{reg.host}/token"')],
                             b""))
    c = client(reg)
    with pytest.raises(RegistryError) as e:
        c.check()
    assert str(e.value).endswith("/token': no token in the answer")
    assert "Authorization" not in c.headers


def test_a_realm_with_control_characters_is_quoted_escaped(servers):
    reg = servers()
    reg.answer = lambda p: (401, [("WWW-Authenticate",
                                   'Bearer realm="http://127.0.0.1:1/\x1b]0;PWNED\x07"')], b"")
    with pytest.raises(RegistryError) as e:
        client(reg).check()
    assert "token from 'http://127.0.0.1:1/\\x1b]0;PWNED\\x07'" in str(e.value)
    assert "\x1b" not in str(e.value)


@pytest.mark.parametrize("what, answer", [
    ("range", (206, [("Content-Range", "bytes " + "9" * 5000 + "-9/10")], b"0123456789")),
    ("head", (200, [("Content-Length", "12abc")], b"")),
    ("redirect", (307, [("Location", "http://\x1b[31mevil/")], b"")),
])
def test_malformed_answers_are_registry_errors(servers, what, answer):
    """Numbers Python refuses to parse, a Location urllib3 refuses: each a RegistryError
    (the block's EIO and its one log line), not a ValueError reported as a bug."""
    reg = servers()
    reg.answer = lambda p: answer
    c = client(reg)
    with pytest.raises(RegistryError):
        if what == "head":
            c.blob_size(BLOB)
        else:
            c.get_range(BLOB, 0, 10, "blob")


class Dripping(Server):
    """A registry that sends its answer one byte at a time, each well within the read
    timeout, until the client hangs up (or 30 s have passed)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what
        handler = self.httpd.RequestHandlerClass

        def drip(h):
            head = (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-4095/8192\r\n"
                    b"Content-Length: 4096\r\n\r\n")
            data = (head + b"x" * 4096) if self.what != "body" else b"x" * 4096
            if self.what == "body":
                h.wfile.write(head)
            # "status": the deadline (3 s) falls inside the status line (30 bytes, 7.5 s),
            # which http.client then cannot parse (an exception inside urllib3, not a
            # response).  A pause well within the read timeout (1 s), for every case: a
            # pause near it is a socket timeout, and a retry, whenever this thread is late.
            pause = 0.25
            try:
                for i in range(len(data)):
                    h.wfile.write(data[i:i + 1])
                    h.wfile.flush()
                    time.sleep(pause)
                    if i * pause > 30:
                        break  # 30 s: the client did not give up
            except OSError:
                pass  # it hung up: as it should
            h.close_connection = True
        handler.do_GET = drip


@pytest.mark.parametrize("what", ["status", "headers", "body"])
def test_a_registry_that_drips_its_answer_is_cut_at_the_deadline(what):
    """Each byte arrives within the read timeout (1 s), so no socket timeout fires: the
    answer as a whole must still be complete within 3 read timeouts, or the request
    fails (EIO for the read behind it), naming why, and is not tried again."""
    reg = Dripping(what)
    try:
        c = client(reg, timeout=1, retries=2)
        with pytest.raises(RegistryError) as e:
            c.get_range(BLOB, 0, 4096, "blob")
        assert "the answer took longer than 3" in str(e.value)
        assert c.requests == {"GET": 1}
    finally:
        reg.stop()


def test_a_commands_error_line_is_escaped(capsys):
    """What a registry or a manifest said may reach `mount`'s error line at start-up."""
    error("token from 'x\x1b]0;PWNED\x07\x1b[2J'")
    assert capsys.readouterr().err == "ERROR: token from 'x\\x1b]0;PWNED\\x07\\x1b[2J'\n"


def test_retries_of_every_cause_share_one_budget(servers):
    """A fetch is tried 1 + retries times in all (protocol/oci-artifact.md): 5xx answers,
    then a body that breaks off, each retried retries times on its own made 16 requests
    of one fetch with retries=3 (and, with answers dripped to just under the deadline,
    ~36 read timeouts for one block)."""
    reg = servers()
    answers = iter([(503, [], b"busy")] * 3)

    def answer(path):
        # Then a 206 that promises 4096 bytes and sends 100: a broken body, every time.
        return next(answers, (206, [("Content-Range", "bytes 0-4095/8192"),
                                    ("Content-Length", "4096")], b"x" * 100))
    reg.answer = answer
    c = client(reg, retries=3, backoff=0)
    with pytest.raises(RegistryError):
        c.get_range(BLOB, 0, 4096, "blob")
    assert c.requests == {"GET": 4}
