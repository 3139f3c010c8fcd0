"""Differential fuzzing of the native hasher against hashlib (and of whole-file digests
against fsverity-utils): the code that decides every read's fate is checked on random
inputs beyond the known-answer vectors and the exhaustive grid of test_native.

Random block counts (including ones large enough to be shared with the helper thread),
block sizes, salts of every length, odd buffer addresses, and corruptions at random
blocks (verify must name the first).  Each run draws a new seed and prints it on
failure; ``VERITYFUSE_FUZZ_SEED`` replays one.  ``make test`` runs a brief pass;
``VERITYFUSE_FUZZ_ITERATIONS=100000 pytest tests/test_native_fuzz.py`` a long one.
"""

import hashlib
import os
import random
import subprocess

import pytest

import verityfuse
from verityfuse import hashers, merkle
from conftest import FSVERITY

hb = merkle._hashblocks
ITERATIONS = int(os.environ.get("VERITYFUSE_FUZZ_ITERATIONS", "1000"))
SEED = int(os.environ.get("VERITYFUSE_FUZZ_SEED", str(random.SystemRandom().getrandbits(32))))
needs_native = pytest.mark.skipif(hb is None, reason="native module not built "
                                  "(or VERITYFUSE_PURE_PYTHON is set)")


def random_case(rng):
    alg = rng.choice((merkle.SHA256, merkle.SHA512))
    bs = 1 << rng.randint(max(6, (2 * alg.digest_size - 1).bit_length()), 16)
    salt = rng.randbytes(rng.randint(0, 32))
    # Mostly few blocks; sometimes enough bytes (> 256 KiB) to be split across threads.
    n = rng.choice((0, 1, 2, 3, rng.randint(4, 64), max(1, (512 << 10) // bs)))
    return merkle.Params(alg, bs, salt), n


def reference(params, data):
    prefix, bs = merkle.padded_salt(params), params.block_size
    return b"".join(hashlib.new(params.alg.name, prefix + bytes(data[i:i + bs])).digest()
                    for i in range(0, len(data), bs))


@needs_native
def test_native_hash_and_verify_agree_with_hashlib():
    rng = random.Random(SEED)
    for it in range(ITERATIONS):
        p, n = random_case(rng)
        bs, ds = p.block_size, p.alg.digest_size
        shift = rng.choice((0, 1, 3, 8, 63, rng.randint(0, 4095)))
        raw = rng.randbytes(shift + n * bs)
        data = memoryview(raw)[shift:]
        threads = rng.choice((0, 1, 2))
        where = f"seed {SEED} iteration {it}: {p.describe()}, {n} blocks at +{shift}, {threads} threads"
        want = reference(p, data)
        prefix = merkle.padded_salt(p)
        assert hb.hash_blocks(p.alg.number, prefix, data, bs, threads) == want, where
        assert hb.verify_blocks(p.alg.number, prefix, data, bs, want, threads) == -1, where
        if n:
            bad = sorted(rng.sample(range(n), rng.randint(1, min(n, 3))))
            broken = bytearray(raw)
            for i in bad:
                broken[shift + i * bs + rng.randrange(bs)] ^= 1 << rng.randrange(8)
            got = hb.verify_blocks(p.alg.number, prefix, memoryview(broken)[shift:], bs, want,
                                   threads)
            assert got == bad[0], where
            wrong = bytearray(want)  # a wrong expected hash is found the same way
            i = rng.randrange(n)
            wrong[i * ds + rng.randrange(ds)] ^= 1
            assert hb.verify_blocks(p.alg.number, prefix, data, bs, bytes(wrong), threads) == i, \
                where


@pytest.mark.skipif(FSVERITY is None, reason="fsverity-utils is not installed")
def test_whole_file_digests_agree_with_fsverity_utils(tmp_path):
    """A few random files and parameters per run, native (or pure) digest vs `fsverity digest`."""
    rng = random.Random(SEED)
    for it in range(max(3, ITERATIONS // 60)):
        alg = rng.choice(("sha256", "sha512"))
        bs = 1 << rng.randint(10, 16)
        salt = rng.randbytes(rng.randint(0, 32))
        size = rng.choice((0, 1, bs - 1, bs, bs + 1, rng.randint(0, 300000)))
        f = tmp_path / f"f{it}"
        f.write_bytes(rng.randbytes(size))
        args = [f"--hash-alg={alg}", f"--block-size={bs}"] + ([f"--salt={salt.hex()}"] if salt else [])
        want = subprocess.run([FSVERITY, "digest", str(f), *args], check=True, capture_output=True,
                              text=True).stdout.split()[0]
        got = str(verityfuse.digest(f, hash_alg=alg, block_size=bs, salt=salt))
        assert got == want, f"seed {SEED} iteration {it}: {alg}, {bs}, salt {salt.hex()}, {size} bytes"


@needs_native
def test_native_read_verify_agrees_with_pure_python_and_hashlib(tmp_path, monkeypatch):
    """read_verify on random files, ranges, short tails and corruptions: the native call
    and the pure-Python fallback give the same answer, the same bytes and the same errors,
    and an answer of -1 means every block hashed (hashlib) to its expected value."""
    rng = random.Random(SEED)
    for it in range(max(20, ITERATIONS // 10)):
        p, n = random_case(rng)
        bs, ds = p.block_size, p.alg.digest_size
        size = rng.choice((n * bs, max(0, n * bs - rng.randint(1, bs)), n * bs + rng.randint(1, bs)))
        content = rng.randbytes(size)
        path = tmp_path / f"f{it}"
        path.write_bytes(content)
        fd = os.open(path, os.O_RDONLY)
        try:
            first = rng.randint(0, n)
            count = rng.randint(0, n - first)
            offset = first * bs
            length = rng.choice((count * bs, max(0, count * bs - rng.randint(0, bs)),
                                 rng.randint(0, count * bs)))
            # The blocks as the file holds them (zero-padded past its end), their hashes.
            padded = content[offset:offset + length].ljust(count * bs, b"\0")
            expected = bytearray(reference(p, padded))
            if count and rng.random() < 0.5:
                for i in rng.sample(range(count), rng.randint(1, min(count, 3))):
                    expected[i * ds + rng.randrange(ds)] ^= 1 << rng.randrange(8)
            threads = rng.choice((0, 1, 2))
            flags = rng.choice((0, os.RWF_NOWAIT))
            where = (f"seed {SEED} iteration {it}: {p.describe()}, file {size} bytes, blocks "
                     f"{first}+{count}, length {length}, {threads} threads, flags {flags}")
            outs = []
            for native in (True, False):
                monkeypatch.setattr(hashers, "NATIVE", native)
                buf = bytearray(b"\xa5" * (count * bs))
                if flags:  # in the page cache for each engine (memory pressure, -n 2)
                    os.pread(fd, length, offset)
                try:
                    r = p.read_verifier(threads)(buf, bytes(expected), fd, offset, length, flags)
                except (OSError, EOFError) as e:
                    outs.append((type(e), str(e)))
                    continue
                # Blocks before the answer are the file's bytes and hash as expected.
                good = count if r == -1 else r
                assert bytes(buf[:good * bs]) == padded[:good * bs], where
                assert reference(p, buf[:good * bs]) == bytes(expected[:good * ds]), where
                if r >= 0:
                    assert reference(p, buf[r * bs:(r + 1) * bs]) != bytes(expected[r * ds:(r + 1) * ds]), where
                outs.append(r)
            assert outs[0] == outs[1], where
            if length and offset + length > size:  # (reading nothing is no read)
                assert outs[0][0] is EOFError, where
        finally:
            os.close(fd)
