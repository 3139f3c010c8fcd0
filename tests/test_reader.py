"""The reader without FUSE: its one block alignment (``VerifiedReader.span``: both read
paths, ``read_one`` on the request thread and ``read``/``read_steps`` elsewhere, widen a
request to the same whole blocks and return the same bytes) and ``attach_reader``, the one
way a reader is put on an open file (the sealed size checked first)."""

import os

import pytest

from verityfuse import merkle
from verityfuse.errors import SizeMismatch
from verityfuse.reader import VerifiedReader, attach_reader
from verityfuse.sealing import seal_path
from verityfuse.store import Store
from verityfuse.verifier import TreeBlockCache, Verifier
from conftest import write

B = 1024


def _sealed(tmp_path, data):
    path = write(tmp_path / "f", data)
    with Store(str(tmp_path / "store"), create=True) as st:
        e = seal_path(st, str(tmp_path), "f", merkle.Params(merkle.SHA256, B))
        return path, st.open_tree(e)


@pytest.fixture(params=[5 * B + 100, 6 * B], ids=["short-last-block", "whole-blocks"])
def reader(tmp_path, request):
    data = os.urandom(request.param)
    path, tree = _sealed(tmp_path, data)
    fd = os.open(path, os.O_RDONLY)
    try:
        yield VerifiedReader(fd, Verifier(tree, TreeBlockCache(), "f"), "f"), data
    finally:
        os.close(fd)
        tree.close()


@pytest.mark.parametrize("offset,size,want", [
    (0, 1, (0, 1, B)),
    (0, B, (0, B, B)),
    (1, B, (0, B + 1, 2 * B)),
    (B - 1, 2, (0, B + 1, 2 * B)),
    (3 * B, 2 * B, (3 * B, 5 * B, 5 * B)),
    (2 * B + 5, 0, (2 * B, 2 * B + 5, 3 * B)),
])
def test_span_inside_the_file(reader, offset, size, want):
    r, _ = reader
    assert r.span(offset, size) == want


def test_span_clipped_at_the_sealed_size(reader):
    r, data = reader
    n = len(data)
    last = n - (n - 1) % B - 1  # the first byte of the last block
    assert r.span(last, 10 * B) == (last, n, n)
    assert r.span(n - 1, 1) == (last, n, n)
    assert r.span(0, 100 * B) == (0, n, n)
    assert r.span(n + 3 * B, 5)[1:] == (n, n)  # past the end: nothing to return


def test_both_paths_return_the_same_bytes(reader):
    r, data = reader
    n = len(data)
    for offset in range(0, n + B, 257):
        for size in (1, 100, B, B + 1, 3 * B, 8 * B):
            want = data[offset:offset + size]
            assert bytes(r.read(offset, size)) == want, (offset, size)
            one = r.read_one(offset, size)
            # read_one answers every read that starts inside the file (the end-of-file
            # check of a read past the end is read's).
            assert (one is None) == (offset >= n), (offset, size)
            if one is not None:
                assert bytes(one) == want, (offset, size)


@pytest.mark.parametrize("new_size", [3 * B, 8 * B], ids=["truncated", "extended"])
def test_attach_reader_checks_the_sealed_size_first(tmp_path, new_size):
    data = os.urandom(5 * B + 100)
    path, tree = _sealed(tmp_path, data)
    os.truncate(path, new_size)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(SizeMismatch) as e:
            attach_reader(fd, tree, TreeBlockCache(), "f")
        assert str(e.value) == f"f: backing file is {new_size} bytes, sealed size {len(data)}"
        with pytest.raises(SizeMismatch) as e:  # how a manifest view words it
            attach_reader(fd, tree, TreeBlockCache(), "p", what="the share's file",
                          sealed="the manifest says")
        assert str(e.value) == f"p: the share's file is {new_size} bytes, the manifest says {len(data)}"
        # A whole-file check reads instead: the failure comes where the file ends.
        r = attach_reader(fd, tree, TreeBlockCache(), "f", check_size=False)
        assert bytes(r.read(0, 3 * B)) == data[:3 * B]
        with pytest.raises(SizeMismatch) as e:
            r.read(0, len(data) + 1)
        assert str(e.value) == (f"f: backing file was truncated to {new_size} bytes, sealed size {len(data)}"
                                if new_size < len(data) else
                                f"f: backing file was extended past its sealed size {len(data)}")
    finally:
        os.close(fd)
        tree.close()


def test_attach_reader_reads_what_was_sealed(tmp_path):
    data = os.urandom(5 * B + 100)
    path, tree = _sealed(tmp_path, data)
    fd = os.open(path, os.O_RDONLY)
    try:
        r = attach_reader(fd, tree, TreeBlockCache(), "f")
        assert (r.data_size, r.label, bytes(r.read(0, 10 * B))) == (len(data), "f", data)
    finally:
        os.close(fd)
        tree.close()
