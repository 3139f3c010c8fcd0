"""Trees built from the page cache (hash_mapped): the same bytes as from a copy, and a
file cut short under the mapping is an error, never a SIGBUS that ends the process."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from verityfuse import hashers, merkle, treebuild
from conftest import pattern

hb = merkle._hashblocks
needs_native = pytest.mark.skipif(hb is None, reason="native module not built "
                                  "(or VERITYFUSE_PURE_PYTHON is set)")
HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20


def ref_hashes(params, data):
    """hashlib over the blocks of data, the last zero-padded."""
    bs = params.block_size
    data = bytes(data) + bytes(-len(data) % bs)
    prefix = merkle.padded_salt(params)
    return b"".join(hashlib.new(params.alg.name, prefix + data[i:i + bs]).digest()
                    for i in range(0, len(data), bs))


def run_python(code, *args, faulthandler=True):
    """code in a fresh interpreter (a SIGBUS there ends that process, not pytest's)."""
    flags = ["-X", "faulthandler"] if faulthandler else []
    return subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, cwd=HERE, timeout=120)


@needs_native
@pytest.mark.parametrize("alg,bs,salt,offset,length", [
    (merkle.SHA256, 4096, b"", 0, 3 * MiB),                # whole blocks, the SHA-NI engine
    (merkle.SHA256, 4096, b"ab", MiB, 2 * MiB + 123),     # a partial last block, a salt
    (merkle.SHA256, 1024, bytes(range(32)), 4096, 5000),  # small blocks, an offset
    (merkle.SHA512, 65536, b"\x01", 0, 300001),           # OpenSSL, 64 KiB blocks
])
def test_a_mapped_range_hashes_as_its_bytes_read(tmp_path, alg, bs, salt, offset, length):
    p = merkle.Params(alg, bs, salt)
    path = tmp_path / "f"
    path.write_bytes(pattern(offset + length + 7))  # bytes after the range are not hashed
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, length, offset)
        assert hashers.mapped_hasher(p)(fd, offset, length) == ref_hashes(p, data)
    finally:
        os.close(fd)


@needs_native
def test_what_cannot_be_mapped_is_left_to_reads(tmp_path):
    """A pipe (or a file system without mmap) gives None; build_tree then reads, and the
    digest is the same as the mapped build's."""
    r, w = os.pipe()
    try:
        assert hashers.mapped_hasher(merkle.Params())(r, 0, 4096) is None
    finally:
        os.close(r)
        os.close(w)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_a_build_that_cannot_map_reads_and_gives_the_same_tree(tmp_path, monkeypatch, threads):
    path = tmp_path / "f"
    path.write_bytes(pattern(2 * treebuild.MAPPED_CHUNK + 5))  # three chunks
    params = merkle.Params(merkle.SHA256, 4096, b"s")
    fd = os.open(path, os.O_RDONLY)
    try:
        blocks = []
        mapped = treebuild.build_tree(fd, params, threads=threads,
                                      write_block=lambda o, b: blocks.append((o, b)))
        calls = []

        def refuses(params):
            def hm(fd, offset, length):
                calls.append(offset)
                return None
            return hm

        monkeypatch.setattr(hashers, "mapped_hasher", refuses)
        read_blocks = []
        read = treebuild.build_tree(fd, params, threads=threads,
                                    write_block=lambda o, b: read_blocks.append((o, b)))
    finally:
        os.close(fd)
    assert read == mapped and read_blocks == blocks
    assert len(calls) == threads  # each thread asked once, then read on


SHRINK = """
    import os, sys
    from verityfuse import hashers, merkle, treebuild
    path, threads = sys.argv[1], int(sys.argv[2])
    size = 9 << 20  # three mapped chunks: two threads hash them in workers
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    fd = os.open(path, os.O_RDWR)
    os.ftruncate(fd, (1 << 20) + 100)  # after the size was taken: the range outlives the file
    print(hashers.mapped_hasher(merkle.Params())(fd, 1 << 20, 2 << 20))
    try:
        treebuild.build_tree(fd, merkle.Params(), data_size=size, threads=threads)
    except OSError as e:
        print(e)
"""


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_a_file_cut_short_under_the_mapping_is_an_error_not_a_crash(tmp_path, threads):
    """The pages past the new end fault (SIGBUS), or read as zeros inside a large folio;
    either way the build says the file shrank, with Python's faulthandler (which
    installs its own SIGBUS handler) enabled as under pytest."""
    r = run_python(SHRINK, str(tmp_path / "f"), str(threads))
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == ("1048676\n"
                        "file shrank while hashing: expected 9437184 bytes, got 1048676\n")


@needs_native
@pytest.mark.parametrize("faulthandler", [False, True])
def test_a_sigbus_outside_a_build_still_ends_the_process(tmp_path, faulthandler):
    """The guard catches only its own faults: anyone else's SIGBUS goes where it went
    before (the default, or faulthandler's report), and the process dies of it."""
    code = """
        import mmap, os, sys
        from verityfuse import hashers, merkle
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
        os.ftruncate(fd, 8 << 20)
        assert isinstance(hashers.mapped_hasher(merkle.Params())(fd, 0, 8 << 20), bytes)
        m = mmap.mmap(fd, 8 << 20, prot=mmap.PROT_READ)
        os.ftruncate(fd, 0)
        print("touching", flush=True)
        m[(8 << 20) - 1]
        print("survived")
    """
    r = run_python(code, str(tmp_path / "f"), faulthandler=faulthandler)
    assert r.returncode == -signal.SIGBUS
    assert r.stdout == "touching\n"
    assert ("Fatal Python error: Bus error" in r.stderr) == faulthandler


@needs_native
def test_digest_of_a_file_truncated_while_it_runs_fails_cleanly(tmp_path):
    """The attack itself: another process cuts the file while `verityfuse digest` maps
    it.  Each run prints the digest of the whole file (it finished first) or says the
    file shrank; none dies of a signal."""
    path = tmp_path / "f"
    outcomes = set()
    for delay in (0, 0.02, 0.05, 0.1, 0.2):
        path.write_bytes(bytes(256 * MiB))
        p = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "verityfuse",
                              "digest", "--threads", "2", str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
        time.sleep(delay)
        os.truncate(path, 4096)
        out, err = p.communicate(timeout=120)
        assert p.returncode in (0, 1), (p.returncode, err)
        if p.returncode == 0:
            assert out.startswith("sha256:") and err == ""
            outcomes.add("finished")
        else:
            assert "file shrank while hashing: expected 268435456 bytes, got" in err, err
            outcomes.add("shrank")
    assert "shrank" in outcomes  # the attack did land at least once
