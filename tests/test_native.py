"""The native hasher (_hashblocks): exact bytes against hashlib for every block
size and salt, with the 2-way SHA-NI engine and with OpenSSL, verify_blocks'
first-mismatch answer (also when a request is split across threads), and the
tree build's threading semantics.  No timing assertions."""

import hashlib
import os
import random
import subprocess
import sys
import threading

import pytest

from verityfuse import hashers, merkle, treebuild
from test_merkle import UTILS_VECTORS
from conftest import pattern

hb = merkle._hashblocks
needs_native = pytest.mark.skipif(hb is None, reason="native module not built "
                                  "(or VERITYFUSE_PURE_PYTHON is set)")
SHANI = hb is not None and hb.info()["sha256"] == "sha-ni-2way"
needs_shani = pytest.mark.skipif(not SHANI, reason="the CPU has no SHA-NI (or "
                                 "VERITYFUSE_NO_SHANI is set): the OpenSSL path is tested")
HERE = os.path.dirname(os.path.abspath(__file__))

BLOCK_SIZES = [1 << k for k in range(6, 17)]          # 64 B .. 64 KiB
SALTS = [b"", b"\x01", bytes(range(1, 17)), bytes(range(100, 132))]
COUNTS = [0, 1, 2, 3, 7, 8]


def ref_hashes(params, data):
    prefix, bs = merkle.padded_salt(params), params.block_size
    return b"".join(hashlib.new(params.alg.name, prefix + bytes(data[i:i + bs])).digest()
                    for i in range(0, len(data), bs))


def exhaustive_check():
    """Every block size, salt, block count and a misaligned view, hash and verify,
    against hashlib.  Run here and, with VERITYFUSE_NO_SHANI=1, in a subprocess."""
    rng = random.Random(575)
    for alg in (merkle.SHA256, merkle.SHA512):
        for bs in BLOCK_SIZES:
            if bs < 2 * alg.digest_size:
                continue
            for salt in SALTS:
                p = merkle.Params(alg, bs, salt)
                prefix = merkle.padded_salt(p)
                for n in COUNTS:
                    raw = rng.randbytes(n * bs + 17)
                    for shift in (0, 1, 17):  # memoryview slices at odd addresses
                        data = memoryview(raw)[shift:shift + n * bs]
                        want = ref_hashes(p, data)
                        for threads in (1, 2):
                            assert hb.hash_blocks(alg.number, prefix, data, bs, threads) == want, \
                                (alg.name, bs, salt, n, shift)
                            assert hb.verify_blocks(alg.number, prefix, data, bs, want,
                                                    threads) == -1
                    if n:
                        bad = bytearray(want)
                        bad[-1] ^= 1
                        assert hb.verify_blocks(alg.number, prefix, data, bs, bytes(bad)) == n - 1


def one_shot_check():
    """hb.sha256 (what sealing hashes a descriptor and a key with) against hashlib, for
    every length of one to five blocks and their padding edges (55, 56, 63, 64 bytes
    into a block: one padding block or two), and a few long messages."""
    rng = random.Random(7)
    for n in list(range(0, 330)) + [1000, 4096, 65537]:
        data = bytes(rng.getrandbits(8) for _ in range(n))
        assert hb.sha256(data) == hashlib.sha256(data).digest(), n
    assert hb.sha256(memoryview(b"abc")) == hashlib.sha256(b"abc").digest()


@needs_native
def test_one_message_sha256_matches_hashlib():
    if hb.info()["cpu_sha_ni"] and not os.environ.get("VERITYFUSE_NO_SHANI"):
        assert SHANI  # this half tests the SHA-NI path, the other OpenSSL's
    one_shot_check()
    without_shani("one_shot_check")


def without_shani(check: str):
    """Run this module's ``check()`` in a process where SHA-NI is off (OpenSSL's path)."""
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import test_native as t\n"
            "assert t.hb.info()['sha256'] == 'openssl', t.hb.info()\n"
            "t.%s()\n" % (HERE, check))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, VERITYFUSE_NO_SHANI="1"), timeout=300)
    assert r.returncode == 0, r.stderr


@needs_native
def test_every_block_size_and_salt_match_hashlib():
    exhaustive_check()


@needs_native
def test_every_block_size_and_salt_match_hashlib_without_shani():
    without_shani("exhaustive_check")


@needs_shani
def test_shani_engine_is_selected():
    info = hb.info()
    assert info["sha256"] == "sha-ni-2way" and info["sha512"] == "openssl"
    assert info["cpu_sha_ni"] is True


@needs_native
def test_prefix_not_a_whole_compression_block_still_hashes_right():
    # Not what fs-verity produces, but the API accepts any prefix: OpenSSL handles it.
    data = os.urandom(4 * 4096)
    for prefix in (b"x", bytes(63), bytes(65), bytes(128)):
        want = b"".join(hashlib.sha256(prefix + data[i:i + 4096]).digest()
                        for i in range(0, len(data), 4096))
        assert hb.hash_blocks(1, prefix, data, 4096) == want


def _big(n_blocks=2048, bs=4096, seed=1):
    """8 MiB of 4 KiB blocks (enough to be split across the helper) and its hashes."""
    data = random.Random(seed).randbytes(n_blocks * bs)
    return data, b"".join(hashlib.sha256(data[i:i + bs]).digest()
                          for i in range(0, len(data), bs))


def _corrupt(data, blocks, bs=4096):
    b = bytearray(data)
    for i in blocks:
        b[i * bs + 123] ^= 0x40
    return bytes(b)


MISMATCHES = [[0], [1], [1000], [1023, 1024], [2047], [5, 9, 2047], [2046, 700, 1500], [17, 1800]]


@needs_native
@pytest.mark.parametrize("threads", [0, 1, 2])
@pytest.mark.parametrize("bad", MISMATCHES)
def test_verify_returns_the_first_mismatch(bad, threads):
    data, hashes = _big()
    assert hb.verify_blocks(1, b"", data, 4096, hashes, threads) == -1
    assert hb.verify_blocks(1, b"", _corrupt(data, bad), 4096, hashes, threads) == min(bad)
    # A wrong expected hash, rather than wrong data, is found the same way.
    exp = bytearray(hashes)
    for i in bad:
        exp[i * 32 + 31] ^= 1
    assert hb.verify_blocks(1, b"", data, 4096, bytes(exp), threads) == min(bad)


@needs_native
def test_hash_blocks_large_buffer_with_and_without_helper():
    data, hashes = _big(seed=2)
    for threads in (0, 1, 2):
        assert hb.hash_blocks(1, b"", data, 4096, threads) == hashes
    hb.configure(1)
    try:
        assert hb.info()["threads"] == 1
        jobs = hb.info()["helper_jobs"]
        assert hb.hash_blocks(1, b"", data, 4096) == hashes
        assert hb.verify_blocks(1, b"", _corrupt(data, [7]), 4096, hashes) == 7
        assert hb.info()["helper_jobs"] == jobs  # threads=1: the helper was not asked
        hb.configure(2)  # the helper sleeps after each job: every request wakes it
        for _ in range(5):
            assert hb.verify_blocks(1, b"", _corrupt(data, [2000]), 4096, hashes) == 2000
    finally:
        hb.configure(2)


@needs_native
def test_the_helper_shares_the_pieces_of_a_request():
    """Each of 8 MiB requests is offered to the helper; pieces are counted on both
    sides, and every piece of a request is run exactly once (or the hashes or the
    verdict would be wrong)."""
    data, hashes = _big(seed=3)
    before, alone = hb.info()["split_pieces"], hb.info()["jobs_alone"]
    for _ in range(20):
        assert hb.verify_blocks(1, b"", data, 4096, hashes, 2) == -1
    caller, helper = (a - b for a, b in zip(hb.info()["split_pieces"], before))
    alone = hb.info()["jobs_alone"] - alone  # on a busy machine, after a slow helper
    # 8 MiB in 32 KiB pieces; the caller does what the helper did not claim.
    assert caller + helper == (20 - alone) * 256
    assert sorted(hb.info()) == ["cpu_sha_ni", "helper_jobs", "helper_running", "jobs_alone",
                                 "sha256", "sha512", "split_pieces", "threads", "wait_us"]
    assert hb.info()["helper_running"]


@needs_native
def test_four_python_threads_at_once():
    cases = []
    for t in range(4):
        data, hashes = _big(n_blocks=1024 + 256 * t, seed=10 + t)
        bad = [None, [0], [3 + 100 * t, 900], [1023 + 256 * t]][t]
        cases.append((_corrupt(data, bad) if bad else data, hashes, min(bad) if bad else -1))
    errors = []

    def run(t):
        data, hashes, want = cases[t]
        try:
            for _ in range(20):
                got = hb.verify_blocks(1, b"", data, 4096, hashes)
                assert got == want, (t, got, want)
                if want == -1:
                    assert hb.hash_blocks(1, b"", data, 4096) == hashes
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    ts = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors


@needs_native
def test_sha512_through_both_functions():
    p = merkle.Params(merkle.SHA512, 4096, b"abcd")
    prefix = merkle.padded_salt(p)
    assert len(prefix) == 128
    data = random.Random(5).randbytes(600 * 4096)
    want = ref_hashes(p, data)
    assert hb.hash_blocks(2, prefix, data, 4096) == want
    assert hb.verify_blocks(2, prefix, data, 4096, want) == -1
    assert hb.verify_blocks(2, prefix, _corrupt(data, [599, 300]), 4096, want) == 300


@needs_native
def test_arguments_are_checked():
    d = bytes(8192)
    with pytest.raises(ValueError, match="unknown hash algorithm"):
        hb.hash_blocks(3, b"", d, 4096)
    with pytest.raises(ValueError, match="block_size must be positive"):
        hb.hash_blocks(1, b"", d, 0)
    with pytest.raises(ValueError, match="not a whole number"):
        hb.hash_blocks(1, b"", d[:5000], 4096)
    with pytest.raises(ValueError, match="not a whole number"):
        hb.verify_blocks(1, b"", d[:5000], 4096, bytes(32))
    with pytest.raises(ValueError, match="expected hashes are 32 bytes, but 2 blocks need 64"):
        hb.verify_blocks(1, b"", d, 4096, bytes(32))
    with pytest.raises(ValueError, match="expected hashes"):
        hb.verify_blocks(2, b"", d, 4096, bytes(64))
    with pytest.raises(ValueError, match="threads must be >= 0"):
        hb.hash_blocks(1, b"", d, 4096, -1)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        hb.configure(0)
    with pytest.raises(TypeError):
        hb.configure(2, spin_us=0)  # the helper no longer polls: no knob
    with pytest.raises(TypeError):
        hb.hash_blocks(1, b"", "text", 4096)
    with pytest.raises(TypeError):
        hb.verify_blocks(1, b"", d, 4096)
    assert hb.hash_blocks(1, b"", b"", 4096) == b""
    assert hb.verify_blocks(1, b"", b"", 4096, b"") == -1


@needs_native
def test_helper_restarts_after_fork():
    code = """
import hashlib, os, sys
from verityfuse import _hashblocks as hb
data = os.urandom(2048 * 4096)
hashes = b"".join(hashlib.sha256(data[i:i + 4096]).digest() for i in range(0, len(data), 4096))
assert hb.verify_blocks(1, b"", data, 4096, hashes) == -1       # starts the helper
assert hb.info()["helper_running"]
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        ok = (not hb.info()["helper_running"]
              and all(hb.verify_blocks(1, b"", data, 4096, hashes) == -1 for _ in range(5))
              and hb.info()["helper_running"] and hb.hash_blocks(1, b"", data, 4096) == hashes)
        os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0
assert hb.verify_blocks(1, b"", data, 4096, hashes) == -1
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# -- merkle glue -------------------------------------------------------------

@pytest.mark.parametrize("native", [True, False])
def test_blocks_verifier_native_and_pure_python(monkeypatch, native):
    if native and hb is None:
        pytest.skip("native module not built")
    monkeypatch.setattr(hashers, "NATIVE", native)
    for p in (merkle.Params(), merkle.Params(merkle.SHA256, 1024, b"salt"),
              merkle.Params(merkle.SHA512, 2048, b"x" * 32)):
        data = random.Random(p.block_size).randbytes(40 * p.block_size)
        want = ref_hashes(p, data)
        assert p.blocks_hasher()(data) == want
        assert p.blocks_hasher(threads=1)(data) == want
        v = p.blocks_verifier()
        assert v(data, want) == -1
        assert v(memoryview(data)[:0], b"") == -1
        for bad in ([0], [39], [12, 30]):
            b = bytearray(data)
            for i in bad:
                b[i * p.block_size] ^= 1
            assert v(b, want) == min(bad)
        with pytest.raises(ValueError):
            v(data[:-1], want)
        with pytest.raises(ValueError):
            v(data, want[:-1])
        # A partial last block is refused by both engines, never silently dropped.
        with pytest.raises(ValueError, match="not a whole number"):
            p.blocks_hasher()(data[:-1])
        for make in (p.blocks_hasher, p.blocks_verifier, p.read_verifier):
            with pytest.raises(ValueError, match="threads must be >= 0"):
                make(threads=-1)


def _memfd(data):
    fd = os.memfd_create("verityfuse-test")
    os.write(fd, data)
    return fd


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_build_tree_order_progress_and_size_checks(threads):
    size = 5 * treebuild.MAPPED_CHUNK + 12345
    data = random.Random(threads).randbytes(size)
    fd = _memfd(data)
    try:
        params = merkle.Params(merkle.SHA256, 4096, b"ab")
        writes, progress = [], []
        desc = treebuild.build_tree(fd, params, write_block=lambda o, b: writes.append((o, b)),
                                 threads=threads, progress=progress.append)
        ref_writes = []
        ref = treebuild.build_tree(fd, params, write_block=lambda o, b: ref_writes.append((o, b)),
                                threads=1)
        assert desc == ref and writes == ref_writes  # same blocks, same callback order
        assert progress == sorted(progress) and progress[-1] == size
        assert len(progress) == 6  # mapped (a memfd can be): chunks of MAPPED_CHUNK
        before = threading.active_count()
        with pytest.raises(OSError, match="shrank"):
            treebuild.build_tree(fd, params, data_size=size + 3 * treebuild.CHUNK_SIZE, threads=threads)
        with pytest.raises(OSError, match="grew"):
            treebuild.build_tree(fd, params, data_size=size - 5000, threads=threads)
        calls = []

        def cancel():
            calls.append(1)
            return len(calls) > 2

        with pytest.raises(treebuild.Cancelled):
            treebuild.build_tree(fd, params, threads=threads, cancel=cancel)
        assert threading.active_count() == before  # no worker left behind
    finally:
        os.close(fd)


def test_known_answers_without_shani():
    """fsverity-utils' vectors (reference §4.3 A) with the OpenSSL engine, 1 and 2 threads."""
    if hb is None:
        pytest.skip("native module not built")
    code = """
import os, sys
sys.path.insert(0, %r)
from verityfuse import merkle, treebuild
from test_merkle import UTILS_VECTORS
from conftest import pattern
assert merkle._hashblocks.info()["sha256"] == "openssl"
for size, alg, bs, salt, want in UTILS_VECTORS:
    fd = os.memfd_create("v"); os.write(fd, pattern(size))
    for threads in (1, 2):
        got = treebuild.build_tree(fd, merkle.Params(merkle.hash_alg(alg), bs, salt), threads=threads)
        assert got.digest.hex() == want, (size, alg, bs, salt, threads)
    os.close(fd)
""" % HERE
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, VERITYFUSE_NO_SHANI="1"), timeout=300)
    assert r.returncode == 0, r.stderr


def test_known_answers_in_process_big_chunks():
    """The 1e6-byte vectors again through verify: every block of the pattern verifies
    against the leaf hashes the tree build produced."""
    size, alg, bs, salt, want = UTILS_VECTORS[0]
    data = pattern(size)
    fd = _memfd(data)
    tree = {}
    try:
        params = merkle.Params(merkle.hash_alg(alg), bs, salt)
        desc = treebuild.build_tree(fd, params, write_block=tree.__setitem__, threads=2)
    finally:
        os.close(fd)
    assert desc.digest.hex() == want
    geo = desc.geometry
    leaves = b"".join(tree[(geo.level_start[0] + i) * bs] for i in range(geo.level_blocks[0]))
    padded = data.ljust(geo.num_data_blocks * bs, b"\0")
    expected = leaves[:geo.num_data_blocks * params.alg.digest_size]
    assert params.blocks_verifier()(padded, expected) == -1


# -- read_verify: pread + hash + compare in one call --------------------------

def _file(tmp_path, data, name="f"):
    """A regular file on the test's filesystem (RWF_NOWAIT needs one, not a memfd)."""
    p = tmp_path / name
    p.write_bytes(data)
    return os.open(p, os.O_RDONLY)


def _both_read_verifiers(monkeypatch, p, threads=0):
    """The native and the pure-Python read_verifier of p (native None if not built)."""
    monkeypatch.setattr(hashers, "NATIVE", False)
    pure = p.read_verifier(threads)
    monkeypatch.setattr(hashers, "NATIVE", hb is not None)
    return (p.read_verifier(threads) if hb is not None else None), pure


def _outcome(rv, nbuf, expected, fd, offset, length, flags=0):
    """(result or exception type and message, the buffer's bytes) of one call."""
    buf = bytearray(b"\xee" * nbuf)
    try:
        r = rv(buf, expected, fd, offset, length, flags)
    except (OSError, EOFError, ValueError, TypeError) as e:
        return (type(e), str(e)), None
    return r, bytes(buf)


@pytest.mark.parametrize("p", [merkle.Params(), merkle.Params(merkle.SHA256, 1024, b"salt"),
                               merkle.Params(merkle.SHA512, 4096, b"x" * 32),
                               merkle.Params(merkle.SHA256, 65536)])
@pytest.mark.parametrize("threads", [0, 1, 2])
def test_read_verify_native_and_pure_python_agree_with_hashlib(tmp_path, monkeypatch, p, threads):
    bs, ds = p.block_size, p.alg.digest_size
    nblocks = max(8, (1536 << 10) // bs)  # past the split threshold: both threads read
    size = nblocks * bs - 777               # the last block is short, zero-padded
    data = random.Random(bs + threads).randbytes(size)
    padded = data.ljust(nblocks * bs, b"\0")
    hashes = ref_hashes(p, padded)
    fd = _file(tmp_path, data)
    try:
        native, pure = _both_read_verifiers(monkeypatch, p, threads)
        cases = [(0, nblocks, size), (3, 2, 2 * bs), (nblocks - 1, 1, bs - 777),
                 (nblocks - 3, 3, 3 * bs - 777), (1, nblocks - 1, size - bs), (5, 0, 0)]
        for first, n, length in cases:
            exp = hashes[first * ds:(first + n) * ds]
            want = _outcome(pure, n * bs, exp, fd, first * bs, length)
            assert want == (-1, padded[first * bs:(first + n) * bs]), (first, n)
            if native:
                assert _outcome(native, n * bs, exp, fd, first * bs, length) == want, (first, n)
        # Wrong bytes read (the expected hashes of other blocks): the first block, named.
        for rv in filter(None, (native, pure)):
            assert _outcome(rv, 2 * bs, hashes[:2 * ds], fd, 2 * bs, 2 * bs)[0] == 0
        # One bad expected hash deep in a large request: its index, from both.
        for bad in ([nblocks - 2], [nblocks // 2, nblocks - 1], [1, 2]):
            exp = bytearray(hashes)
            for i in bad:
                exp[i * ds + ds // 2] ^= 0x10
            for rv in filter(None, (native, pure)):
                got = _outcome(rv, nblocks * bs, bytes(exp), fd, 0, size)
                assert got[0] == min(bad)
                # The bytes up to the bad block were read and are the file's.
                assert got[1][:min(bad) * bs] == padded[:min(bad) * bs]
    finally:
        os.close(fd)


def test_read_verify_failed_reads_win_over_mismatches(tmp_path, monkeypatch):
    p = merkle.Params()
    data = random.Random(9).randbytes(300 * 4096)
    hashes = ref_hashes(p, data)
    fd = _file(tmp_path, data)
    try:
        native, pure = _both_read_verifiers(monkeypatch, p)
        exp = hashes[250 * 32:] + bytes(32 * 50)  # 100 blocks at 250: 50 past the end
        for rv in filter(None, (native, pure)):
            # The file ends at block 300: EOF at its exact offset, whatever the hashes,
            # also when an earlier piece (block 250, or 251 on the other thread) mismatches.
            for bad in (None, 0, 1):
                e = bytearray(exp)
                if bad is not None:
                    e[bad * 32] ^= 1
                for flags in (0, os.RWF_NOWAIT):
                    assert _outcome(rv, 100 * 4096, bytes(e), fd, 250 * 4096, 100 * 4096,
                                    flags)[0] == (
                        EOFError, f"end of file at byte {300 * 4096}: {100 * 4096} bytes "
                        f"wanted at offset {250 * 4096}")
            assert _outcome(rv, 4096, bytes(32), fd, 400 * 4096, 4096)[0] == (
                EOFError, f"end of file at byte {400 * 4096}: 4096 bytes wanted at offset "
                f"{400 * 4096}")
            # Reading nothing past the end is no read: all-zero blocks, hashed.
            zero = hashlib.sha256(bytes(4096)).digest()
            assert _outcome(rv, 4096, zero, fd, 400 * 4096, 0) == (-1, bytes(4096))
        bad_fd = os.open(tmp_path, os.O_RDONLY)  # a directory: EISDIR from the read
        mem = os.memfd_create("verityfuse-test")  # shmem: RWF_NOWAIT is not supported
        os.write(mem, data)
        try:
            outs = [(_outcome(rv, 8192, hashes[:64], bad_fd, 0, 8192),
                     _outcome(rv, 8192, hashes[:64], mem, 0, 8192, os.RWF_NOWAIT),
                     _outcome(rv, 8192, hashes[:64], mem, 0, 8192),
                     _outcome(rv, 8192, hashes[:64], fd, 0, 8192, os.RWF_NOWAIT))
                    for rv in filter(None, (native, pure))]
        finally:
            os.close(bad_fd)
            os.close(mem)
        assert outs[0][0][0][0] is IsADirectoryError
        assert outs[0][1][0][0] is OSError and "Errno 95" in outs[0][1][0][1]
        assert outs[0][2] == outs[0][3] == (-1, data[:8192])  # just written: cached
        assert all(o == outs[0] for o in outs)
    finally:
        os.close(fd)


def test_read_verify_arguments_are_checked(tmp_path, monkeypatch):
    p = merkle.Params()
    fd = _file(tmp_path, bytes(8192))
    try:
        native, pure = _both_read_verifiers(monkeypatch, p)
        for rv in filter(None, (native, pure)):
            def err(buf, exp, offset, length):
                with pytest.raises(ValueError) as e:
                    rv(buf, exp, fd, offset, length)
                return str(e.value)

            assert err(bytearray(5000), bytes(32), 0, 10) == \
                "data (5000 bytes) is not a whole number of 4096-byte blocks"
            assert err(bytearray(8192), bytes(32), 0, 10) == \
                "expected hashes are 32 bytes, but 2 blocks need 64 bytes of hashes"
            assert err(bytearray(8192), bytes(64), 0, 8193) == \
                "length 8193 is not between 0 and the buffer's 8192 bytes"
            assert err(bytearray(8192), bytes(64), 0, -1) == \
                "length -1 is not between 0 and the buffer's 8192 bytes"
            assert err(bytearray(8192), bytes(64), -4096, 10) == "offset -4096 is out of range"
            with pytest.raises(TypeError):
                rv(bytes(8192), bytes(64), fd, 0, 8192)  # the buffer must be writable
    finally:
        os.close(fd)


@needs_native
def test_read_verify_from_four_python_threads_at_once(tmp_path):
    """The daemon's request thread and its worker threads read at the same time: each
    call gets its own bytes and verdict (one of them at most shares the helper)."""
    data = random.Random(21).randbytes(4 << 20)
    hashes = ref_hashes(merkle.Params(), data)
    fd = _file(tmp_path, data)
    errors = []

    def run(t):
        try:
            first, n = 128 * t, 256 + 64 * t  # 1-1.75 MiB each, overlapping
            exp = bytearray(hashes[first * 32:(first + n) * 32])
            if t % 2:
                exp[(n - 5 - t) * 32] ^= 1
            want = n - 5 - t if t % 2 else -1
            for _ in range(20):
                buf = bytearray(n * 4096)
                got = hb.read_verify(1, b"", buf, 4096, bytes(exp), fd, first * 4096, n * 4096)
                assert got == want, (t, got, want)
                assert buf[:(n - 6 - t) * 4096] == data[first * 4096:(first + n - 6 - t) * 4096]
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    ts = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    try:
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        os.close(fd)
    assert not errors, errors
