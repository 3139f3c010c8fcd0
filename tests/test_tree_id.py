"""merkle.TreeId, the one record of which tree a file has, without FUSE: what a descriptor
and a manifest entry give agree, and a record that disagrees with its own digest is refused
by the manifest view and by ``verify --manifest`` with the same words."""

import os

import pytest

from verityfuse import manifest_tree, merkle
from verityfuse.errors import Corruption
from verityfuse.manifest_check import check_node
from verityfuse.sealing import seal_path
from verityfuse.store import Store
from verityfuse.verifier import TreeBlockCache
from verityfuse.view_manifest import ManifestView
from conftest import pattern, write

PARAMS = merkle.Params(merkle.SHA256, 1024, b"ab")
SIZE = 5000


@pytest.fixture
def sealed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "f", pattern(SIZE))
    st = Store(str(tmp_path / "store"), create=True)
    try:
        e = seal_path(st, str(src), "f", PARAMS)
        yield src, st, e
    finally:
        st.close()


def _tree(src, e, **change):
    entry = manifest_tree.entry_of("f", os.lstat(src / "f"), sealed=(e.alg, e.digest, PARAMS))
    entry.update(change)
    root = manifest_tree.entry_of(".", os.lstat(src))
    return manifest_tree.parse_payload(manifest_tree.make_payload([root, entry]))


def test_a_descriptor_and_a_manifest_entry_give_the_same_record(sealed):
    src, st, e = sealed
    node = _tree(src, e).node(2)
    with st.open_tree(e) as obj:
        assert obj.tree_id == node.tree == merkle.TreeId(PARAMS, SIZE, e.digest)
        assert obj.descriptor.digest == e.digest  # the record's digest is its descriptor's
    assert node.tree.text == node.digest_text == e.digest_text
    assert (node.tree.alg, node.alg, node.size) == (merkle.SHA256, merkle.SHA256, SIZE)
    assert hash(node.tree) == hash(merkle.TreeId(PARAMS, SIZE, e.digest))


@pytest.mark.parametrize("change,said", [
    ({"size": SIZE + 1}, f"{SIZE + 1} bytes (sha256, block size 1024, salt 6162)"),
    ({"block_size": 4096}, f"{SIZE} bytes (sha256, block size 4096, salt 6162)"),
    ({"salt": ""}, f"{SIZE} bytes (sha256, block size 1024, salt (none))"),
])
def test_a_record_that_disagrees_with_its_digest_is_refused(sealed, change, said):
    src, st, e = sealed
    tree = _tree(src, e, **change)
    want = (f"f: its digest {e.digest_text} names a tree of {SIZE} bytes (sha256, block size "
            f"1024, salt 6162), not {said}")
    view = ManifestView(str(src), tree, st, TreeBlockCache(), "sha256:00")
    try:
        with pytest.raises(Corruption) as err:
            view.open_tree(tree.node(2))
        assert str(err.value) == want
    finally:
        view.close()
    root_fd = os.open(src, os.O_PATH | os.O_DIRECTORY)
    try:
        res = check_node(root_fd, tree.node(2), st, TreeBlockCache())
    finally:
        os.close(root_fd)
    assert (res.status, isinstance(res.error, Corruption)) == ("corrupt", True)
    assert res.message.startswith(want)
