"""The sidecar store and offline seal/verify: atomicity, corruption, symlinks."""

import os
import subprocess
import sys

import pytest

from verityfuse import merkle
from verityfuse.errors import StoreCorrupt
from verityfuse.seal import seal_path, verify_entry
from verityfuse.store import TREE_OFFSET, Store
from verityfuse.verify import TreeBlockCache
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
        got = st.get_entry("big")
        assert got == e
        with st.open_object(e.alg, e.digest) as t:
            assert t.descriptor.raw == desc
            assert t.read_tree(0, 1 << 30) == tree
            assert t.read_tree(997, 13) == tree[997:1010]
        assert st.get_entry("nope") is None
        assert os.listdir(os.path.join(st.path, "tmp")) == []


def test_verify_reports_first_bad_offset_with_hashes(src, tmp_path):
    with Store(str(tmp_path / "store"), create=True) as st:
        e = seal(st, src, "big")
        with open(src / "big", "r+b") as f:
            f.seek(5000)
            f.write(b"X")
        res = verify_entry(st, str(src), e, TreeBlockCache())
        err = res.error
        assert err is not None and err.offset == 4096  # block 4 of 1 KiB blocks
        assert err.expected != err.actual and len(err.actual) == 32
        assert str(src / "big") in str(err)


def test_truncated_object_is_detected(src, tmp_path):
    with Store(str(tmp_path / "store"), create=True) as st:
        e = seal(st, src, "big")
        p = object_path(st, e)
        os.truncate(p, os.path.getsize(p) - 1)
        with pytest.raises(StoreCorrupt, match=r"tree is .* bytes.*expected"):
            st.open_object(e.alg, e.digest)
        os.truncate(p, 100)
        with pytest.raises(StoreCorrupt, match="truncated header"):
            st.open_object(e.alg, e.digest)


def test_flipped_tree_byte_fails_verification_not_silently(src, tmp_path):
    with Store(str(tmp_path / "store"), create=True) as st:
        e = seal(st, src, "big")
        p = object_path(st, e)
        flip(p, TREE_OFFSET + 1024 + 7)  # a leaf block
        res = verify_entry(st, str(src), e, TreeBlockCache())
        assert "Merkle tree block (level 0, index 0)" in str(res.error)


def test_flipped_descriptor_byte_is_detected(src, tmp_path):
    with Store(str(tmp_path / "store"), create=True) as st:
        e = seal(st, src, "big")
        p = object_path(st, e)
        flip(p, TREE_OFFSET - 256 + 20)  # inside root_hash
        with pytest.raises(StoreCorrupt, match="does not match its digest"):
            st.open_object(e.alg, e.digest)


def test_symlink_planted_in_store_is_refused(src, tmp_path):
    with Store(str(tmp_path / "store"), create=True) as st:
        e = seal(st, src, "big")
        p = object_path(st, e)
        os.unlink(p)
        os.symlink(str(src / "big"), p)
        with pytest.raises(StoreCorrupt, match="symlink"):
            st.open_object(e.alg, e.digest)
        # a symlinked directory inside the store
        shard = os.path.dirname(p)
        os.rename(shard, shard + ".real")
        os.symlink(shard + ".real", shard)
        with pytest.raises(StoreCorrupt, match="symlink"):
            st.open_object(e.alg, e.digest)


def test_malformed_index_entry_names_the_file(src, tmp_path):
    with Store(str(tmp_path / "store"), create=True) as st:
        seal(st, src, "small")
        parts = st._index_parts("small")
        p = os.path.join(st.path, *parts)
        for bad in [b"{not json", b'{"version": 2}', b'{"version":1,"path":"other","digest":"sha256:00"}',
                    b'{"version":1,"path":"small","digest":"md5:00"}']:
            with open(p, "wb") as f:
                f.write(bad)
            with pytest.raises(StoreCorrupt, match=p):
                st.get_entry("small")


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
        assert st.get_entry("big") is None
        assert st.cleanup_tmp() == 1
        assert os.listdir(os.path.join(store, "tmp")) == []


def test_index_paths_are_normalized_and_checked(tmp_path):
    with Store(str(tmp_path / "s"), create=True) as st:
        st.set_entry("./a//b", merkle.SHA256, bytes(32))
        assert st.get_entry("a/b").path == "a/b"
        for bad in ["../x", "a/../../x", "", "/"]:
            with pytest.raises(ValueError):
                st.get_entry(bad)
        assert [e.path for e in st.entries()] == ["a/b"]
        assert st.remove_entry("a/b") and st.get_entry("a/b") is None
