"""The verifier without FUSE: tree-block caching, bounded memory, blast radius."""

import os

import pytest

from verityfuse import merkle
from verityfuse.errors import IntegrityError, SizeMismatch, StoreCorrupt
from verityfuse.reader import ONE_CALL, VerifiedReader
from verityfuse.sealing import seal_path
from verityfuse.store import Store
from verityfuse.store_object import TREE_OFFSET
from verityfuse.verifier import TreeBlockCache, Verifier
from conftest import flip, write

B = 1024  # small blocks: three levels on a small file
PARAMS = merkle.Params(merkle.SHA256, B)


class CountingTree:
    """A StoredTree that counts the tree blocks read (and so hashed)."""

    def __init__(self, tree):
        self.tree, self.reads = tree, []
        self.descriptor, self.geometry, self.digest = tree.descriptor, tree.geometry, tree.digest

    def read_tree_block(self, index):
        self.reads.append(index)
        return self.tree.read_tree_block(index)

    def read_tree_blocks(self, first, count, need):
        start, data = self.tree.read_tree_blocks(first, count, need)
        self.reads.extend(range(start, start + len(data) // B))
        return start, data

    def mark_failed(self):
        self.tree.mark_failed()


@pytest.fixture
def sealed(tmp_path):
    data = os.urandom(B * 32 * 32 * 3 + 100)  # 3073 data blocks, 97 leaf + 4 + 1 tree blocks
    path = write(tmp_path / "f", data)
    with Store(str(tmp_path / "store"), create=True) as st:
        e = seal_path(st, str(tmp_path), "f", PARAMS)
        tree = st.open_tree(e)
    yield path, data, tree
    tree.close()


def test_sequential_read_hashes_each_tree_block_once(sealed):
    path, data, tree = sealed
    geo = tree.geometry
    assert geo.level_blocks == (97, 4, 1)
    counting = CountingTree(tree)
    v = Verifier(counting, TreeBlockCache(), "f")
    fd = os.open(path, os.O_RDONLY)
    try:
        r = VerifiedReader(fd, v, "f")
        out = b"".join(bytes(r.read(off, B)) for off in range(0, len(data), B))
    finally:
        os.close(fd)
    assert out == data
    assert sorted(counting.reads) == list(range(geo.tree_blocks))  # every tree block exactly once


def test_cache_stays_within_its_budget(sealed):
    path, data, tree = sealed
    cache = TreeBlockCache(max_bytes=4 * B)
    counting = CountingTree(tree)
    v = Verifier(counting, cache, "f")
    fd = os.open(path, os.O_RDONLY)
    try:
        r = VerifiedReader(fd, v, "f")
        for off in range(0, len(data), 7 * B):
            r.read(off, B)
            assert cache.bytes <= 4 * B
    finally:
        os.close(fd)


def test_verified_blocks_outlive_the_verifier_keyed_by_digest(sealed):
    """A new Verifier of the same tree (an inode forgotten and looked up again, or
    another file with the same content) reuses the verified blocks: no tree I/O."""
    path, data, tree = sealed
    cache = TreeBlockCache()
    fd = os.open(path, os.O_RDONLY)
    try:
        first = CountingTree(tree)
        VerifiedReader(fd, Verifier(first, cache, "f"), "f").read(0, len(data))
        second = CountingTree(tree)
        assert bytes(VerifiedReader(fd, Verifier(second, cache, "g"), "g").read(0, len(data))) == data
    finally:
        os.close(fd)
    assert first.reads and second.reads == []


def test_blast_radius_of_a_corrupt_data_block(sealed):
    path, data, tree = sealed
    with open(path, "r+b") as f:
        f.seek(500 * B + 3)
        f.write(b"\x00" if data[500 * B + 3] else b"\x01")
    v = Verifier(tree, TreeBlockCache(), "f")
    fd = os.open(path, os.O_RDONLY)
    try:
        r = VerifiedReader(fd, v, "f")
        with pytest.raises(IntegrityError) as e:
            r.read(499 * B, 3 * B)  # a read spanning it fails whole: never a short read
        assert e.value.offset == 500 * B
        assert bytes(r.read(499 * B, B)) == data[499 * B:500 * B]
        assert bytes(r.read(501 * B, B)) == data[501 * B:502 * B]
    finally:
        os.close(fd)


def _object(tmp_path):
    (obj,) = [p for p in (tmp_path / "store" / "objects").rglob("*") if p.is_file()]
    return obj


LEAF0 = 5  # the tree's position of leaf 0: the root block, then 4 level-1 blocks


def test_a_leaf_miss_verifies_its_group_in_one_read(sealed):
    """A leaf not verified yet is read with the rest of its aligned group (16 leaves
    under one parent) and each cached: the next reads under those leaves read no tree."""
    path, data, tree = sealed
    counting = CountingTree(tree)
    v = Verifier(counting, TreeBlockCache(), "f")
    fd = os.open(path, os.O_RDONLY)
    try:
        r = VerifiedReader(fd, v, "f")
        assert bytes(r.read(40 * B, B)) == data[40 * B:41 * B]  # leaf 1
        assert sorted(counting.reads) == [0, 1] + list(range(LEAF0, LEAF0 + 16))
        for leaf in range(16):  # every leaf of the group: no tree block read again
            off = leaf * 32 * B + 7
            assert bytes(r.read(off, 100)) == data[off:off + 100]
        assert len(counting.reads) == 18
        r.read(16 * 32 * B, B)  # leaf 16: the next group, under the same parent
        assert sorted(counting.reads)[18:] == list(range(LEAF0 + 16, LEAF0 + 32))
    finally:
        os.close(fd)


def test_a_bad_leaf_in_the_group_fails_only_the_reads_it_covers(sealed, tmp_path):
    path, data, tree = sealed
    flip(_object(tmp_path), TREE_OFFSET + (LEAF0 + 3) * B + 9)  # leaf 3, in leaf 1's group
    v = Verifier(tree, TreeBlockCache(), "f")
    fd = os.open(path, os.O_RDONLY)
    try:
        r = VerifiedReader(fd, v, "f")
        assert bytes(r.read(40 * B, B)) == data[40 * B:41 * B]  # leaf 1: good
        assert bytes(r.read(4 * 32 * B, B)) == data[4 * 32 * B:4 * 32 * B + B]  # leaf 4
        with pytest.raises(IntegrityError) as e:
            r.read(3 * 32 * B + 5 * B, B)  # a block under leaf 3
        assert e.value.offset == (LEAF0 + 3) * B
        assert "Merkle tree block (level 0, index 3) at tree offset" in str(e.value)
    finally:
        os.close(fd)


def test_a_group_cut_short_by_a_truncated_object_serves_what_it_holds(sealed, tmp_path):
    path, data, tree = sealed
    os.truncate(_object(tmp_path), TREE_OFFSET + (LEAF0 + 8) * B + 100)  # leaf 8 cut
    v = Verifier(tree, TreeBlockCache(), "f")
    fd = os.open(path, os.O_RDONLY)
    try:
        r = VerifiedReader(fd, v, "f")
        assert bytes(r.read(2 * 32 * B, B)) == data[2 * 32 * B:2 * 32 * B + B]  # leaf 2
        with pytest.raises(StoreCorrupt) as e:
            r.read(9 * 32 * B, B)  # leaf 9: past the end of the object
        assert f"tree block {LEAF0 + 9} is truncated (0 of {B} bytes)" in str(e.value)
        with pytest.raises(StoreCorrupt) as e:
            r.read(8 * 32 * B, B)  # leaf 8: 100 bytes of it
        assert f"tree block {LEAF0 + 8} is truncated (100 of {B} bytes)" in str(e.value)
    finally:
        os.close(fd)


def test_read_one_agrees_with_read_and_leaves_the_edges_to_it(sealed):
    """The short path answers reads of up to ONE_CALL bytes inside the file, the last block
    too, each byte verified; reads at the end and longer ones go the long way (None)."""
    path, data, tree = sealed
    fd = os.open(path, os.O_RDONLY)
    try:
        r = VerifiedReader(fd, Verifier(tree, TreeBlockCache(), "f"), "f")
        last = len(data) // B * B  # the partial last block starts here
        for off, size in [(0, 1), (0, B), (5, 3 * B), (31 * B + 7, 2 * B), (last - B, B),
                          (last - 10, 10), (100 * B, 256 * 1024), (100 * B, ONE_CALL),
                          (last, 10), (last - 1, 2), (len(data) - 1, 1), (last - B, 5 * B)]:
            assert bytes(r.read_one(off, size)) == data[off:off + size], (off, size)
        for off, size in [(len(data), 1), (len(data) + 5, 1), (0, ONE_CALL + 1), (0, 0)]:
            assert r.read_one(off, size) is None, (off, size)
        with open(path, "r+b") as f:  # a flipped byte fails the short path too
            f.seek(700 * B)
            f.write(b"\x00" if data[700 * B] else b"\x01")
        with pytest.raises(IntegrityError) as e:
            r.read_one(699 * B + 1, 2 * B)
        assert e.value.offset == 700 * B
        with open(path, "ab") as f:  # extended: a read of the last block says so
            f.write(b"!")
        with pytest.raises(SizeMismatch, match="extended past its sealed size"):
            r.read_one(last, 10)
        assert bytes(r.read_one(0, B)) == data[:B]  # the body still reads
        os.truncate(path, 1000 * B)  # short: left to read_steps, which names the truncation
        assert r.read_one(1000 * B - 1, 2) is None
    finally:
        os.close(fd)
