"""The native parser of store index entries against the Python one.

store_index.parse_entry reads an entry exactly as entry_bytes writes it natively
(_indexentry.c) and everything else with its Python parser.  The native route must
give the same IndexEntry as the Python route for every entry it accepts, and accept
nothing the Python route refuses: here on entries of every parameter (both hashes,
block sizes 1 KiB-64 KiB, salts of 0-32 bytes, signatures, paths of every character
the canonical form allows), on each kind of damage the Python parser names, and on
random mutations.  ``VERITYFUSE_FUZZ_SEED`` replays a run.
"""

import os
import random

import pytest

from verityfuse import merkle, store_index
from verityfuse.errors import StoreCorrupt
from verityfuse.store_index import entry_bytes, parse_entry

native = getattr(merkle._hashblocks, "index_entry", None)
pytestmark = pytest.mark.skipif(native is None, reason="native module not built")

SEED = int(os.environ.get("VERITYFUSE_FUZZ_SEED", str(random.SystemRandom().getrandbits(32))))
KEY = "ab" * 32
PATH_CHARS = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"\\')


def python_parse(data: bytes):
    """parse_entry's outcome without the native route: the entry, or the error text."""
    saved, store_index._native_entry = store_index._native_entry, None
    try:
        return parse_entry("E", KEY, data)
    except StoreCorrupt as e:
        return f"StoreCorrupt: {e}"
    finally:
        store_index._native_entry = saved


def both_routes(data: bytes):
    """parse_entry with the native route (as the daemon runs it) and without: equal."""
    try:
        got = parse_entry("E", KEY, data)
    except StoreCorrupt as e:
        got = f"StoreCorrupt: {e}"
    assert got == python_parse(data), data[:300]
    return got


def random_entry(rng: random.Random, inline: bool) -> bytes:
    alg = rng.choice((merkle.SHA256, merkle.SHA512))
    log_bs = rng.randint(10, 16)
    params = merkle.Params(alg, 1 << log_bs, rng.randbytes(rng.randint(0, 32))
                           if rng.random() < .5 else b"")
    size = rng.randint(0, params.block_size if inline else 1 << 30)
    desc = merkle.Descriptor.build(params, size, rng.randbytes(alg.digest_size))
    sig = rng.randbytes(rng.randint(1, 600)) if rng.random() < .3 else b""
    path = "".join(rng.choice(PATH_CHARS) for _ in range(rng.randint(0, 80)))
    return entry_bytes(alg, desc.digest, sig, path, desc if inline else None)


def test_native_route_gives_the_python_routes_entry_for_every_parameter():
    rng = random.Random(SEED)
    accepted = 0
    for i in range(400):
        data = random_entry(rng, inline=i % 2 == 0)
        entry = both_routes(data)
        assert not isinstance(entry, str), f"seed {SEED}: {entry}"
        accepted += native(data, merkle.MAX_BLOCK_SIZE) is not None
    assert accepted == 400, f"seed {SEED}"  # all canonical: none left to the Python parser


def _inline(alg=merkle.SHA256, log_bs=12, salt=b"", size=100, root=None):
    params = merkle.Params(alg, 1 << log_bs, salt)
    return merkle.Descriptor.build(params, size, root or bytes(range(alg.digest_size)))


def _with_raw(raw: bytes, digest_of: bytes = None):
    """An entry keeping descriptor bytes ``raw``, its digest that of ``digest_of`` (raw)."""
    d = merkle.file_digest(merkle.SHA256, digest_of if digest_of is not None else raw)
    return (f'{{"descriptor": "{raw.hex()}", "digest": "sha256:{d.hex()}", "path": "p", '
            f'"version": 2}}\n').encode()


def _patched(raw: bytes, at: int, value: int) -> bytes:
    b = bytearray(raw)
    b[at] = value
    return bytes(b)


GOOD = _inline().raw


@pytest.mark.parametrize("data,why", [
    (_with_raw(GOOD, digest_of=GOOD[:-1] + b"\1"), "digest of other bytes"),
    (_with_raw(_patched(GOOD, 0, 2)), "version 2"),
    (_with_raw(_patched(GOOD, 1, 2)), "sha512 descriptor under a sha256 digest"),
    (_with_raw(_patched(GOOD, 1, 9)), "unknown algorithm"),
    (_with_raw(_patched(GOOD, 2, 17)), "block size past MAX_BLOCK_SIZE"),
    (_with_raw(_patched(GOOD, 2, 5)), "block size below two hashes"),
    (_with_raw(_patched(GOOD, 3, 33)), "salt size past 32"),
    (_with_raw(_patched(GOOD, 4, 1)), "sig_size"),
    (_with_raw(_patched(GOOD, 9, 0x10)), "data size past the block: needs an object"),
    (_with_raw(_patched(GOOD, 16 + 32, 1)), "root hash padding"),
    (_with_raw(_patched(GOOD, 80, 1)), "salt byte past its size"),
    (_with_raw(_patched(GOOD, 255, 1)), "reserved byte"),
    (_with_raw(GOOD).replace(b"sha256:", b"SHA256:"), "algorithm in upper case"),
    (_with_raw(GOOD).replace(GOOD.hex().encode(), GOOD.hex()[:-2].encode()), "descriptor short"),
    (entry_bytes(merkle.SHA256, b"\1" * 31, b"", "p"), "digest short"),
    (entry_bytes(merkle.SHA256, b"\1" * 32, b"\2", "p").replace(b'02"', b'0"'), "odd signature"),
])
def test_damage_is_left_to_the_python_parser(data, why):
    assert native(data, merkle.MAX_BLOCK_SIZE) is None, why
    got = both_routes(data)
    assert isinstance(got, str) and got.startswith("StoreCorrupt: E: "), (why, got)


def test_other_spellings_are_read_by_the_python_parser():
    """Valid entries that entry_bytes does not write: JSON escapes, other spacing and
    order, no final newline or two, hex in upper case."""
    canon = entry_bytes(merkle.SHA256, b"\1" * 32, b"", "a\\b \u00e9")  # needs escaping
    assert native(canon, merkle.MAX_BLOCK_SIZE) is None
    assert both_routes(canon).path == "a\\b \u00e9"
    spaced = b'{ "version": 2, "digest": "sha256:' + b"01" * 32 + b'", "path": "p" }'
    plain = entry_bytes(merkle.SHA256, b"\1" * 32, b"", "p")
    for data in (spaced, plain[:-1], plain + b"\n"):
        assert native(data, merkle.MAX_BLOCK_SIZE) is None
        assert both_routes(data).digest == b"\1" * 32
    upper = _with_raw(GOOD).replace(GOOD.hex().encode(), GOOD.hex().upper().encode())
    assert native(upper, merkle.MAX_BLOCK_SIZE) is None
    assert both_routes(upper).descriptor == _inline()


def test_random_mutations_agree():
    rng = random.Random(SEED ^ 0x5EED)
    for i in range(300):
        data = bytearray(random_entry(rng, inline=i % 3 != 0))
        for _ in range(rng.randint(1, 3)):
            kind = rng.random()
            at = rng.randrange(len(data))
            if kind < .5:
                data[at] = rng.choice(b'0123456789abcdefABCDEF{}":, \\\n\0\xff' + bytes([data[at] ^ 1]))
            elif kind < .75:
                del data[at]
            else:
                data.insert(at, rng.randrange(256))
        both_routes(bytes(data))  # asserts equal, entry or error text; seed in the message
