"""The store under bad input, called directly (no mount): every way a tree object can be
wrong is refused with StoreCorrupt, naming the object file and what was expected and found.

tests/test_store.py covers a few of these through sealing and verify with partial matches
(and the index entries); this table pins the exact message of each check in
store_object.open_stored_tree and Store._read_file, in the order they run.
"""

import errno
import os
import shutil
import struct
import threading

import pytest

from verityfuse import merkle
from verityfuse.errors import MissingObject, StoreCorrupt
from verityfuse.sealing import seal_path
from verityfuse.store import Store
from verityfuse.store_object import HEADER_SIZE, TREE_OFFSET
from conftest import pattern, write

PARAMS = merkle.Params(merkle.SHA256, 1024)
D = HEADER_SIZE  # where the descriptor starts in an object


@pytest.fixture
def sealed(tmp_path):
    """A store with "f" sealed (its object is the one damaged) and "g", another file."""
    src = tmp_path / "src"
    src.mkdir()
    write(src / "f", pattern(300000))
    write(src / "g", pattern(5000))
    st = Store(str(tmp_path / "store"), create=True)
    try:
        e = seal_path(st, str(src), "f", PARAMS)
        yield st, e, st.object_path(e.alg, e.digest), src, tmp_path
    finally:
        st.close()


def _poke(p, offset, data):
    with open(p, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _other(st, src, params, into):
    """Put the object of "g" (sealed with ``params``) where "f"'s belongs: its digest text."""
    g = seal_path(st, str(src), "g", params)
    os.unlink(into)
    shutil.copyfile(st.object_path(g.alg, g.digest), into)
    return g.digest_text


# Each case damages object ``p`` and returns the expected message after "<p>" (``ctx``:
# the store, the entry, the object path, the source, tmp_path).
def empty(st, e, p, src, tmp):
    os.truncate(p, 0)
    return f": truncated header (0 of {TREE_OFFSET} bytes)"


def truncated_header(st, e, p, src, tmp):
    os.truncate(p, TREE_OFFSET - 1)
    return f": truncated header ({TREE_OFFSET - 1} of {TREE_OFFSET} bytes)"


def wrong_magic(st, e, p, src, tmp):
    _poke(p, 0, b"VFSTREE2")
    return ": bad object header: magic b'VFSTREE2', expected b'VFSTREE1'"


def wrong_header_size(st, e, p, src, tmp):
    _poke(p, 8, struct.pack("<I", 32))
    return f": bad object header: header size 32, expected {HEADER_SIZE}"


def nonzero_flags(st, e, p, src, tmp):
    _poke(p, 12, struct.pack("<I", 1))
    return ": bad object header: flags 1, expected 0"


def nonzero_reserved(st, e, p, src, tmp):
    _poke(p, 63, b"\x01")
    return ": bad object header: reserved bytes are not zero"


def descriptor_version(st, e, p, src, tmp):
    _poke(p, D + 0, b"\x02")
    return ": unsupported descriptor version 2, expected 1"


def unknown_algorithm(st, e, p, src, tmp):
    _poke(p, D + 1, b"\x07")
    return ": invalid descriptor parameters: unknown hash algorithm: 7 (available: sha256 sha512)"


def block_size_too_small(st, e, p, src, tmp):
    _poke(p, D + 2, b"\x05")  # 32 bytes: not even two sha256 hashes
    return ": invalid descriptor parameters: block size (32) too small for hash algorithm sha256"


def log_blocksize_out_of_range(st, e, p, src, tmp):
    _poke(p, D + 2, b"\x28")
    return ": invalid log_blocksize 40, at most 31"


def block_size_too_large(st, e, p, src, tmp):
    _poke(p, D + 2, b"\x11")  # valid for the kernel, refused here before any tree block is read
    return ": block size 131072 is larger than 65536"


def salt_too_long(st, e, p, src, tmp):
    _poke(p, D + 3, b"\x21")
    return ": invalid salt size 33, at most 32"


def salt_padding(st, e, p, src, tmp):
    _poke(p, D + 80, b"\x01")  # a salt byte past salt_size 0
    return ": invalid salt: bytes past its size 0 are not zero"


def signature_size(st, e, p, src, tmp):
    _poke(p, D + 4, struct.pack("<I", 1))
    return ": reserved descriptor bytes are not zero"


def root_hash_altered(st, e, p, src, tmp):
    _poke(p, D + 16, b"\x00\x00\x00")
    with open(p, "rb") as f:
        raw = f.read(TREE_OFFSET)[HEADER_SIZE:]
    actual = merkle.format_digest(merkle.SHA256, merkle.file_digest(merkle.SHA256, raw))
    return f": descriptor does not match its digest: expected {e.digest_text}, actual {actual}"


def swapped_object(st, e, p, src, tmp):
    other = _other(st, src, PARAMS, p)
    return f": descriptor does not match its digest: expected {e.digest_text}, actual {other}"


def other_algorithm(st, e, p, src, tmp):
    other = _other(st, src, merkle.Params(merkle.SHA512, 1024), p)
    assert other.startswith("sha512:")
    return f": descriptor does not match its digest: expected {e.digest_text}, actual {other}"


def _tree_size(p):
    return os.path.getsize(p) - TREE_OFFSET


def tree_truncated(st, e, p, src, tmp):
    n = _tree_size(p)
    os.truncate(p, TREE_OFFSET + n - 1)
    return f": tree is {n - 1} bytes (header says {n}), expected {n}"


def tree_extended(st, e, p, src, tmp):
    n = _tree_size(p)
    os.truncate(p, TREE_OFFSET + n + 1)
    return f": tree is {n + 1} bytes (header says {n}), expected {n}"


def header_tree_size(st, e, p, src, tmp):
    n = _tree_size(p)
    _poke(p, 16, struct.pack("<Q", n + 1024))
    return f": tree is {n} bytes (header says {n + 1024}), expected {n}"


def missing(st, e, p, src, tmp):
    os.unlink(p)
    return f": missing tree object for {e.digest_text}"


def symlink(st, e, p, src, tmp):
    os.rename(p, tmp / "real-object")
    os.symlink(tmp / "real-object", p)  # the right bytes, but not through a symlink
    return " is a symlink, not a regular file"


def fifo(st, e, p, src, tmp):
    os.unlink(p)
    os.mkfifo(p)
    return " is a FIFO, not a regular file"


def directory(st, e, p, src, tmp):
    os.unlink(p)
    os.mkdir(p)
    return " is a directory, not a regular file"


CASES = [empty, truncated_header, wrong_magic, wrong_header_size, nonzero_flags, nonzero_reserved,
         descriptor_version, unknown_algorithm, block_size_too_small, log_blocksize_out_of_range,
         block_size_too_large, salt_too_long, salt_padding, signature_size, root_hash_altered,
         swapped_object, other_algorithm, tree_truncated, tree_extended, header_tree_size,
         missing, symlink, fifo, directory]


def _open_without_blocking(st, e, p):
    """st.open_object(...) in a thread: a FIFO that blocked it is released (and the test fails)."""
    out = {}

    def run():
        try:
            out["tree"] = st.open_tree(e)
        except BaseException as err:  # handed to the test thread
            out["error"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        os.close(os.open(p, os.O_RDWR | os.O_NONBLOCK))
        t.join(10)
        pytest.fail(f"opening {p} blocked")
    if "tree" in out:
        out["tree"].close()
        pytest.fail(f"{p} was accepted")
    return out["error"]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_a_bad_object_is_refused_naming_it(sealed, case):
    st, e, p, src, tmp = sealed
    with st.open_tree(e):  # intact, it opens
        pass
    st._trees.drop_idle()  # released, it was kept open: the next open reads the file again
    want = case(st, e, p, src, tmp)
    err = _open_without_blocking(st, e, p)
    assert type(err) is (MissingObject if case.__name__ == "missing" else StoreCorrupt)
    assert str(err) == p + want


def test_the_object_is_not_kept_open_after_a_refusal(sealed):
    """A refused object leaves no fd behind, and a repaired one then opens."""
    st, e, p, src, tmp = sealed
    shutil.copyfile(p, tmp / "good")
    before = set(os.listdir("/proc/self/fd"))
    _poke(p, 0, b"VFSTREE2")
    with pytest.raises(StoreCorrupt):
        st.open_tree(e)
    assert set(os.listdir("/proc/self/fd")) == before
    os.replace(tmp / "good", p)
    with st.open_tree(e) as t:
        assert t.tree_id == merkle.TreeId(PARAMS, 300000, e.digest)


def test_a_failed_read_is_an_io_error_naming_the_file_not_a_damaged_store(sealed, monkeypatch):
    """An index entry or object whose read fails (EIO from the disk, an interrupted read
    on a network share) is reported as that error, naming the file: not as corruption,
    which a local mount keeps on the inode until it is forgotten.  The next read, once
    it works, finds the file.  (fsutil.read_beneath's ReadFailed itself is tested on a
    real failing read in test_fsutil_open.)"""
    from verityfuse import fsutil
    st, e, p, src, tmp = sealed
    real = fsutil.read_beneath

    def failing(*args, **kw):
        raise fsutil.ReadFailed(errno.EIO, "Input/output error")

    st._trees.drop_idle()
    entry = st.get_entry(e.key)
    entry_path = st._where("inodes", e.key[:2], e.key)
    for call, where in ((lambda: st.get_entry(e.key), entry_path),
                        (lambda: st.open_tree(e), p)):
        monkeypatch.setattr(fsutil, "read_beneath", failing)
        with pytest.raises(OSError) as err:
            call()
        assert not isinstance(err.value, StoreCorrupt)
        assert (err.value.errno, err.value.filename) == (errno.EIO, where)
        monkeypatch.setattr(fsutil, "read_beneath", real)
    assert st.get_entry(e.key) == entry
    with st.open_tree(e) as t:
        assert t.tree_id == merkle.TreeId(PARAMS, 300000, e.digest)
