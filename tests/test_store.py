"""The sidecar store and offline seal/verify: atomicity, corruption, symlinks,
the index keyed by inode identity, bad input in the store."""

import hashlib
import json
import os
import stat
import shutil
import subprocess
import sys
import time

import pytest

from verityfuse import merkle
from verityfuse.errors import StoreCorrupt
from verityfuse.sealing import entry_of_path, seal_path, verify_file
from verityfuse.store import Store, StoreFormat
from verityfuse.store_object import TREE_OFFSET
from verityfuse.verifier import TreeBlockCache
from conftest import flip, fsverity_digest, pattern, write

PARAMS = merkle.Params(merkle.SHA256, 1024)


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    write(d / "big", pattern(300000))      # 3 levels at 1 KiB blocks? 293 blocks: 2 levels
    write(d / "small", b"hello\n")
    (d / "sub").mkdir()
    write(d / "sub" / "empty", b"")
    return d


def seal(store, src, rel, params=PARAMS):
    return seal_path(store, str(src), rel, params)


def object_path(store, entry):
    return store.object_path(entry.alg, entry.digest)


def test_seal_roundtrip_matches_fsverity_utils(src, tmp_path):
    with Store(str(tmp_path / "store"), create=True) as st:
        e = seal(st, src, "big")
        line, tree, desc = fsverity_digest(src / "big", "--block-size=1024")
        assert line.split()[0] == e.digest_text
        got = entry_of_path(st, src / "big")
        assert got == e and got.path == "big"
        with st.open_tree(e) as t:
            assert t.descriptor.raw == desc
            assert t.read_tree(0, 1 << 30) == tree
            assert t.read_tree(997, 13) == tree[997:1010]
        assert st.get_entry("0" * 64) is None
        assert os.listdir(os.path.join(st.path, "tmp")) == []


def test_verify_reports_first_bad_offset_with_hashes(src, tmp_path):
    with Store(str(tmp_path / "store"), create=True) as st:
        e = seal(st, src, "big")
        with open(src / "big", "r+b") as f:
            f.seek(5000)
            f.write(b"X")
        res = verify_file(st, str(src), "big", TreeBlockCache())
        err = res.error
        assert res.entry == e
        assert err is not None and err.offset == 4096  # block 4 of 1 KiB blocks
        assert err.expected != err.actual and len(err.actual) == 32
        assert str(src / "big") in str(err)


def test_truncated_object_is_detected(src, tmp_path):
    with Store(str(tmp_path / "store"), create=True) as st:
        e = seal(st, src, "big")
        p = object_path(st, e)
        os.truncate(p, os.path.getsize(p) - 1)
        with pytest.raises(StoreCorrupt, match=r"tree is .* bytes.*expected"):
            st.open_tree(e)
        os.truncate(p, 100)
        with pytest.raises(StoreCorrupt, match="truncated header"):
            st.open_tree(e)


def test_flipped_tree_byte_fails_verification_not_silently(src, tmp_path):
    with Store(str(tmp_path / "store"), create=True) as st:
        e = seal(st, src, "big")
        p = object_path(st, e)
        flip(p, TREE_OFFSET + 1024 + 7)  # a leaf block
        res = verify_file(st, str(src), "big", TreeBlockCache())
        assert "Merkle tree block (level 0, index 0)" in str(res.error)


def test_flipped_descriptor_byte_is_detected(src, tmp_path):
    with Store(str(tmp_path / "store"), create=True) as st:
        e = seal(st, src, "big")
        p = object_path(st, e)
        flip(p, TREE_OFFSET - 256 + 20)  # inside root_hash
        with pytest.raises(StoreCorrupt, match="does not match its digest"):
            st.open_tree(e)


def test_symlink_planted_in_store_is_refused(src, tmp_path):
    with Store(str(tmp_path / "store"), create=True) as st:
        e = seal(st, src, "big")
        p = object_path(st, e)
        os.unlink(p)
        os.symlink(str(src / "big"), p)
        with pytest.raises(StoreCorrupt, match="symlink"):
            st.open_tree(e)
        # a symlinked directory inside the store
        shard = os.path.dirname(p)
        os.rename(shard, shard + ".real")
        os.symlink(shard + ".real", shard)
        with pytest.raises(StoreCorrupt, match="symlink"):
            st.open_tree(e)


def test_a_kept_object_changed_on_disk_still_fails_its_reads(src, tmp_path):
    """A released object stays open (kept) for the next open of its digest; what the
    disk says later is still checked: every tree block read is hashed up to the
    descriptor validated at the first open."""
    with Store(str(tmp_path / "store"), create=True) as st:
        e = seal(st, src, "big")
        with st.open_tree(e) as t:
            fd = t.fd
        flip(object_path(st, e), TREE_OFFSET + 1024 + 7)  # a leaf block
        flip(object_path(st, e), 10)  # the header: not read again while kept
        with st.open_tree(e) as t:
            assert t.fd == fd  # the kept one
        res = verify_file(st, str(src), "big", TreeBlockCache())
        assert "Merkle tree block (level 0, index 0)" in str(res.error)
        st._trees.drop_idle()
        with pytest.raises(StoreCorrupt, match="bad object header"):  # read again: refused
            st.open_tree(e)


def test_an_object_whose_block_failed_is_not_kept_so_a_repair_is_seen(src, tmp_path):
    """Once a block of an object failed, its last release closes it instead of keeping
    it: an object repaired by renaming a good copy over it (as the store's own writes,
    rsync or a restore do) is read at the next open, not the damaged inode kept open."""
    with Store(str(tmp_path / "store"), create=True) as st:
        e = seal(st, src, "big")
        path = object_path(st, e)
        good = open(path, "rb").read()
        flip(path, TREE_OFFSET + 1024 + 7)  # a leaf block
        for _ in range(2):  # failing again and again does not keep it either
            res = verify_file(st, str(src), "big", TreeBlockCache())
            assert "Merkle tree block (level 0, index 0)" in str(res.error)
        write(path + ".new", good)
        os.rename(path + ".new", path)
        assert verify_file(st, str(src), "big", TreeBlockCache()).error is None
        # A truncated tree block fails the object too.
        with open(path, "r+b") as f:
            f.truncate(TREE_OFFSET + 1024 + 100)
        with st.open_tree(e) as t:
            with pytest.raises(StoreCorrupt, match="truncated"):
                t.read_tree_block(1)
        assert st._trees._idle == {}


def test_kept_objects_are_bounded_and_closed_with_the_store(src, tmp_path):
    from verityfuse.store_object import KEEP_IDLE

    at_start = len(os.listdir("/proc/self/fd"))
    st = Store(str(tmp_path / "store"), create=True)
    entries = []
    for i in range(KEEP_IDLE + 5):
        write(src / f"f{i}", b"%d" % i * 3000)
        entries.append(seal(st, src, f"f{i}"))
    base = len(os.listdir("/proc/self/fd"))
    for e in entries:
        st.open_tree(e).close()
    assert len(os.listdir("/proc/self/fd")) == base + KEEP_IDLE
    st.close()
    assert len(os.listdir("/proc/self/fd")) == at_start


BAD_ENTRIES = [b"{not json", b"\xff\xfe", b"[]", b'{"version": 1, "path": "a", "digest": "sha256:00"}',
               b'{"version": 2, "path": 7, "digest": "sha256:' + b"00" * 32 + b'"}',
               b'{"version": 2, "path": "a", "digest": ["x"]}',
               b'{"version": 2, "path": "a", "digest": "md5:00"}',
               b'{"version": 2, "path": "a", "digest": "sha256:' + b"00" * 32 + b'", "signature": 5}',
               b'{"version": 2, "path": "a", "digest": "sha256:' + b"00" * 32 + b'", "signature": "zz"}',
               b'{"version": 2, "path": "a", "digest": "sha256:' + b"00" * 32 + b'", "x": 1}']


def test_malformed_index_entry_names_the_file(src, tmp_path):
    with Store(str(tmp_path / "store"), create=True) as st:
        e = seal(st, src, "small")
        p = os.path.join(st.path, *st._index_parts(e.key))
        for bad in BAD_ENTRIES:
            with open(p, "wb") as f:
                f.write(bad)
            with pytest.raises(StoreCorrupt, match=f"{p}: malformed index entry"):
                st.get_entry(e.key)
            r = subprocess.run([sys.executable, "-m", "verityfuse.cli", "verify", src, "--store",
                                st.path], capture_output=True, text=True)
            assert r.returncode == 1 and "Traceback" not in r.stderr, bad
            assert f"CORRUPT {src}/small: {p}: malformed index entry" in r.stdout, bad


def test_index_follows_the_inode(src, tmp_path):
    """Renames and links keep verity, a new file at the old path has none."""
    with Store(str(tmp_path / "store"), create=True) as st:
        e = seal(st, src, "big")
        os.rename(src / "big", src / "sub" / "moved")
        os.link(src / "sub" / "moved", src / "link")
        assert entry_of_path(st, src / "sub" / "moved") == e == entry_of_path(st, src / "link")
        write(src / "big", pattern(300000))  # same path, same content, another inode
        assert entry_of_path(st, src / "big") is None
        with pytest.raises(ValueError):
            st.get_entry("../x")


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_fifo_or_device_in_the_store_is_corruption_and_never_blocks(src, tmp_path, kind):
    with Store(str(tmp_path / "store"), create=True) as st:
        e = seal(st, src, "big")
        p = object_path(st, e)
        os.unlink(p)
        if kind == "fifo":
            os.mkfifo(p)
        else:
            os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero
        what = "a FIFO" if kind == "fifo" else "a character device"
        with pytest.raises(StoreCorrupt, match=f"{p} is {what}, not a regular file"):
            st.open_tree(e)


def test_block_size_above_64k_is_refused_as_corrupt(src, tmp_path):
    with Store(str(tmp_path / "store"), create=True) as st:
        e = seal(st, src, "big", merkle.Params(merkle.SHA256, 1 << 17))
        with pytest.raises(StoreCorrupt, match="block size 131072 is larger than 65536"):
            st.open_tree(e)


def test_format_1_store_is_refused_then_upgraded(src, tmp_path):
    store = tmp_path / "store"
    with Store(str(store), create=True) as st:
        e = seal(st, src, "big")
        os.remove(os.path.join(st.path, *st._index_parts(e.key)))
    # what a format-1 store looks like: VERSION 1 and a path index
    (store / "VERSION").write_bytes(b"verityfuse-store 1\n")
    for rel, digest in (("big", e.digest_text), ("gone", e.digest_text)):
        h = hashlib.sha256(rel.encode()).hexdigest()
        (store / "index" / h[:2]).mkdir(parents=True, exist_ok=True)
        (store / "index" / h[:2] / h).write_text(json.dumps({"version": 1, "path": rel, "digest": digest}))
    with pytest.raises(StoreFormat, match=f"verityfuse upgrade-store SOURCE --store {store}"):
        Store(str(store))
    Store(str(store), objects_only=True).close()  # manifest mode reads its objects
    vf = [sys.executable, "-m", "verityfuse.cli"]
    r = subprocess.run([*vf, "verify", src, "--store", store], capture_output=True, text=True)
    assert r.returncode == 1 and "upgrade-store" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*vf, "upgrade-store", src, "--store", store], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "gone: No such file or directory; its entry is dropped" in r.stderr
    assert "1 entries converted, 1 dropped" in r.stderr
    assert not (store / "index").exists()
    with Store(str(store)) as st:
        assert entry_of_path(st, src / "big").digest == e.digest
    r = subprocess.run([*vf, "verify", src, "--store", store, "-v"], capture_output=True, text=True)
    assert r.returncode == 0 and f"OK {e.digest_text} {src}/big" in r.stdout


def _upgrade_one_format_1_entry(src, store, path: str):
    """Seal SOURCE/big, turn the store into format 1 with one path entry ``path`` for its
    digest, and run `verityfuse upgrade-store` on it."""
    with Store(str(store), create=True) as st:
        e = seal(st, src, "big")
        os.remove(os.path.join(st.path, *st._index_parts(e.key)))
    (store / "VERSION").write_bytes(b"verityfuse-store 1\n")
    h = hashlib.sha256(path.encode()).hexdigest()
    (store / "index" / h[:2]).mkdir(parents=True)
    (store / "index" / h[:2] / h).write_text(
        json.dumps({"version": 1, "path": path, "digest": e.digest_text}))
    return subprocess.run([sys.executable, "-m", "verityfuse.cli", "upgrade-store", src,
                           "--store", store], capture_output=True, text=True)


def test_upgrade_never_indexes_a_file_through_a_symlinked_directory(src, tmp_path):
    """A format-1 entry "link/big" where link is now a symlink to a directory outside
    SOURCE: the upgrade must not index the inode out there (a later read of whatever
    SOURCE/link/big becomes would be checked against it); the entry is dropped."""
    store = tmp_path / "store"
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(src / "big", outside / "big")
    os.symlink(outside, src / "link")
    r = _upgrade_one_format_1_entry(src, store, "link/big")
    assert r.returncode == 0, r.stderr
    assert "link/big: Too many levels of symbolic links; its entry is dropped" in r.stderr
    assert "0 entries converted, 1 dropped" in r.stderr
    with Store(str(store)) as st:
        assert entry_of_path(st, outside / "big") is None


def test_upgrade_refuses_a_path_with_a_nul(src, tmp_path):
    """A format-1 entry "big\\0x" names no file: refused as malformed, never cut at the
    NUL to index "big" instead."""
    store = tmp_path / "store"
    r = _upgrade_one_format_1_entry(src, store, "big\0x")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "malformed format-1 index entry: invalid relative path 'big\\x00x'" in r.stderr
    assert (store / "VERSION").read_bytes() == b"verityfuse-store 1\n"  # not converted


def test_store_version_is_checked(tmp_path):
    Store(str(tmp_path / "s"), create=True).close()
    with open(tmp_path / "s" / "VERSION", "wb") as f:
        f.write(b"verityfuse-store 9\n")
    with pytest.raises(StoreCorrupt, match="unsupported store version"):
        Store(str(tmp_path / "s"))
    with pytest.raises(StoreCorrupt, match="does not exist"):
        Store(str(tmp_path / "missing"))


def test_crash_mid_write_leaves_no_entry_and_tmp_is_cleaned(src, tmp_path):
    """A sealing process killed before commit: no index entry, and its tmp file is collected."""
    store = str(tmp_path / "store")
    Store(store, create=True).close()
    code = f"""
import os, sys
sys.path.insert(0, {os.getcwd()!r})
from verityfuse import merkle
from verityfuse.store import Store
st = Store({store!r})
w = st.new_object()
w.write_block(0, b"x" * 4096)
os._exit(9)  # die before commit
"""
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    with Store(store) as st:
        assert len(os.listdir(os.path.join(store, "tmp"))) == 1
        assert list(st.keys()) == []
        assert st.cleanup_tmp() == 1
        assert os.listdir(os.path.join(store, "tmp")) == []


def test_tmp_names_are_unique_and_name_their_process_across_a_fork(tmp_path):
    """tmp/ names are drawn without a system call each (a counter after a random part
    drawn per process): a forked child (a seal worker) draws its own, and each name
    starts with its maker's pid, which cleanup_tmp reads."""
    with Store(str(tmp_path / "s"), create=True) as st:
        made = [st.create_tmp() for _ in range(3)]
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                name, fd = st.create_tmp()
                os.write(w, name.encode())
            finally:
                os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        child = os.read(r, 200).decode()
        os.close(r)
        made.append(st.create_tmp())
        for _, fd in made:
            os.close(fd)
        ours = [name for name, _ in made]
        assert len(set(ours + [child])) == 5
        assert {n.split(".")[0] for n in ours} == {str(os.getpid())}
        assert child.split(".")[0] == str(pid) and child.split(".")[1][:12] != ours[0].split(".")[1][:12]
        assert sorted(os.listdir(os.path.join(st.path, "tmp"))) == sorted(ours + [child])
        assert st.cleanup_tmp() == 1  # the child's: its process is gone
        assert sorted(os.listdir(os.path.join(st.path, "tmp"))) == sorted(ours)


def test_tmp_files_of_a_zombie_are_removed(tmp_path):
    """A process that has exited but is not reaped yet (a zombie, as seal's workers are
    for a while under a slow init) will never finish its tmp/ files."""
    with Store(str(tmp_path / "s"), create=True) as st:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        try:
            for _ in range(200):  # until it has exited (state Z), without reaping it
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
                time.sleep(0.01)
            write(os.path.join(st.path, "tmp", f"{pid}.abc"), b"x")
            ours, fd = st.create_tmp()
            os.close(fd)
            assert st.cleanup_tmp() == 1
            assert os.listdir(os.path.join(st.path, "tmp")) == [ours]
        finally:
            os.waitpid(pid, 0)


# -- batches: durable once per batch, in crash-safe order (store_batch.py) ----------------

def _published(store_dir):
    """(objects, index entries) in place: every file below objects/ and inodes/."""
    found = []
    for part in ("objects", "inodes"):
        top = os.path.join(store_dir, part)
        found.append(sorted(os.path.relpath(os.path.join(d, f), top)
                            for d, _, files in os.walk(top) for f in files))
    return tuple(found)


def test_a_batch_names_nothing_before_it_is_durable(src, tmp_path, monkeypatch):
    """At each sync of a commit the store is in the state the crash-ordering rule allows: first
    nothing is published (all under tmp/), then the objects only, then the entries too; the
    files are reported only after the last sync."""
    from verityfuse.sealing import stage_path
    from verityfuse.store_batch import Batch

    store_dir = str(tmp_path / "store")
    events = []
    with Store(store_dir, create=True) as st:
        real_sync = st.sync
        monkeypatch.setattr(st, "sync", lambda: (events.append(("sync", _published(store_dir),
                                                                len(os.listdir(st.path + "/tmp")))),
                                                 real_sync()))
        rels = ("big", "small", "sub/empty")
        staged = [stage_path(st, str(src), rel, PARAMS)[0] for rel in rels]
        batch = Batch(st, flush=lambda: events.append(("flush",)))
        for rel, s in zip(rels, staged):
            batch.add(s)
            batch.then(lambda rel=rel: events.append(("done", rel)))
        batch.commit()
        h = staged[0].digest.hex()
        objects = [f"sha256/{h[:2]}/{h}"]  # the files of one block keep theirs in their entries
        entries = sorted(f"{s.key[:2]}/{s.key}" for s in staged)
        assert events == [("sync", ([], []), 4), ("sync", (objects, []), 3),
                          ("sync", (objects, entries), 0),
                          ("done", "big"), ("done", "small"), ("done", "sub/empty"), ("flush",)]
        with Store(str(tmp_path / "other"), create=True) as other:
            for rel, s in zip(rels, staged):
                entry = st.get_entry(s.key)
                assert entry == seal(other, src, rel)  # what sealing one file publishes
                assert (entry.key, entry.digest) == (s.key, s.digest)
                with st.open_tree(entry):
                    pass


def test_a_failed_sync_publishes_nothing_and_leaves_no_tmp_file(src, tmp_path, monkeypatch):
    """syncfs reporting a writeback error: no object and no entry is renamed into place, the
    staged files are removed, and the error (with the store's name) reaches the caller."""
    import errno as errno_mod

    from verityfuse.sealing import stage_path
    from verityfuse.store_batch import Batch

    store_dir = str(tmp_path / "store")
    with Store(store_dir, create=True) as st:
        def fail():
            raise OSError(errno_mod.EIO, "syncfs: Input/output error", store_dir)
        monkeypatch.setattr(st, "sync", fail)
        with pytest.raises(OSError) as e:
            with Batch(st) as batch:
                batch.add(stage_path(st, str(src), "small", PARAMS)[0])
                batch.then(lambda: pytest.fail("reported although not durable"))
        assert e.value.errno == errno_mod.EIO and e.value.filename == store_dir
        assert _published(store_dir) == ([], [])
        assert os.listdir(os.path.join(store_dir, "tmp")) == []


@pytest.fixture(params=["native", "python"])
def placing(request, monkeypatch):
    """A batch's renames in one native call (store_batch.place_all), and in Python."""
    from verityfuse import fsutil

    if request.param == "native" and fsutil.native_sys is None:
        pytest.skip("the native module is not built")
    if request.param == "python":
        monkeypatch.setattr(fsutil, "native_sys", None)
    return request.param


def test_a_batch_refuses_a_symlinked_shard_and_names_it_whole(src, tmp_path, placing):
    """A batch opens objects/<alg> once and each shard below it: a shard planted as a
    symlink (to a directory outside) is refused by its whole name in the store, and
    nothing is written through it."""
    from verityfuse.sealing import stage_path
    from verityfuse.store_batch import Batch

    store_dir = str(tmp_path / "store")
    outside = tmp_path / "outside"
    outside.mkdir()
    with Store(store_dir, create=True) as st:
        staged = stage_path(st, str(src), "big", PARAMS)[0]  # more than a block: an object
        hh = staged.digest.hex()[:2]
        os.makedirs(os.path.join(store_dir, "objects", "sha256"))
        os.symlink(outside, os.path.join(store_dir, "objects", "sha256", hh))
        with pytest.raises(StoreCorrupt) as e:
            with Batch(st) as batch:
                batch.add(staged)
        assert str(e.value) == (f"{store_dir}/objects/sha256/{hh}: refusing a symlink or "
                                f"non-directory inside the store")
        assert os.listdir(outside) == []
        assert os.listdir(os.path.join(store_dir, "tmp")) == []


def _staged_files(st, src):
    from verityfuse.sealing import stage_path

    for i in range(4):
        write(src / f"more{i}", pattern(5000 + i))  # objects (over one block) and entries
    rels = ["big", "small", "sub/empty"] + [f"more{i}" for i in range(4)]
    return [stage_path(st, str(src), rel, PARAMS)[0] for rel in rels]


def _block_third_entry(st, staged):
    """A directory where the third index entry placed goes (entries are placed a shard
    after the other, each shard's in the order added): its rename fails (EISDIR).  The
    entry blocked, and those placed before it."""
    placed = sorted(range(len(staged)), key=lambda i: st._index_parts(staged[i].key)[:-1])
    blocked = staged[placed[2]]
    os.makedirs(os.path.join(st.path, *st._index_parts(blocked.key)))
    return blocked, sorted(staged[i].key for i in placed[:2])


def test_a_bad_index_key_is_refused_before_anything_is_placed(src, tmp_path):
    """A batch's keys are checked before its first sync and rename: a key that is no
    index key (a path out of inodes/) fails the commit with the store as it was, and its
    staged files are removed."""
    from verityfuse.store_batch import Batch

    store_dir = str(tmp_path / "store")
    with Store(store_dir, create=True) as st:
        staged = _staged_files(st, src)
        staged[1] = staged[1]._replace(key="../../etc/x" + "0" * 53)
        with pytest.raises(ValueError, match=r"invalid index key '\.\./\.\./etc/x0"):
            with Batch(st) as batch:
                for s in staged:
                    batch.add(s)
        assert sorted(os.listdir(store_dir)) == ["VERSION", "tmp"]
        assert os.listdir(os.path.join(store_dir, "tmp")) == []


def test_a_commit_failing_half_way_leaves_nothing_in_tmp(src, tmp_path, placing):
    """A rename failing among the index entries: the error (its errno, naming the entry's
    place in the store) reaches the caller, what was renamed before it stays in place (objects synced first,
    so no entry names a missing one), and nothing stays in tmp/; no callback runs."""
    import errno as errno_mod
    from verityfuse.store_batch import Batch

    store_dir = str(tmp_path / "store")
    with Store(store_dir, create=True) as st:
        staged = _staged_files(st, src)
        n_objects = sum(s.obj_tmp is not None for s in staged)
        blocked, before = _block_third_entry(st, staged)
        done = []
        with pytest.raises(OSError) as e:
            with Batch(st) as batch:
                for s in staged:
                    batch.add(s)
                    batch.then(done.append, s.key)
        assert e.value.errno == errno_mod.EISDIR and done == []
        assert (e.value.filename, e.value.filename2) == (
            os.path.join(store_dir, *st._index_parts(blocked.key)), None)
        objects, entries = _published(store_dir)
        assert len(objects) == n_objects == 5
        assert [os.path.basename(p) for p in entries] == before
        assert os.listdir(os.path.join(store_dir, "tmp")) == []


def test_a_batch_published_in_its_thread_reports_in_the_callers_thread_in_order(src, tmp_path):
    """commit_soon publishes in the batch's thread while the caller stages the next files;
    the callbacks of a batch run in the caller's thread, in order, at the next commit (or
    when the batch ends), once its files are durable; two batches at most in memory."""
    import threading
    from verityfuse.store_batch import Batch

    store_dir = str(tmp_path / "store")
    with Store(store_dir, create=True) as st:
        staged = _staged_files(st, src)
        seen = []

        def done(i):
            entry = st.get_entry(staged[i].key)  # durable, and in place
            seen.append((i, threading.current_thread() is threading.main_thread(),
                         entry.digest == staged[i].digest))

        with Batch(st, flush=lambda: seen.append("flush")) as batch:
            for i, s in enumerate(staged[:3]):
                batch.add(s)
                batch.then(done, i)
            batch.commit_soon()
            assert seen == []  # reported at the next commit, not from the thread
            for i, s in enumerate(staged[3:], 3):
                batch.add(s)
                batch.then(done, i)
            batch.commit_soon()
            assert seen == [(0, True, True), (1, True, True), (2, True, True), "flush"]
        assert seen[4:] == [(i, True, True) for i in range(3, 7)] + ["flush"]
        assert len(_published(store_dir)[1]) == 7
        assert os.listdir(os.path.join(store_dir, "tmp")) == []


def test_a_batch_failing_in_its_thread_fails_the_next_commit_and_leaves_nothing(src, tmp_path,
                                                                              placing):
    """A publish failing in the batch's thread: its error is raised in the caller's thread
    at the next commit_soon, its callbacks never run, and leaving the batch removes its
    tmp/ files and those of the files staged since; what was placed before the failure
    stays."""
    import errno as errno_mod
    from verityfuse.store_batch import Batch

    store_dir = str(tmp_path / "store")
    with Store(store_dir, create=True) as st:
        staged = _staged_files(st, src)
        blocked, before = _block_third_entry(st, staged[:5])
        done = []
        with pytest.raises(OSError) as e:
            with Batch(st) as batch:
                for s in staged[:5]:
                    batch.add(s)
                    batch.then(done.append, s.key)
                batch.commit_soon()
                for s in staged[5:]:
                    batch.add(s)
                    batch.then(done.append, s.key)
                batch.commit_soon()
        assert e.value.errno == errno_mod.EISDIR and done == []
        assert (e.value.filename, e.value.filename2) == (
            os.path.join(st.path, *st._index_parts(blocked.key)), None)
        assert [os.path.basename(p) for p in _published(store_dir)[1]] == before
        assert os.listdir(os.path.join(store_dir, "tmp")) == []


def test_seal_cli_reports_files_in_order_and_seals_the_others_after_a_failure(tmp_path):
    """A file that cannot be sealed is reported in its place among the others (files are
    sealed by several threads, reported in order), every other file is sealed and indexed,
    exit 1."""
    src = tmp_path / "src"
    src.mkdir()
    names = [f"f{i:03d}" for i in range(40)]
    for i, name in enumerate(names):
        write(src / name, pattern(i * 700))
    asked = names[:20] + ["missing"] + names[20:]
    r = subprocess.run([sys.executable, "-m", "verityfuse", "seal", str(src),
                        *(str(src / n) for n in asked), "--json", "--threads", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["file"] for o in got] == [str(src / n) for n in asked]
    assert got[20]["error"] == "No such file or directory" and "digest" not in got[20]
    for o in got[:20] + got[21:]:
        assert o["digest"] == fsverity_digest(o["file"])[0].split()[0]
    with Store(str(src / ".verityfuse")) as st:
        assert len(list(st.keys())) == 40
        assert os.listdir(os.path.join(st.path, "tmp")) == []


def test_the_first_write_to_a_lazy_store_creates_it(src, tmp_path):
    """A local mount's store is lazy: the first object written creates the store (VERSION
    included, written through the same tmp/ directory) instead of waiting on itself."""
    store_dir = str(tmp_path / "lazy")
    with Store(store_dir, lazy=True) as st:
        assert not st.exists
        e = seal(st, src, "small")
        assert st.get_entry(e.key) == e and e.descriptor is not None  # format 3: inline
    with open(os.path.join(store_dir, "VERSION"), "rb") as f:
        assert f.read() == b"verityfuse-store 3\n"


@pytest.mark.parametrize("path", ["docs/hello.txt", "", 'w\u00e9"ird\n\\ name\x01\u2028'])
@pytest.mark.parametrize("signature", [b"", b"\x01\x02\xff"])
def test_an_index_entry_is_the_json_the_format_gives(path, signature):
    """Entries are formatted by hand (once per sealed file): the same bytes as json.dumps
    with sorted keys, whatever the path holds, and parse_entry reads them back."""
    from verityfuse.store_index import IndexEntry, entry_bytes, parse_entry

    digest = bytes(range(64))
    doc = {"version": 2, "path": path, "digest": "sha512:" + digest.hex()}
    if signature:
        doc["signature"] = signature.hex()
    raw = entry_bytes(merkle.SHA512, digest, signature, path)
    assert raw == json.dumps(doc, sort_keys=True).encode() + b"\n"
    assert parse_entry("e", "k" * 64, raw) == IndexEntry("k" * 64, merkle.SHA512, digest,
                                                         signature, path)


def test_a_staged_file_crosses_a_pipe_whole(tmp_path):
    """seal_pool's workers hand back Staged results through a pipe: what arrives is
    equal to what was staged (no object for a file of one block in a format-3 store,
    one for a larger one), and is published as it would be."""
    import pickle
    from verityfuse.sealing import stage_path
    from verityfuse.store_batch import Batch
    src = tmp_path / "src"
    src.mkdir()
    write(src / "small", b"s" * 100)
    write(src / "big", pattern(3 * 4096 + 5))
    write(src / "empty", b"")
    st = Store(str(tmp_path / "store"), create=True)
    staged = [stage_path(st, str(src), rel, PARAMS)[0] for rel in ("small", "big", "empty")]
    back = pickle.loads(pickle.dumps(staged))
    assert back == staged
    assert [s.obj_tmp is None for s in back] == [True, False, True]
    with Batch(st) as batch:
        for s in back:
            batch.add(s)
    for rel, s in zip(("small", "big", "empty"), staged):
        entry = entry_of_path(st, str(src / rel))
        assert (entry.key, entry.alg, entry.digest, entry.path) == (s.key, s.alg, s.digest, rel)
        assert (entry.descriptor is not None) == (s.obj_tmp is None)  # kept inline, or an object
        line, _, desc = fsverity_digest(src / rel, "--block-size=1024")
        assert line.split()[0] == s.digest_text
        if entry.descriptor is not None:
            assert entry.descriptor.raw == desc
    st.close()
