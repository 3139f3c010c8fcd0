"""A real OCI registry for the tests: Debian's docker-registry (distribution 2.8).

``make registry-deps`` (e2e/fetch-registry.sh) unpacks the package into
build/registry/root; it is never installed, because installing it starts a
system service.  ``Registry`` runs that binary on 127.0.0.1 and a free port
with a configuration and a storage directory in the test's temporary
directory, waits until ``/v2/`` answers, and always stops it.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import ssl
import time
import urllib.error
import urllib.request

import pytest

from conftest import PortTaken

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD = pathlib.Path(os.environ.get("REGISTRY_DIR", ROOT / "build" / "registry"))
BINARY = BUILD / "root" / "usr" / "bin" / "docker-registry"


def binary() -> str:
    """The unpacked registry, fetched with ``make registry-deps`` first if it is missing;
    skips the test (saying why) only when it cannot be had."""
    if not BINARY.exists():
        r = subprocess.run(["make", "-C", str(ROOT), "registry-deps", f"REGISTRY_DIR={BUILD}"],
                           capture_output=True, text=True)
        if r.returncode != 0 or not BINARY.exists():
            pytest.skip(f"no docker-registry at {BINARY}, and `make registry-deps` could not "
                        f"fetch it: {(r.stderr or r.stdout).strip()[-300:]}")
    return str(BINARY)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tls(tmp: pathlib.Path):
    """A test CA and a certificate for 127.0.0.1 signed by it: (ca.pem, cert.pem, key.pem)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, key, sign_key, ca: bool):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return b.sign(sign_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "verityfuse test CA")])
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    paths = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    paths[0].write_bytes(cert(ca_name, ca_name, ca_key, ca_key, True)
                         .public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert(name, ca_name, key, ca_key, False)
                         .public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def htpasswd_line(user: str, password: str) -> str:
    """A bcrypt htpasswd entry (the registry's htpasswd auth accepts bcrypt only)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    return f"{user}:{crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 4))}\n"


class Registry:
    """A running registry; ``host`` is 127.0.0.1:PORT, ``storage`` its blob directory.
    ``tls``: serve HTTPS with a certificate from a test CA (``ca`` is its file);
    ``users``: {user: password} for basic auth (htpasswd)."""

    def __init__(self, tmp: pathlib.Path, timeout: float = 20.0, tls: bool = False,
                 users=None):
        exe = binary()
        self.dir = tmp
        self.storage = tmp / "storage"
        self.storage.mkdir(parents=True)
        config = tmp / "config.yml"
        head = ("version: 0.1\n"
                "log:\n  level: warn\n"
                f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
                "  delete:\n    enabled: true\n")
        tail = ""
        self.ca = None
        if tls:
            self.ca, cert, key = make_tls(tmp)
            tail += f"  tls:\n    certificate: {cert}\n    key: {key}\n"
        if users:
            htpasswd = tmp / "htpasswd"
            htpasswd.write_text("".join(htpasswd_line(u, p) for u, p in users.items()))
            tail += f"auth:\n  htpasswd:\n    realm: verityfuse-test\n    path: {htpasswd}\n"
        self.log_path = tmp / "registry.log"
        # The port is free when picked and bound by the registry a moment later: another
        # process may take it in between (an outgoing connection's port), so a start
        # that finds it taken picks another, twice at most.
        for attempt in range(3):
            self.port = free_port()
            self.host = f"127.0.0.1:{self.port}"
            config.write_text(f"{head}http:\n  addr: {self.host}\n{tail}")
            self._log = open(self.log_path, "wb")
            self.process = subprocess.Popen([exe, "serve", str(config)], stdin=subprocess.DEVNULL,
                                            stdout=self._log, stderr=subprocess.STDOUT, cwd=tmp)
            try:
                self._wait(timeout)
                return
            except PortTaken:
                self.stop()
                if attempt == 2:
                    raise
            except BaseException:
                self.stop()
                raise

    def _wait(self, timeout: float):
        deadline = time.monotonic() + timeout
        scheme, context = "http", None
        if self.ca:
            scheme, context = "https", ssl.create_default_context(cafile=str(self.ca))
        while True:
            if self.process.poll() is not None:
                log = self.log_path.read_text(errors="replace")
                kind = PortTaken if "address already in use" in log else RuntimeError
                raise kind(f"docker-registry exited with {self.process.returncode}: {log}")
            try:
                with urllib.request.urlopen(f"{scheme}://{self.host}/v2/", timeout=1,
                                            context=context) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:
                if e.code == 401:  # up, and asking for credentials
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry not answering /v2/ after {timeout}s")
            time.sleep(0.05)

    def blob_path(self, digest: str) -> pathlib.Path:
        """Where the filesystem driver keeps a blob's bytes (distribution's layout)."""
        alg, hexd = digest.split(":", 1)
        return (self.storage / "docker" / "registry" / "v2" / "blobs" / alg / hexd[:2] / hexd
                / "data")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture
def registry(tmp_path):
    r = Registry(tmp_path / "registry")
    try:
        yield r
    finally:
        r.stop()
