"""FUSE_FSVERITY: the C header, the test vectors, and its mapping onto a real mount."""

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from verityfuse import fsverity_op as op
from verityfuse.errors import Errno
from conftest import FSVERITY, pattern, write

PROTO = pathlib.Path(__file__).resolve().parent.parent / "protocol"
VECTORS = json.loads((PROTO / "vectors" / "fuse_fsverity.json").read_text())
sys.path.insert(0, str(PROTO))
import make_vectors  # noqa: E402


def test_header_compiles_and_matches_python_layout(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    r = subprocess.run(["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-x", "c",
                        PROTO / "fuse_fsverity.h"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    prog = tmp_path / "layout.c"
    prog.write_text(f"""
#include <stddef.h>
#include "{PROTO}/fuse_fsverity.h"
#define CHECK(x) _Static_assert(x, #x)
CHECK(offsetof(struct fuse_fsverity_in, version) == 0);
CHECK(offsetof(struct fuse_fsverity_in, op) == 4);
CHECK(offsetof(struct fuse_fsverity_in, offset) == 8);
CHECK(offsetof(struct fuse_fsverity_in, size) == 16);
CHECK(offsetof(struct fuse_fsverity_in, flags) == 20);
CHECK(offsetof(struct fuse_fsverity_out, size) == 0);
CHECK(offsetof(struct fuse_fsverity_out, flags) == 4);
CHECK(offsetof(struct fuse_fsverity_out, total) == 8);
CHECK(FUSE_FSVERITY_OP_GET_DESCRIPTOR == {op.OP_GET_DESCRIPTOR});
CHECK(FUSE_FSVERITY_OP_READ_MERKLE_TREE == {op.OP_READ_MERKLE_TREE});
CHECK(FUSE_FSVERITY_OP_READ_SIGNATURE == {op.OP_READ_SIGNATURE});
CHECK(FUSE_FSVERITY_OP_MEASURE == {op.OP_MEASURE});
CHECK(FUSE_FSVERITY_OP_ENABLE == {op.OP_ENABLE});
CHECK(FUSE_FSVERITY_VERSION == {op.VERSION});
CHECK(FUSE_FSVERITY_MAX_READ == {op.MAX_READ});
CHECK(FUSE_FSVERITY_OUT_EOF == {op.OUT_EOF});
""")
    r = subprocess.run(["gcc", "-std=c11", "-fsyntax-only", prog], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert op.IN.size == 24 and op.OUT.size == 16


@pytest.mark.parametrize("v", VECTORS["vectors"], ids=lambda v: v["name"])
def test_vectors(v):
    target = make_vectors.target(v["file"])
    req = bytes.fromhex(v["request"])
    if "errno" in v:
        with pytest.raises(Errno) as e:
            op.handle(req, target)
        assert e.value.errno == getattr(errno, v["errno"])
    else:
        assert op.handle(req, target).hex() == v["reply"]


def test_vectors_file_is_current():
    r = subprocess.run([sys.executable, PROTO / "make_vectors.py"], capture_output=True, text=True,
                       check=True)
    assert json.loads(r.stdout) == VECTORS


def test_vector_payloads_match_fsverity_utils(tmp_path):
    by_name = {v["name"]: v for v in VECTORS["vectors"]}
    f = write(tmp_path / "f", pattern(100000))
    subprocess.run([FSVERITY, "digest", f, f"--out-merkle-tree={tmp_path}/t",
                    f"--out-descriptor={tmp_path}/d"], check=True, capture_output=True)
    desc, flags, total = op.decode_reply(bytes.fromhex(by_name["get descriptor"]["reply"]))
    assert desc == (tmp_path / "d").read_bytes() and flags == op.OUT_EOF and total == 256
    tree, flags, total = op.decode_reply(bytes.fromhex(by_name["read whole tree"]["reply"]))
    assert tree == (tmp_path / "t").read_bytes() and total == len(tree) and flags == op.OUT_EOF
    m, _, _ = op.decode_reply(bytes.fromhex(by_name["measure, 64-byte buffer"]["reply"]))
    assert m[4:].hex() == "f2096a36c5cdca4fa33ee8852833150bb324992e5417a9d571f1bffff73b9efc"


# -- the same data through a real mount ----------------------------------------

def dump(mp, kind, path, *opts):
    return subprocess.run([sys.executable, "-m", "verityfuse.cli", "dump-metadata", kind, path, *opts],
                          capture_output=True)


def test_dump_metadata_generic_624_625(tmp_path, verified_mount):
    """generic/624: B*2*(B/32) zero bytes, --salt=abcd; 625: the signature back, whole and in chunks."""
    src = tmp_path / "src"
    src.mkdir()
    B = 4096
    with open(src / "f", "wb") as fh:
        fh.truncate(B * 2 * (B // 32))
    m = verified_mount(src, seal=False)
    sig = os.urandom(300)
    (tmp_path / "sig").write_bytes(sig)
    subprocess.run([FSVERITY, "enable", "--salt=abcd", f"--signature={tmp_path}/sig", m.mountpoint / "f"],
                   check=True)
    subprocess.run([FSVERITY, "digest", "--salt=abcd", src / "f", f"--out-merkle-tree={tmp_path}/t",
                    f"--out-descriptor={tmp_path}/d"], check=True, capture_output=True)
    tree, desc = (tmp_path / "t").read_bytes(), (tmp_path / "d").read_bytes()
    assert len(tree) == 3 * B  # 2 level-0 blocks + 1 level-1 block
    f = m.mountpoint / "f"
    assert dump(m, "merkle_tree", f).stdout == tree
    assert dump(m, "descriptor", f).stdout == desc
    assert dump(m, "signature", f).stdout == sig
    for kind, whole, chunk in (("merkle_tree", tree, 997), ("descriptor", desc, 13), ("signature", sig, 13)):
        got = b"".join(dump(m, kind, f, f"--offset={o}", f"--length={chunk}").stdout
                       for o in range(0, len(whole) + chunk, chunk))
        assert got == whole, kind
    # the xattr transport itself
    assert os.getxattr(f, "user.fsverity.descriptor") == desc
    assert os.getxattr(f, "user.fsverity.merkle_tree.4096") == tree[4096:]
    assert os.getxattr(f, f"user.fsverity.merkle_tree.{len(tree)}") == b""
    assert "user.fsverity.descriptor" not in os.listxattr(f)
    write(src / "plain", b"p")
    r = dump(m, "descriptor", m.mountpoint / "plain")
    assert r.returncode == 1 and b"is not a verity file" in r.stderr


def test_daemon_handler_through_inode(tmp_path, verified_mount):
    """The daemon's own FUSE_FSVERITY handler answers like the vectors' reference target."""
    src = tmp_path / "src"
    src.mkdir()
    write(src / "f", pattern(100000))
    m = verified_mount(src)
    by_name = {v["name"]: v for v in VECTORS["vectors"]}
    want = op.decode_reply(bytes.fromhex(by_name["get descriptor"]["reply"]))[0]
    assert os.getxattr(m.mountpoint / "f", "user.fsverity.descriptor") == want


def test_daemon_handler_enable_without_a_mount(tmp_path):
    """ENABLE through the daemon's bytes handler takes the same path as the ioctl."""
    from verityfuse import ioctl, merkle
    from verityfuse.ops import VerityOperations
    from verityfuse.sealing import entry_of_path
    from verityfuse.store import Store
    from verityfuse.verifier import TreeBlockCache
    from verityfuse.view_local import LocalView

    src = tmp_path / "src"
    src.mkdir()
    write(src / "f", pattern(100000))
    os.mkdir(src / "d")
    os.mkfifo(src / "p")
    with Store(str(src / ".verityfuse"), create=True) as st:
        ops = VerityOperations(LocalView(str(src), st, TreeBlockCache()))
        try:
            ino = ops.view.lookup(1, b"f").ino
            dino = ops.view.lookup(1, b"d").ino
            enable = op.encode_request(op.OP_ENABLE, 0, 130,
                                       ioctl.pack_enable(merkle.Params(salt=b"ab")))
            assert op.handle(enable, op.MemoryTarget(b"")) == ops.fsverity(ino, enable)
            with pytest.raises(Errno) as e:
                ops.fsverity(ino, enable)
            assert e.value.errno == errno.EEXIST
            with pytest.raises(Errno) as e:
                ops.fsverity(dino, enable)
            assert e.value.errno == errno.EISDIR
            with pytest.raises(Errno) as e:  # a FIFO is never opened (that would block)
                ops.fsverity(ops.view.lookup(1, b"p").ino, enable)
            assert e.value.errno == errno.EINVAL
            # A transport that brings the requester's credentials gets the ioctl's rule.
            write(src / "g", pattern(5000))
            os.chmod(src / "g", 0o644)
            gino = ops.view.lookup(1, b"g").ino
            with pytest.raises(Errno) as e:
                ops.fsverity(gino, enable, caller=(65534, 65534, set()))
            assert e.value.errno == errno.EACCES
            ops.fsverity(gino, enable, caller=(0, 0, set()))
            desc = op.decode_reply(ops.fsverity(ino, op.encode_request(op.OP_GET_DESCRIPTOR, 0, 256)))[0]
            subprocess.run([FSVERITY, "digest", "--salt=6162", src / "f", f"--out-descriptor={tmp_path}/d"],
                           check=True, capture_output=True)
            assert desc == (tmp_path / "d").read_bytes()
            assert entry_of_path(st, src / "f").digest == merkle.file_digest(merkle.SHA256, desc)
        finally:
            ops.shutdown()
