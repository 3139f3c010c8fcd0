"""The native read path (``_fastread.c`` through ``fast_reads.FastReads``) without FUSE:
what the FUSE hook would reply for a read, called through ``fast_read(fh, size, off)``.

It must answer exactly the bytes the Python reader returns, and only when every hash
it compares with came from a leaf block Python verified to the root; everything else
(a changed block, a truncated or extended file, a missing leaf, an unknown handle, a
read at or past the end) it declines, so that Python serves it and reports it."""

import os
import random

import pytest

from verityfuse import merkle
from verityfuse.errors import IntegrityError, SizeMismatch
from verityfuse.fast_reads import FastReads, LeafTable
from verityfuse.reader import CACHESTAT, attach_reader
from verityfuse.sealing import seal_path
from verityfuse.store import Store
from verityfuse.verifier import TreeBlockCache
from verityfuse.view import FileHandle
from conftest import write

native = merkle._hashblocks
pytestmark = pytest.mark.skipif(native is None or not hasattr(native, "fast_read"),
                                reason="native module not built")
MiB = 1 << 20


@pytest.fixture
def fast():
    """A FastReads whose handles and leaves are gone after the test (the tables are the
    process's)."""
    f = FastReads(native, shim=None)
    yield f
    for fh in list(f.registered):
        f.forget(fh)
    native.fast_configure(leaf_bytes=0)  # empties the leaf table
    native.fast_configure(leaf_bytes=16 << 20)


class Sealed:
    """A sealed file, open, with a reader whose cache keeps its leaves in the native table."""

    def __init__(self, tmp_path, data, params=merkle.Params(merkle.SHA256, 4096), name="f"):
        self.path = write(tmp_path / name, data)
        self.data = data
        store = Store(str(tmp_path / "store"), create=True)
        e = seal_path(store, str(tmp_path), name, params)
        self.tree = store.open_tree(e)
        store.close()
        self.cache = TreeBlockCache()
        self.cache.use_leaf_table(LeafTable(native), 16 << 20)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.h = FileHandle(self.fd, None)
        self.h.reader = attach_reader(self.fd, self.tree, self.cache, name)

    @property
    def reader(self):
        return self.h.reader

    def warm(self):
        """Python reads the whole file once: every leaf verified and handed over."""
        assert bytes(self.reader.read(0, len(self.data))) == self.data

    def close(self):
        os.close(self.fd)
        self.tree.close()


@pytest.fixture
def sealed(tmp_path):
    made = []

    def make(data, **kw):
        d = tmp_path / f"s{len(made)}"
        d.mkdir()
        made.append(Sealed(d, data, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _requests(size, rng, n=300):
    """Reads a kernel sends, and others: aligned pages, 1 MiB, odd offsets and sizes."""
    out = [(0, 4096), (0, MiB), (0, size), (size - 1, 1), (max(0, size - 4096), 4096)]
    for _ in range(n):
        off = rng.randrange(size)
        out.append((off, rng.choice([1, 100, 4096, 4096 * 3 + 7, 65536, MiB])))
    return out


PARAMS = [
    merkle.Params(merkle.SHA256, 4096),
    merkle.Params(merkle.SHA256, 1024, salt=b"salty"),
    merkle.Params(merkle.SHA512, 4096, salt=b"x" * 32),
    merkle.Params(merkle.SHA256, 65536),
]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"{p.alg.name}-{p.block_size}"
                         f"{'-salt' if p.salt else ''}")
@pytest.mark.parametrize("size", [1, 4096, 3 * MiB + 123])
def test_answers_exactly_what_python_reads(fast, sealed, params, size):
    s = sealed(os.urandom(size), params=params)
    fast.register(7, s.h)
    assert 7 in fast.registered
    s.warm()
    rng = random.Random(size)
    before = native.fast_info()["reads"]
    answered = 0
    for off, n in _requests(size, rng):
        got = native.fast_read(7, n, off)
        want = s.data[off:off + n]
        span = s.reader.span(off, n)
        if span[2] - span[0] <= MiB:  # within the hook's limit: it must answer
            assert got == want, (off, n)
            answered += 1
        else:
            assert got in (None, want), (off, n)
    assert native.fast_info()["reads"] - before >= answered > 0


def test_a_small_file_is_answered_from_its_first_read(fast, sealed):
    """A one-block file's hash is its root hash; a one-leaf file's leaf is verified at
    registration: neither needs a Python read first."""
    one = sealed(os.urandom(3000))
    fast.register(1, one.h)
    assert native.fast_read(1, 4096, 0) == one.data
    leafy = sealed(os.urandom(100_000))
    fast.register(2, leafy.h)
    assert native.fast_read(2, 131072, 0) == leafy.data


def test_declines_without_a_verified_leaf(fast, sealed):
    s = sealed(os.urandom(9 * MiB))  # 18 leaf blocks of 512 KiB: none verified at registration
    fast.register(3, s.h)
    before = native.fast_info()["declined_no_leaf"]
    assert native.fast_read(3, 4096, MiB) is None
    assert native.fast_info()["declined_no_leaf"] == before + 1
    s.reader.read(MiB, 4096)  # Python verifies the leaf that covers it, and its group's
    assert native.fast_read(3, 4096, MiB) == s.data[MiB:MiB + 4096]
    far = 2 * MiB + 600_000  # leaf 6: verified with leaf 2 (verifier.LEAF_GROUP, 16)
    assert native.fast_read(3, 4096, far) == s.data[far:far + 4096]
    assert native.fast_read(3, 4096, 8 * MiB + 4096) is None  # leaf 16: the next group, not yet


def test_declines_at_and_past_the_end_and_for_unknown_handles(fast, sealed):
    s = sealed(os.urandom(10_000))
    fast.register(4, s.h)
    assert native.fast_read(4, 4096, 10_000) is None  # Python's end-of-file check answers
    assert native.fast_read(4, 4096, 50_000) is None
    assert native.fast_read(4, 0, 0) is None
    assert native.fast_read(5, 4096, 0) is None  # never registered
    fast.forget(4)
    assert native.fast_read(4, 4096, 0) is None


def test_a_changed_block_is_declined_and_python_reports_it(fast, sealed):
    s = sealed(os.urandom(2 * MiB))
    fast.register(6, s.h)
    s.warm()
    assert native.fast_read(6, 4096, MiB) == s.data[MiB:MiB + 4096]
    with open(s.path, "r+b") as f:
        f.seek(MiB + 10)
        f.write(bytes([s.data[MiB + 10] ^ 1]))
    before = native.fast_info()["declined_failed"]
    assert native.fast_read(6, 4096, MiB) is None
    assert native.fast_read(6, MiB, MiB // 2) is None  # a 1 MiB read that reaches it too
    assert native.fast_info()["declined_failed"] == before + 2
    assert native.fast_read(6, 4096, 0) == s.data[:4096]  # other blocks still answered
    with pytest.raises(IntegrityError) as e:
        s.reader.read(MiB, 4096)
    assert e.value.offset == MiB


def test_a_mismatch_fails_its_read_even_when_the_bytes_are_back(fast, sealed):
    """A host that flips a byte and puts it back at once: the native path declined the
    read that saw the flip, Python read the block again, found it good and served it,
    and the mismatch was neither an EIO nor measured (review, s44).  The declined read
    now fails with what the native path saw: the block's offset and both hashes."""
    s = sealed(os.urandom(2 * MiB))
    fast.register(6, s.h)
    s.warm()
    good = s.data[MiB:MiB + 4096]
    bad = bytearray(good)
    bad[10] ^= 1
    with open(s.path, "r+b", buffering=0) as f:
        f.seek(MiB)
        f.write(bad)
        assert native.fast_read(6, 8192, MiB - 4096) is None  # the block after the first
        f.seek(MiB)
        f.write(good)  # back before Python reads it
    with pytest.raises(IntegrityError) as e:
        fast.seen_mismatch(6, s.h)
    hasher = s.reader.verifier.hasher
    assert (e.value.offset, e.value.expected, e.value.actual) == (MiB, hasher(good), hasher(bytes(bad)))
    assert str(e.value).startswith(f"f: data block at offset {MiB}: expected hash ")
    fast.seen_mismatch(6, s.h)  # taken once: the next read is judged on its own
    assert bytes(s.reader.read(MiB, 4096)) == good
    assert native.fast_read(6, 4096, MiB) == good  # and answered natively again


def test_a_truncated_or_extended_file_is_declined(fast, sealed):
    s = sealed(os.urandom(20_000))
    fast.register(8, s.h)
    assert native.fast_read(8, 4096, 16384) == s.data[16384:]
    with open(s.path, "ab") as f:
        f.write(b"more")
    assert native.fast_read(8, 4096, 16384) is None  # the last block: the end is checked
    assert native.fast_read(8, 4096, 0) == s.data[:4096]  # not the last block: no change
    with pytest.raises(SizeMismatch):
        s.reader.read(16384, 4096)
    os.truncate(s.path, 10_000)
    assert native.fast_read(8, 4096, 8192) is None
    assert native.fast_read(8, 4096, 16384) is None


def test_the_leaf_budget_bounds_the_table(fast, sealed):
    native.fast_configure(leaf_bytes=0)
    assert native.fast_info()["leaf_bytes"] == 0
    s = sealed(os.urandom(3 * MiB))
    fast.register(9, s.h)
    s.warm()
    assert native.fast_info()["leaf_bytes"] == 0
    assert native.fast_read(9, 4096, 0) is None  # nothing kept: Python serves it
    native.fast_configure(leaf_bytes=8192)
    s.warm()
    info = native.fast_info()
    assert info["leaf_bytes"] <= 8192 and info["leaves"] <= 2


def test_handle_table_insert_and_forget_keep_every_other_handle(fast, sealed):
    """Linear probing with removal by back-shifting: a random history of registrations
    and releases, checked against a set after every step."""
    s = sealed(os.urandom(5000))
    rng = random.Random(5)
    live = set()
    for step in range(3000):
        fh = rng.randrange(1, 1500)
        if fh in live and rng.random() < 0.5:
            fast.forget(fh)
            live.discard(fh)
        else:
            fast.register(fh, s.h)
            live.add(fh)
        if step % 100 == 0:
            assert native.fast_info()["handles"] == len(live)
            for probe in rng.sample(range(1, 1500), 50):
                assert (native.fast_read(probe, 4096, 0) is not None) == (probe in live)
    assert set(fast.registered) == live


class _CountingEngine:
    """The native engine, counting the registrations offered to it."""

    def __init__(self):
        self.offered = 0

    def __getattr__(self, name):
        return getattr(native, name)

    def fast_register(self, *args):
        self.offered += 1
        return native.fast_register(*args)


def test_the_handle_table_is_bounded(sealed):
    """At most half the table's slots are used; a handle it turned away is not offered
    again at each of its reads (each comes to Python) until a handle is forgotten."""
    engine = _CountingEngine()
    fast = FastReads(engine, shim=None)
    s = sealed(os.urandom(5000))
    try:
        for fh in range(1, 2100):
            fast.register(fh, s.h)
        assert len(fast.registered) == native.fast_info()["handles"] == 2048
        assert engine.offered == 2099 and fast.refused == set(range(2049, 2100))
        assert native.fast_read(2099, 4096, 0) is None  # served by Python
        for _ in range(5):
            fast.came_to_python(2099, s.h)
        assert engine.offered == 2099  # not offered again: the table is still full
        fast.forget(2050)  # a turned-away handle released: forgotten, no slot freed
        assert 2050 not in fast.refused and native.fast_info()["handles"] == 2048
        fast.forget(1)  # a slot frees: the turned-away handles may try once more
        fast.came_to_python(2099, s.h)
        assert engine.offered == 2100
        assert native.fast_read(2099, 4096, 0) == s.data[:4096]
    finally:
        for fh in list(fast.registered):
            fast.forget(fh)
    assert native.fast_info()["handles"] == 0 and not fast.refused


def test_only_plain_verified_readers_are_registered(fast, sealed, tmp_path):
    fd = os.open(write(tmp_path / "plain", b"abc"), os.O_RDONLY)
    try:
        fast.register(10, FileHandle(fd, None))  # no reader: a file without verity
    finally:
        os.close(fd)
    assert 10 not in fast.registered
    empty = sealed(b"")
    fast.register(11, empty.h)  # nothing to read: Python answers the end of file
    assert 11 not in fast.registered


def test_a_handle_whose_file_system_refuses_nowait_asks_the_page_cache(fast, sealed):
    """A file system that refuses RWF_NOWAIT (FUSE, virtio-fs): the handle is registered
    again to ask cachestat(2) first, which answers cached pages but never the last block;
    where cachestat cannot tell either, the native path forgets the handle."""
    s = sealed(os.urandom(3 * MiB))
    fast.came_to_python(12, s.h)  # the first read of a handle opened before its enable
    assert fast.registered[12] == os.RWF_NOWAIT
    s.warm()
    s.reader.in_memory = s.reader.nowait = False
    fast.came_to_python(12, s.h)
    assert fast.registered[12] == CACHESTAT
    assert native.fast_read(12, 4096, MiB) == s.data[MiB:MiB + 4096]  # warm() read it: cached
    last = 3 * MiB - 4096
    assert native.fast_read(12, 4096, last) is None  # the end: Python's, in a thread
    assert s.reader.inline_flags(MiB, 4096, MiB + 4096) == 0
    assert s.reader.inline_flags(last, 4096, 3 * MiB) is None
    s.reader.cachestat = False
    fast.came_to_python(12, s.h)
    assert 12 not in fast.registered
    assert native.fast_read(12, 4096, 0) is None
    assert s.reader.inline_flags(MiB, 4096, MiB + 4096) is None


def test_a_full_leaf_table_keeps_taking_the_leaves_read_now(fast, sealed):
    """Over the byte budget, old leaves make room (a clock over the table): a daemon that
    served other files first still answers the file read now."""
    native.fast_configure(leaf_bytes=3 * 4096)
    a, b = sealed(os.urandom(3 * MiB)), sealed(os.urandom(3 * MiB))
    fast.register(13, a.h)
    fast.register(14, b.h)
    a.warm()
    assert native.fast_info()["leaves"] == 3
    b.warm()  # six leaves: the last ones verified are kept
    info = native.fast_info()
    assert info["leaves"] == 3 and info["leaf_bytes"] == 3 * 4096
    last = 3 * MiB - 4096
    assert native.fast_read(14, 4096, last) == b.data[last:last + 4096]
    assert native.fast_read(13, 4096, last) is None  # a's leaves made room


def test_the_tree_block_cache_keeps_one_copy_of_each_leaf_within_its_budget(fast, sealed):
    """With the native table, leaves live only there (Python reads them back from it);
    the upper levels stay in the LRU, and both together stay within --cache-size."""
    s = sealed(os.urandom(3 * MiB))  # six leaves under one upper block
    cache = TreeBlockCache(max_bytes=10 * 4096)
    cache.use_leaf_table(LeafTable(native), 8 * 4096)
    native.fast_configure(leaf_bytes=8 * 4096)
    s.h.reader = attach_reader(s.fd, s.tree, cache, "f")
    fast.register(15, s.h)
    s.warm()
    assert all(key[2] != 0 for key in cache._d)  # no leaf in the LRU
    snap = cache.snapshot()
    assert snap["blocks"] == 6 + 1 and snap["bytes"] == 7 * 4096 <= snap["max_bytes"]
    misses = snap["misses"]
    assert bytes(s.reader.read(MiB, 4096)) == s.data[MiB:MiB + 4096]  # Python: a leaf hit
    assert cache.snapshot()["misses"] == misses
    assert native.fast_read(15, 4096, 2 * MiB) == s.data[2 * MiB:2 * MiB + 4096]


def test_block_sizes_the_native_path_does_not_serve_stay_with_python(fast, sealed):
    """Below 1 KiB (which the kernel refuses, and `seal --block-size` allows): not
    registered, and the cache keeps such leaves itself; the reads are Python's and right."""
    s = sealed(os.urandom(100_000), params=merkle.Params(merkle.SHA256, 512))
    fast.register(16, s.h)
    assert 16 not in fast.registered
    s.warm()
    assert any(key[2] == 0 for key in s.cache._d)
    assert bytes(s.reader.read(50_000, 3000)) == s.data[50_000:53_000]


def test_a_leaf_larger_than_the_whole_budget_evicts_nothing(fast):
    """Refused before anything is evicted (it could never fit)."""
    native.fast_configure(leaf_bytes=6000)
    keys = [b"\x01" + bytes([i]) * 32 for i in range(4)]
    for i, key in enumerate(keys):
        assert native.fast_put_leaf(key, i, bytes(1024))
    assert native.fast_info()["leaves"] == 4
    assert native.fast_put_leaf(b"\x01" + b"\x09" * 32, 0, bytes(8192)) is False
    assert native.fast_info()["leaves"] == 4


def test_a_root_hash_is_only_for_a_one_block_file(fast, tmp_path):
    """Registered with a root hash (the one-block form), a file longer than one block
    would have its first block checked against the root: refused."""
    fd = os.open(write(tmp_path / "x", bytes(8192)), os.O_RDONLY)
    try:
        key, root = b"\x01" + bytes(32), bytes(32)
        with pytest.raises(ValueError, match="out of range"):
            native.fast_register(18, fd, 1, b"", 4096, 4097, key, root, 0)
        assert native.fast_register(18, fd, 1, b"", 4096, 4096, key, root, 0)
    finally:
        native.fast_forget(18)
        os.close(fd)


def test_an_open_that_fails_after_registering_keeps_no_slot(fast, sealed, monkeypatch):
    """Out of memory while its leaf block is verified at open: the open fails (ops
    releases the handle and closes its fd), so the native table must forget it too."""
    s = sealed(os.urandom(100_000))
    assert s.reader.verifier.top == 0  # one leaf block: verified at registration

    def oom(*args):
        raise MemoryError

    monkeypatch.setattr(s.reader.verifier, "expected_hashes", oom)
    before = native.fast_info()["handles"]
    with pytest.raises(MemoryError):
        fast.register(19, s.h)
    assert 19 not in fast.registered
    assert native.fast_info()["handles"] == before
    assert native.fast_read(19, 4096, 0) is None


def test_the_leaf_table_grows_with_its_budget(fast):
    native.fast_configure(leaf_bytes=256 << 20)
    assert native.fast_info()["leaf_slots"] >= 2 * (256 << 20) // 4096
    native.fast_configure(leaf_bytes=16 << 20)
    assert native.fast_info()["leaf_slots"] >= 2 * (16 << 20) // 4096


def test_offsets_near_the_largest_file_size_are_declined(fast, tmp_path):
    """A sealed size near 2**63: the span arithmetic must not overflow (no leaf is
    there, so it declines)."""
    fd = os.open(write(tmp_path / "x", b"x"), os.O_RDONLY)
    try:
        huge = (1 << 63) - 1
        assert native.fast_register(17, fd, 1, b"", 4096, huge, b"\x01" + b"\x00" * 32, b"", 0)
        for off in (huge - 1, huge - 4096, huge - (1 << 20) + 5):
            assert native.fast_read(17, 1 << 20, off) is None
    finally:
        native.fast_forget(17)
        os.close(fd)


def test_whether_a_file_system_answers_nowait_is_asked_once_at_open(tmp_path):
    """A file system that can say (tmpfs, ext4) answers RWF_NOWAIT; FUSE sources refuse it
    (tests/test_fast_read_mount.py reads through one)."""
    from verityfuse import fsutil

    fd = os.open(write(tmp_path / "f", b"x" * 10), os.O_RDONLY)
    try:
        assert fsutil.nowait_supported(fd) is True
        assert fsutil.all_cached(fd, 0, 10) is True
    finally:
        os.close(fd)


def test_a_handle_changed_while_a_read_waited_for_a_buffer_is_read_whole(fast, sealed):
    """A read waits for a reply buffer (all four still being sent) without the GIL; if
    its handle is forgotten meanwhile and the fh registered again for another file (not
    done by today's daemon: both run on the request thread), the read used the old
    handle's sizes with the new one's fd and hashes, and replied a stale buffer's bytes
    that were never read or hashed.  The handle is now looked up after the wait: the
    reply is the new file's bytes, every one read and hashed."""
    import ctypes
    import threading

    a = sealed(b"A" * 65536, params=merkle.Params(merkle.SHA256, 1024))
    b = sealed(b"B" * 65536)
    c = sealed(bytes(range(256)) * 256)
    for s in (a, b, c):
        s.warm()
    fast.register(1, a.h)
    fast.register(3, c.h)
    read_addr, done_addr = native.fast_entry()
    # As the shim calls them: with the GIL held.
    read = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int64,
                             ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t),
                             ctypes.POINTER(ctypes.c_int))(read_addr)
    done = ctypes.PYFUNCTYPE(None, ctypes.c_int)(done_addr)

    def call(fh, size, off):
        out, n, token = ctypes.c_void_p(), ctypes.c_size_t(), ctypes.c_int()
        rc = read(fh, size, off, ctypes.byref(out), ctypes.byref(n), ctypes.byref(token))
        return rc, (ctypes.string_at(out, n.value) if rc == 0 else None), token.value

    held = [call(3, 8192, 0)] + [call(3, 4096, 0) for _ in range(3)]  # four replies unsent
    assert [rc for rc, _, _ in held] == [0] * 4
    result = []
    waits = native.fast_info()["buffer_waits"]
    t = threading.Thread(target=lambda: result.append(call(1, 5120, 0)))
    t.start()
    for _ in range(1000):  # until it waits for a buffer (the GIL released)
        if native.fast_info()["buffer_waits"] > waits:
            break
        t.join(0.01)
    assert native.fast_info()["buffer_waits"] == waits + 1
    fast.forget(1)
    fast.register(1, b.h)
    done(held[0][2])  # a reply was sent: its buffer is free
    t.join()
    for _, _, token in held[1:]:
        done(token)
    ((rc, got, token),) = result
    if rc == 0:
        done(token)
        assert got == b.data[:5120]
    assert rc in (0, -1)
