"""What a mount exports about a verity file (its Merkle tree through the
user.fsverity.merkle_tree.<offset> xattrs, FUSE_FSVERITY and `verityfuse
dump-metadata`) is verified up to the trusted digest first, as reads are.

The host (manifest mode) or anyone who can write the store (local mode)
rewrites the tree region of a file's store object, keeping header and
descriptor: the mount then answers EIO for the tree bytes that do not hash
up to the digest, and logs one integrity failure naming the file and the
tree block.  Good files export exactly what `fsverity digest
--out-merkle-tree` computes.  First in process (Verifier.read_tree), then through
real mounts with the real getfattr and `verityfuse dump-metadata`.
"""

import errno
import os
import re
import subprocess
import sys

import pytest

import verityfuse
from verityfuse import manifest as mf
from verityfuse import merkle
from verityfuse.errors import IntegrityError
from verityfuse.store import Store
from verityfuse.store_object import HEADER_SIZE, TREE_OFFSET
from verityfuse.verifier import TreeBlockCache, Verifier
from conftest import flip, fsverity_digest, write
from test_mount import object_file

B = 4096
# 9 MiB: 2304 data blocks, 18 leaf blocks and a root: a 76 KiB tree, more than one
# 64 KiB xattr, so dump-metadata needs two chunks.
GOOD_SIZE = 9 << 20
BAD_SIZE = 3 << 20  # 768 data blocks: 6 leaf blocks + root (tree block 0 is the root)
BAD_BLOCK = 3       # tree block 3: level 0, index 2


def getfattr(path, name):
    """The real getfattr's raw value bytes, or its exit code and stderr."""
    r = subprocess.run(["getfattr", "--only-values", "-n", name, str(path)],
                       capture_output=True)
    return r.returncode, r.stdout, r.stderr.decode(errors="replace")


def dump_tree(path):
    r = subprocess.run([sys.executable, "-m", "verityfuse.cli", "dump-metadata", "merkle_tree",
                        str(path)], capture_output=True)
    return r.returncode, r.stdout, r.stderr.decode(errors="replace")


def make_files(src):
    write(src / "good.bin", os.urandom(GOOD_SIZE))
    write(src / "bad.bin", os.urandom(BAD_SIZE))
    write(src / "desc.bin", os.urandom(BAD_SIZE))
    _, tree, desc = fsverity_digest(src / "good.bin")
    _, bad_tree, _ = fsverity_digest(src / "bad.bin")
    os.unlink(src / ".oracle.tree")
    os.unlink(src / ".oracle.desc")
    assert len(tree) == 19 * B and len(bad_tree) == 7 * B and len(desc) == 256
    return tree, bad_tree, desc


def tamper(src):
    """Rewrite tree block BAD_BLOCK of bad.bin's store object (header and descriptor
    kept), and flip a root hash byte in desc.bin's descriptor.  Each new value is made
    from the old one, so it differs whatever the random data hashed to (a fixed 0xff
    written over the root hash's first byte changed nothing 1 time in 256)."""
    for rel, at, size in [("bad.bin", TREE_OFFSET + BAD_BLOCK * B, B),
                          ("desc.bin", HEADER_SIZE + 16, 1)]:
        obj = object_file(src, rel)
        os.chmod(obj, 0o644)
        flip(obj, at, length=size)


def check(mnt, log, tree, bad_tree, desc):
    # A good file: the descriptor and tree are fsverity-utils', by xattr chunk and whole.
    rc, out, err = getfattr(mnt / "good.bin", "user.fsverity.descriptor")
    assert (rc, out) == (0, desc), err
    rc, out, err = getfattr(mnt / "good.bin", "user.fsverity.merkle_tree.0")
    assert rc == 0, err
    assert out == tree[:65536]
    rc, out, err = getfattr(mnt / "good.bin", "user.fsverity.merkle_tree.65536")
    assert (rc, out) == (0, tree[65536:]), err
    rc, out, err = dump_tree(mnt / "good.bin")
    assert (rc, len(out)) == (0, len(tree)), err
    assert out == tree

    # A rewritten tree block: EIO for every request whose bytes include it.
    rc, out, err = getfattr(mnt / "bad.bin", "user.fsverity.merkle_tree.0")
    assert (rc, out) == (1, b""), out[:64]
    assert "Input/output error" in err
    with pytest.raises(OSError) as e:
        os.getxattr(mnt / "bad.bin", f"user.fsverity.merkle_tree.{BAD_BLOCK * B}")
    assert e.value.errno == errno.EIO
    rc, out, err = dump_tree(mnt / "bad.bin")
    assert (rc, out) == (1, b"")
    assert "Input/output error" in err
    lines = [ln for ln in log().splitlines() if "integrity failure: bad.bin" in ln]
    assert len(lines) == 1, lines  # one line, however many requests ran into the block
    assert "bad.bin: Merkle tree block (level 0, index 2) at tree offset 12288: expected hash " \
        in lines[0]
    # Tree bytes that do verify are still exported: the leaf blocks after the bad one.
    rc, out, err = getfattr(mnt / "bad.bin", f"user.fsverity.merkle_tree.{(BAD_BLOCK + 1) * B}")
    assert (rc, out) == (0, bad_tree[(BAD_BLOCK + 1) * B:]), err

    # A rewritten descriptor: it no longer hashes to the digest, nothing is exported.
    for name in ("descriptor", "merkle_tree.0"):
        rc, out, err = getfattr(mnt / "desc.bin", f"user.fsverity.{name}")
        assert (rc, out) == (1, b""), name
        assert "Input/output error" in err
    (line,) = [ln for ln in log().splitlines() if "descriptor does not match" in ln]
    assert re.search(r"WARNING: integrity failure: desc\.bin: /\S+/objects/sha256/../([0-9a-f]{64}): "
                     r"descriptor does not match its digest: expected sha256:\1, actual "
                     r"sha256:[0-9a-f]{64}$", line), line


@pytest.mark.parametrize("opts", [(), ("--block-size=1024", "--salt=ab")])
def test_verifier_read_tree_is_the_tree_and_checks_exactly_the_blocks_read(tmp_path, opts):
    """In process: Verifier.read_tree returns fsverity-utils' tree bytes for any range,
    and a rewritten block fails exactly the ranges that include it, naming it."""
    src = tmp_path / "src"
    src.mkdir()
    write(src / "f", os.urandom(GOOD_SIZE))
    kw = dict(a.lstrip("-").split("=") for a in opts)
    sealed = verityfuse.seal(src, block_size=int(kw.get("block-size", B)),
                             salt=bytes.fromhex(kw.get("salt", "")))
    _, tree, _ = fsverity_digest(src / "f", *opts)
    d = sealed["f"]
    bs = int(kw.get("block-size", B))
    with Store(str(src / ".verityfuse")) as st:
        obj = st.object_path(merkle.hash_alg(d.algorithm), d.digest)
        with st.open_object(merkle.hash_alg(d.algorithm), d.digest) as t:
            v = Verifier(t, TreeBlockCache(), "f")
            for off, n in [(0, len(tree)), (0, 1), (bs - 1, 2), (len(tree) - 5, 100),
                           (len(tree), 10), (3 * bs + 7, 65536), (len(tree) + 1, 1)]:
                assert v.read_tree(off, n) == tree[off:off + n], (off, n)
        geo = t.geometry
        leaf = geo.level_start[0] + 2  # level 0, index 2
        slot = geo.level_start[1] * bs + 2 * 32  # its hash: level 1, index 0, slot 2
        parent_slot = tree[slot:slot + 32]
        with open(obj, "r+b") as f:
            f.seek(TREE_OFFSET + leaf * bs)
            f.write(bytes(bs))
        with st.open_object(merkle.hash_alg(d.algorithm), d.digest) as t:
            v = Verifier(t, TreeBlockCache(), "f")
            assert v.read_tree(0, leaf * bs) == tree[:leaf * bs]  # the blocks before it
            assert v.read_tree((leaf + 1) * bs, len(tree)) == tree[(leaf + 1) * bs:]
            with pytest.raises(IntegrityError) as e:
                v.read_tree(leaf * bs + bs - 1, 2)
            assert str(e.value).startswith(
                f"f: Merkle tree block (level 0, index 2) at tree offset {leaf * bs}: "
                f"expected hash {parent_slot.hex()}, actual ")


@pytest.mark.mount
def test_manifest_mode_exports_only_verified_tree_bytes(tmp_path, verified_mount):
    src = tmp_path / "share"
    src.mkdir()
    tree, bad_tree, desc = make_files(src)
    mf.generate_key(str(tmp_path / "key.pem"), str(tmp_path / "pub.pem"))
    r = subprocess.run([sys.executable, "-m", "verityfuse.cli", "seal", str(src), "--manifest",
                        str(tmp_path / "m.json"), "--sign-key", str(tmp_path / "key.pem")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    tamper(src)
    m = verified_mount(src, seal=False, policy="require",
                       extra_args=["--manifest", str(tmp_path / "m.json"),
                                   "--trust-key", str(tmp_path / "pub.pem")])
    check(m.mountpoint, m.log, tree, bad_tree, desc)


@pytest.mark.mount
def test_local_mode_exports_only_tree_bytes_that_hash_to_the_enabled_digest(tmp_path,
                                                                             verified_mount):
    src = tmp_path / "src"
    src.mkdir()
    tree, bad_tree, desc = make_files(src)
    m = verified_mount(src)  # seals both
    tamper(src)
    check(m.mountpoint, m.log, tree, bad_tree, desc)
