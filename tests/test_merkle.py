"""Merkle tree geometry, hashing, descriptor and digest against known answers
and against fsverity-utils (the oracle)."""

import errno
import hashlib
import os
import random

import pytest

from verityfuse import merkle, treebuild
from verityfuse.errors import FileTooLarge, InvalidDescriptor, InvalidParameters, SaltTooLong
from conftest import fsverity_digest, pattern, write


def build(path, params, data_size=None):
    """(descriptor, tree bytes) of a file, the tree collected from write_block."""
    tree = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        desc = treebuild.build_tree(fd, params, data_size, write_block=lambda o, b: tree.__setitem__(o, b))
    finally:
        os.close(fd)
    out = bytearray(desc.geometry.tree_size)
    for off, block in tree.items():
        out[off:off + len(block)] = block
    return desc, bytes(out)


# fsverity-utils programs/test_compute_digest.c (reference §4.3 A).
UTILS_VECTORS = [
    (1000000, "sha256", 4096, b"", "48df0c462329cd879661bd05b39aa81b05cc16afd27a7196a559da83531d39d9"),
    (100000, "sha256", 4096, b"", "f2096a36c5cdca4fa33ee8852833150bb324992e5417a9d571f1bffff73b9efc"),
    (4096, "sha256", 4096, b"", "6ac39979016e3ddf3d39fff6cb984f7c118acdf1852919f5c100c4b142c1818e"),
    (1, "sha256", 4096, b"", "b803429503d95915829b29fdbc8bbad142f3abfd11b1cadf5526582e685c0551"),
    (0, "sha256", 4096, b"", "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"),
    (1000000, "sha256", 4096, b"abcd", "917900b0d299454aa304d5debc6f39e4af7b5abe33bdbc568d5d8f1e5c4d8652"),
    (1000000, "sha256", 4096, b"0123456789:;<=>?@ABCDEFGHIJKLMNO",
     "bc2d70324c048c220a2cb190832140863eb268e680427939e5d467bea5ec5ad9"),
    (1000000, "sha256", 1024, b"", "e9df927c14fcb961d5f51c666d8ae4c14fe4ff98a374c733e898d00c9e74a8e3"),
    (1000000, "sha256", 512, b"", "0393ee3dfd4a28966e2af4e07cfa5b032c30da5bb8e8ef63b9a55bf963262334"),
    (1000000, "sha256", 65536, b"", "f3b6418f26d4d0e74728193bae76f15cb4bb2ce9777448d76bd8138b69ec61c2"),
    (1000000, "sha512", 4096, b"abcd",
     "8425c6d0c94f84ed904c12936845fbb7af9953753789712dcc3be142db3d4b6b"
     "47a399ad52aa609256ce29a960bf4bb0e595ec386ca58c06519d546dc5b197bb"),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("size,alg,bs,salt,want", UTILS_VECTORS)
def test_fsverity_utils_vectors(tmp_path, size, alg, bs, salt, want, threads):
    p = write(tmp_path / "f", pattern(size))
    fd = os.open(p, os.O_RDONLY)
    desc = treebuild.build_tree(fd, merkle.Params(merkle.hash_alg(alg), bs, salt), threads=threads)
    os.close(fd)
    assert desc.digest.hex() == want


# xfstests generic/575 (reference §4.3 B): zero-filled files.
SALT_575 = bytes.fromhex("f3c93fa6fb828c0e1587e5714ecf6f56")
XFSTESTS_575 = {
    ("sha256", 1024): ["f2cca36b9b1b7f07814e4284b10121809133e7cb9c4528c8f6846e85fc624ffa",
                       "ea08590a4fe9c3d6c9dafe0eedacd9dffff8f24e24f1865ee3af132a495ab087",
                       "527496288d703686e31092f5cca7e1306b2467f00b247ad01056ee5ec35a4bb9",
                       "087818b23312acb15dff9ff6e2b4f601406d08bb36013542444cc15248f47016"],
    ("sha256", 4096): ["3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95",
                       "babc284ee4ffe7f449377fbf6692715b43aec7bc39c094a95878904d34bac97e",
                       "011e3f2b1dc89b75d78cddcc2a1b85cd8a64b2883e5f20f277ae4c0617e0404f",
                       "9d33cab743468fcbe4edab91a275b30dd543c12dd5e6ce6f2f737f66a1558f06"],
    ("sha512", 4096): [
        "ccf9e5aea1c2a64efa2f2354a6024b90dffde6bbc017825045dce374474e13d1"
        "0adb9dadcc6ca8e17a3c075fbd31336e8f266ae6fa93a6c3bed66f9e784e5abf",
        "928922686c4caf32175f5236a7f964e9925d10a74dc6d8344a8bd08b23c228ff"
        "5792573987d7895f628f39c4f4ebe39a7367d7aeb16aaa0cd324ac1d53664e61",
        "eab7224ce374a0a4babcb2db25e24836247f38b87806ad9be9e5ba4daac2f5b8"
        "14fc0cbdfd9f1f8499b3c9a6c1b38fe08974cce49883ab4ccd04462fd2f9507f",
        "f7083a38644880d25539488313e9e5b41a4d431a0e383945129ad2c36e3c1d0f"
        "28928a424641bb1363c12b6e770578102566acea73baf1ce8ee15336f5ba2446"],
}


@pytest.mark.parametrize("alg,bs", list(XFSTESTS_575))
def test_xfstests_575(tmp_path, alg, bs):
    want = XFSTESTS_575[(alg, bs)]
    cases = [(0, b"", want[0]), (4096, b"", want[1]), (65536, b"", want[2]),
             (65536, b"", want[2]),  # --salt= is the same as no salt
             (100000000, SALT_575, want[3])]
    for size, salt, digest in cases:
        p = tmp_path / "f"
        with open(p, "wb") as f:
            f.truncate(size)  # sparse zeros read as zeros
        fd = os.open(p, os.O_RDONLY)
        desc = treebuild.build_tree(fd, merkle.Params(merkle.hash_alg(alg), bs, salt))
        os.close(fd)
        assert desc.digest.hex() == digest, (size, salt)


def test_worked_example_5120_byte_tree(tmp_path):
    """reference §1.2: 100000 zeros, SHA-256, B=1024: 4 leaf blocks + 1 level-1 block."""
    p = write(tmp_path / "f", bytes(100000))
    desc, tree = build(p, merkle.Params(merkle.SHA256, 1024))
    geo = desc.geometry
    assert geo.num_data_blocks == 98
    assert geo.level_blocks == (4, 1) and geo.level_start == (1, 0)
    assert len(tree) == 5120
    assert hashlib.sha256(tree[:1024]).hexdigest() == desc.root_hash.hex() == \
        "68c538e11958d65d68b6fe8e9fb8ccabecfd928b01d06344e223ed41ddc4544a"
    leaf = [hashlib.sha256(tree[1024 * i:1024 * (i + 1)]).hexdigest() for i in range(1, 5)]
    assert leaf[:3] == ["f789baab53859faf36d6d75d1042064294202d6e13e7716f394fba434ccc4986"] * 3
    assert leaf[3] == "00fed03c5d6eab213143f3d96a5ca31c2b89f5684e6c8e07873e5e976517b48f"
    assert desc.raw[:16] == bytes.fromhex("01010a0000000000a086010000000000")
    assert desc.digest.hex() == "09cbbaeed2a04c2da242c10e1568d96f358a16aa1ebe8cf0286120c13c9366d1"


def test_empty_and_one_block_files():
    p = merkle.Params()
    assert merkle.Geometry.compute(p, 0).tree_size == 0
    assert merkle.Geometry.compute(p, 1).tree_size == 0
    assert merkle.Geometry.compute(p, 4096).tree_size == 0
    assert merkle.Geometry.compute(p, 4097).level_blocks == (1,)
    assert merkle.Geometry.compute(p, 4096 * 128 + 1).level_blocks == (2, 1)


def test_formatted_digest_for_builtin_sig():
    d = bytes.fromhex("3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95")
    assert merkle.formatted_digest(merkle.SHA256, d).hex() == "4653566572697479" "0100" "2000" + d.hex()


def _sizes(bs, alg):
    hpb = bs // merkle.hash_alg(alg).digest_size
    return [0, 1, bs - 1, bs, bs + 1, 3 * bs + 7,
            bs * hpb + 1,             # two levels
            bs * hpb * 2 + bs // 2]   # a partial second leaf block


@pytest.mark.parametrize("alg,bs,salt", [
    ("sha256", 4096, ""), ("sha256", 1024, "abcd"), ("sha256", 1024, "00" * 32),
    ("sha512", 4096, "f3c93fa6fb828c0e1587e5714ecf6f56"), ("sha512", 1024, ""),
    ("sha256", 65536, "11"), ("sha512", 2048, "aa" * 17),
])
def test_cross_check_against_fsverity_utils(tmp_path, alg, bs, salt):
    rng = random.Random(f"{alg}{bs}{salt}")
    sizes = _sizes(bs, alg)
    if bs == 1024:
        # three levels: more than hpb**2 data blocks
        sizes.append(bs * (bs // merkle.hash_alg(alg).digest_size) ** 2 + 5)
    params = merkle.Params(merkle.hash_alg(alg), bs, bytes.fromhex(salt))
    for size in sizes:
        p = tmp_path / "f"
        with open(p, "wb") as f:
            # Large sizes: random head and tail around a hole, so they stay cheap.
            f.write(rng.randbytes(min(size, 1 << 20)))
            if size > 1 << 20:
                f.seek(size - 4097)
                f.write(rng.randbytes(4097))
        p = str(p)
        desc, tree = build(p, params)
        opts = [f"--hash-alg={alg}", f"--block-size={bs}"] + ([f"--salt={salt}"] if salt else [])
        line, otree, odesc = fsverity_digest(p, *opts)
        assert line == f"{alg}:{desc.digest.hex()} {p}", size
        assert tree == otree, size
        assert desc.raw == odesc, size


# (params kwargs, exception, message fragment): what fsverity-utils rejects.
INVALID = [
    (dict(block_size=3000), InvalidParameters, "power of 2"),
    (dict(block_size=0), InvalidParameters, "power of 2"),
    (dict(block_size=-4096), InvalidParameters, "power of 2"),
    (dict(block_size=1), InvalidParameters, "too small for hash algorithm sha256"),
    (dict(block_size=32), InvalidParameters, "too small for hash algorithm sha256"),
    (dict(block_size=64, alg=merkle.SHA512), InvalidParameters, "too small for hash algorithm sha512"),
    (dict(salt=bytes(33)), SaltTooLong, "unsupported salt size (33)"),
    (dict(salt=bytes(1000)), SaltTooLong, "unsupported salt size (1000)"),
]


@pytest.mark.parametrize("kw,exc,msg", INVALID)
def test_invalid_parameters(kw, exc, msg):
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        merkle.Params(**kw)


@pytest.mark.parametrize("name", ["md5", "sha1", "", 0, 3, 257])
def test_unknown_hash_algorithm(name):
    with pytest.raises(InvalidParameters, match="unknown hash algorithm"):
        merkle.hash_alg(name)


def test_boundary_parameters_accepted():
    merkle.Params(merkle.SHA256, 64)      # exactly 2*D
    merkle.Params(merkle.SHA512, 128)
    merkle.Params(salt=bytes(32))


def test_too_many_levels_is_efbig():
    with pytest.raises(FileTooLarge) as e:
        merkle.Geometry.compute(merkle.Params(merkle.SHA512, 128), 1 << 40)
    assert e.value.errno == 27  # EFBIG


def test_descriptor_validation():
    p = merkle.Params(salt=b"ab")
    raw = merkle.make_descriptor(p, 5, bytes(32))
    assert merkle.parse_descriptor(raw).params == p
    bad = [raw[:255], b"\x02" + raw[1:], raw[:1] + b"\x03" + raw[2:],
           raw[:3] + b"\x21" + raw[4:], raw[:4] + b"\x01" + raw[5:], raw[:255] + b"\x01",
           raw[:2] + b"\x03" + raw[3:]]
    for b in bad:
        with pytest.raises(InvalidDescriptor):
            merkle.parse_descriptor(b)


def test_descriptor_parameters_are_shared_and_bounded():
    """parse_descriptor makes each Params once (one store or manifest has few), but
    never keeps more than _PARAMS_MAX of them: a salt per file must not grow memory."""
    merkle._PARAMS.clear()
    for i in range(3 * merkle._PARAMS_MAX):
        p = merkle.Params(salt=i.to_bytes(2, "big"))
        d = merkle.parse_descriptor(merkle.make_descriptor(p, i, bytes(32)))
        assert d.params == p and d.data_size == i
        assert len(merkle._PARAMS) <= merkle._PARAMS_MAX
    a = merkle.parse_descriptor(merkle.make_descriptor(merkle.Params(), 1, bytes(32)))
    b = merkle.parse_descriptor(merkle.make_descriptor(merkle.Params(), 2, bytes(32)))
    assert a.params is b.params
    # A refused parameter set raises every time; it is not remembered.
    raw = merkle.make_descriptor(merkle.Params(), 1, bytes(32))
    small = raw[:2] + b"\x05" + raw[3:]  # 32-byte blocks: too small for SHA-256
    for _ in range(2):
        with pytest.raises(InvalidDescriptor, match="too small"):
            merkle.parse_descriptor(small)


@pytest.mark.parametrize("threads", [1, 2])
def test_file_written_in_place_while_hashing_is_an_error(tmp_path, threads):
    """Rewritten in place once a chunk was hashed (same size, other bytes): the
    digest would be of a mix the file never held.  ETXTBSY, naming what moved."""
    size = 5 * treebuild.CHUNK_SIZE
    p = write(tmp_path / "f", b"A" * size)
    fd = os.open(p, os.O_RDONLY)
    try:
        def rewrite(done):  # after the first chunk (4 MiB mapped, or 1 MiB read)
            if done < size:
                with open(p, "r+b") as f:
                    f.write(b"B" * size)

        with pytest.raises(OSError, match=r"^\[Errno 26\] file changed while it was read "
                                          r"\(mtime \d+\.\d{9} -> \d+\.\d{9}\)$") as e:
            treebuild.build_tree(fd, merkle.Params(), threads=threads, progress=rewrite)
        assert e.value.errno == errno.ETXTBSY
        # Unchanged since: the same file hashes as fsverity digest says.
        assert treebuild.build_tree(fd, merkle.Params(), threads=threads).digest.hex() == \
            fsverity_digest(p)[0].split(":")[1].split()[0]
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [10000, 100])  # a tree; one block (one pread)
def test_file_changing_size_while_hashing_is_an_error(tmp_path, size):
    p = write(tmp_path / "f", bytes(size))
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match=f"shrank while hashing: expected {2 * size} bytes, "
                                          f"got {size}"):
            treebuild.build_tree(fd, merkle.Params(), data_size=2 * size)
        with pytest.raises(OSError, match=f"grew while hashing: more than {size // 2} bytes"):
            treebuild.build_tree(fd, merkle.Params(), data_size=size // 2)
    finally:
        os.close(fd)


def test_a_small_file_read_in_short_pieces_gives_the_same_digest(tmp_path, monkeypatch):
    """A FUSE or network source may return less than asked before the end: the one-block
    path reads on until it has the whole file, and still sees its end."""
    p = write(tmp_path / "f", pattern(3000))
    want = fsverity_digest(p)[0].split()[0]
    real = os.pread
    calls = []

    def short(fd, n, off):
        calls.append(n)
        return real(fd, min(n, 700), off)

    monkeypatch.setattr(treebuild.os, "pread", short)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert merkle.format_digest(merkle.SHA256, treebuild.build_tree(
            fd, merkle.Params()).digest) == want
        with pytest.raises(OSError, match="grew while hashing: more than 2999 bytes"):
            treebuild.build_tree(fd, merkle.Params(), data_size=2999)
    finally:
        os.close(fd)
    assert len(calls) >= 5  # the pieces were really short


def test_native_hasher_is_built():
    """The install must have built _hashblocks (the fast path); this catches a silent
    build failure of the optional extension."""
    assert merkle.NATIVE or os.environ.get("VERITYFUSE_PURE_PYTHON"), (
        "verityfuse._hashblocks was not built: install gcc and libssl-dev, then reinstall")


def test_pure_python_fallback_gives_the_same_digests(tmp_path):
    import subprocess
    import sys
    code = """
import os, sys
from verityfuse import merkle, treebuild
assert not merkle.NATIVE
data = bytes(((i % 11) + (i % 439) + (i % 1103)) & 0xff for i in range(1000000))
fd = os.memfd_create("v"); os.write(fd, data)
for params in (merkle.Params(), merkle.Params(merkle.SHA512, 4096, b"abcd")):
    print(treebuild.build_tree(fd, params, threads=2).digest.hex())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, VERITYFUSE_PURE_PYTHON="1"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [UTILS_VECTORS[0][4], UTILS_VECTORS[-1][4]]


def test_parameters_and_descriptors_are_immutable_values():
    """Params, TreeId, Descriptor...: equal and hashed by their fields (dict keys, set
    members, comparisons with a manifest's record), never changed after creation."""
    a, b = merkle.Params(merkle.SHA256, 1024, b"ab"), merkle.Params(block_size=1024, salt=b"ab")
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert a != merkle.Params(merkle.SHA256, 1024, b"ac") and a != (merkle.SHA256, 1024, b"ab")
    t = merkle.TreeId(a, 5, b"\1" * 32)
    assert t == merkle.TreeId(b, 5, b"\1" * 32) != merkle.TreeId(a, 6, b"\1" * 32)
    assert repr(t).startswith("TreeId(params=Params(alg=HashAlg(name='sha256'")
    for obj, field in ((a, "salt"), (t, "digest"), (merkle.SHA256, "name"),
                       (merkle.Geometry.compute(a, 5000), "data_size")):
        with pytest.raises(AttributeError, match="immutable"):
            setattr(obj, field, None)
        with pytest.raises(AttributeError, match="immutable"):
            delattr(obj, field)
    assert not hasattr(a, "__dict__")  # slots: nothing else can be attached either


@pytest.mark.parametrize("alg,bs,salt", [("sha256", 4096, ""), ("sha512", 1024, "0a0b0c"),
                                         ("sha256", 1024, "00" * 32), ("sha512", 65536, "")])
def test_small_tree_is_fsverity_utils_tree(tmp_path, alg, bs, salt):
    """small_trees.small_tree, the tree a manifest mount makes of a small file's bytes at
    open, is fsverity-utils' (descriptor and tree block) for every size it serves around
    block boundaries, and is refused (None) for bytes that are not the sealed ones."""
    from verityfuse.small_trees import SMALL_TREE_BYTES, small_tree, small_tree_fits

    params = merkle.Params(merkle.ALGORITHMS[alg], bs, bytes.fromhex(salt))
    opts = [f"--hash-alg={alg}", f"--block-size={bs}"] + ([f"--salt={salt}"] if salt else [])
    largest = max(bs, min(SMALL_TREE_BYTES, params.hashes_per_block * bs))
    assert not small_tree_fits(params, largest + 1) and small_tree_fits(params, largest)
    sizes = {0, 1, largest - 1, largest} | {k * bs + d for k in range(1, largest // bs + 1)
                                            for d in (-1, 0, 1) if 0 < k * bs + d <= largest}
    for size in sorted(sizes):
        data = os.urandom(size)
        write(tmp_path / "f", data)
        line, tree_bytes, desc = fsverity_digest(tmp_path / "f", *opts)
        digest = bytes.fromhex(line.split()[0].split(":")[1])
        tree = small_tree("f", params, data, digest)
        assert tree is not None, size
        assert tree.descriptor.raw == desc, size
        assert tree.read_tree(0, 1 << 20) == tree_bytes, size
        if size:
            other = data[:-1] + bytes([data[-1] ^ 1])
            assert small_tree("f", params, other, digest) is None, size
    with pytest.raises(ValueError):
        small_tree("f", params, bytes(largest + 1), digest)
