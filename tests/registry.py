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
import time
import urllib.request

import pytest

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


class Registry:
    """A running registry; ``host`` is 127.0.0.1:PORT, ``storage`` its blob directory."""

    def __init__(self, tmp: pathlib.Path, timeout: float = 20.0):
        exe = binary()
        self.dir = tmp
        self.storage = tmp / "storage"
        self.storage.mkdir(parents=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        config = tmp / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n")
        self.log_path = tmp / "registry.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen([exe, "serve", str(config)], stdin=subprocess.DEVNULL,
                                        stdout=self._log, stderr=subprocess.STDOUT, cwd=tmp)
        try:
            self._wait(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"docker-registry exited with {self.process.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')}")
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1) as r:
                    if r.status == 200:
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
