"""The reader's one block alignment (``VerifiedReader.span``), without FUSE: both read paths
(``read_one`` on the request thread, ``read``/``read_steps`` elsewhere) widen a request to
the same whole blocks and return the same bytes."""

import os

import pytest

from verityfuse import merkle
from verityfuse.reader import VerifiedReader
from verityfuse.sealing import seal_path
from verityfuse.store import Store
from verityfuse.verifier import TreeBlockCache, Verifier
from conftest import write

B = 1024


@pytest.fixture(params=[5 * B + 100, 6 * B], ids=["short-last-block", "whole-blocks"])
def reader(tmp_path, request):
    data = os.urandom(request.param)
    path = write(tmp_path / "f", data)
    with Store(str(tmp_path / "store"), create=True) as st:
        e = seal_path(st, str(tmp_path), "f", merkle.Params(merkle.SHA256, B))
        tree = st.open_object(e.alg, e.digest)
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
            # read_one answers only reads that end before the last block.
            assert (one is None) == (r.span(offset, size)[2] == n), (offset, size)
            if one is not None:
                assert bytes(one) == want, (offset, size)
