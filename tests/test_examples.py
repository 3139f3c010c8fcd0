"""The examples in examples/ run as documented (they mount for real)."""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
ENV = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")


def run(*cmd):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=ENV, timeout=300)


@pytest.mark.mount
def test_demo():
    r = run(EXAMPLES / "demo.sh")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "data.bin: identical through the mount" in r.stdout
    assert "block 100 fails with EIO, as it must" in r.stdout
    assert "block 101 still reads: 4096 bytes" in r.stdout
    assert "integrity failure: data.bin: data block at offset 409600" in r.stdout
    assert "docs/hello.txt fails with EIO, and the violation is measured" in r.stdout
    assert "register: matches the replayed log" in r.stdout
    assert "#2 IntegrityViolation" in r.stdout and "path=docs/hello.txt offset=0" in r.stdout
    assert "no longer served there:\ngithub.com/verityfuse/verityfuse UnmountManifest " in r.stdout


@pytest.mark.mount
def test_confidential_container_flow():
    r = run(EXAMPLES / "confidential_container.sh")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("refused as expected") == 5
    assert "config: mode 644 in the guest, 4777 on the share" in r.stdout
    assert "mount refused:" in r.stdout and "is not the pinned" in r.stdout
    assert "Every attack was refused." in r.stdout


@pytest.mark.mount
def test_fixture_example():
    r = run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", EXAMPLES / "test_with_fixture.py")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 passed" in r.stdout


def test_library_example():
    r = run(sys.executable, EXAMPLES / "library.py")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify app.bin: corrupt: data block at offset 40960: expected" in r.stdout
    assert "verify config: ok" in r.stdout
    assert "block 9 reads: 4096 bytes" in r.stdout and "block 10: Input/output error" in r.stdout
