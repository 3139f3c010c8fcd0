"""``push`` refuses a manifest entry that disagrees with its own digest in the words of
``merkle.TreeId.check`` (the one rule, shared with the manifest view and ``verify``), before
anything is uploaded.  A real registry on 127.0.0.1 (tests/registry.py)."""

import os

import pytest

from verityfuse import manifest, manifest_tree, merkle
from verityfuse.oci_client import Client
from verityfuse.oci_ref import parse_ref
from verityfuse.oci_push import PushError, push
from verityfuse.sealing import seal_path
from verityfuse.store import Store
from conftest import pattern, write

from registry import registry  # noqa: F401  (the fixture)

PARAMS = merkle.Params(merkle.SHA256, 1024, b"ab")
SIZE = 5000


@pytest.mark.parametrize("change,said", [
    ({"size": SIZE + 1}, f"{SIZE + 1} bytes (sha256, block size 1024, salt 6162)"),
    ({"salt": ""}, f"{SIZE} bytes (sha256, block size 1024, salt (none))"),
])
def test_push_refuses_an_entry_that_disagrees_with_its_digest(tmp_path, registry, change,  # noqa: F811
                                                              said):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "f", pattern(SIZE))
    st = Store(str(src / ".verityfuse"), create=True)
    try:
        e = seal_path(st, str(src), "f", PARAMS)
    finally:
        st.close()
    entry = manifest_tree.entry_of("f", os.lstat(src / "f"), sealed=(e.alg, e.digest, PARAMS))
    entry.update(change)
    root = manifest_tree.entry_of(".", os.lstat(src))
    (tmp_path / "m.json").write_bytes(
        manifest.sign(manifest_tree.make_payload([root, entry]), None))
    client = Client(parse_ref(f"{registry.host}/vf/bad:v1"))
    try:
        with pytest.raises(PushError) as err:
            push(str(src), str(tmp_path / "m.json"), client, "v1")
    finally:
        client.close()
    assert str(err.value) == (f"f: its digest {e.digest_text} names a tree of {SIZE} bytes "
                              f"(sha256, block size 1024, salt 6162), not {said}")
    assert [p for p in registry.storage.rglob("*") if p.is_file()] == []  # nothing uploaded
