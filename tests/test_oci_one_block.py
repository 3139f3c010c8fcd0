"""An ``oci://`` mount opens a small file without its tree object (one of one block; one
of up to 16 KiB whose tree is one block): its blocks are fetched at open, the tree made
from them must give a descriptor that hashes to the manifest's digest, and the reads
that follow are served from the cache.  What the registry can do to such a
file (damage its block, its tree object, or both) costs what it did before, never
integrity: a damaged block still reads EIO."""

import errno
import subprocess

import pytest

from verityfuse.oci_client import sha256_digest
from registry import registry  # noqa: F401  (the fixture)
from test_oci import VF, _through, oci_mount, proxy, pushed, status, tree, tree_object_blob  # noqa: F401


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_file_of_one_block_is_opened_and_read_with_one_request(pushed, proxy, oci_mount,  # noqa: F811
                                                                  tmp_path):
    m = _through(pushed, proxy, oci_mount)
    data_blob, tree_blob = sha256_digest(b"hello\n"), tree_object_blob(pushed, "small")
    before = len(proxy.requests)
    assert _read(m.mountpoint / "small") == b"hello\n"
    assert _read(m.mountpoint / "empty") == b""
    assert [(r.method, r.blob, r.range) for r in proxy.requests[before:]] == \
        [("GET", data_blob, (0, 5))]
    # Its measure and exported descriptor are fsverity-utils', without the object.
    desc = tmp_path / "desc"
    want = subprocess.run(["fsverity", "digest", pushed["src"] / "small", "--out-descriptor",
                           desc], capture_output=True, text=True, check=True).stdout.split()[0]
    got = subprocess.run(["fsverity", "measure", m.mountpoint / "small"],
                         capture_output=True, text=True)
    assert got.returncode == 0 and got.stdout.split()[0] == want, got.stderr
    dumped = subprocess.run([*VF, "dump-metadata", "descriptor", m.mountpoint / "small"],
                            capture_output=True)
    assert dumped.returncode == 0 and dumped.stdout == desc.read_bytes(), dumped.stderr
    assert proxy.count("GET", lambda r: r.blob == tree_blob) == 0
    st = status(m)
    assert st["integrity_failures"] == 0


def test_a_file_of_one_block_reads_without_its_tree_object(pushed, proxy, oci_mount):  # noqa: F811
    """Before, a tree object the registry would not serve made the open fail; its block
    alone vouches for the file now."""
    tree_blob = tree_object_blob(pushed, "small")
    proxy.rule = lambda r: "500" if r.blob == tree_blob else None
    m = _through(pushed, proxy, oci_mount)
    assert _read(m.mountpoint / "small") == b"hello\n"
    assert proxy.count("GET", lambda r: r.blob == tree_blob) == 0


@pytest.mark.parametrize("tree_too", [False, True])
def test_a_damaged_block_of_a_one_block_file_is_eio(pushed, proxy, oci_mount, tree_too):  # noqa: F811
    """The registry flips a byte of the block: the descriptor it gives does not match, so
    the tree object is fetched and the read fails its check (EIO, logged once); without
    the tree object too, the open fails (EIO)."""
    data_blob, tree_blob = sha256_digest(b"hello\n"), tree_object_blob(pushed, "small")

    def rule(r):
        if r.blob == data_blob:
            return "flip"
        return "500" if tree_too and r.blob == tree_blob else None
    proxy.rule = rule
    m = _through(pushed, proxy, oci_mount)
    with pytest.raises(OSError) as e:
        _read(m.mountpoint / "small")
    assert e.value.errno == errno.EIO
    assert _read(m.mountpoint / "sub/odd") == pushed["files"]["sub/odd"]  # others unharmed
    m.unmount()
    log = m.log()
    if tree_too:
        assert f"registry failure: small: tree object (blob {tree_blob})" in log, log
    else:
        assert log.count("integrity failure: small: data block at offset 0: expected hash") \
            == 1, log
    assert "hello" not in log


def test_a_block_the_registry_fails_to_send_fails_the_open(pushed, proxy, oci_mount):  # noqa: F811
    """The read right after would fail the same way: the open says so at once, without
    fetching the tree object (and a second round of retries at the read)."""
    data_blob, tree_blob = sha256_digest(b"hello\n"), tree_object_blob(pushed, "small")
    proxy.rule = lambda r: "500" if r.blob == data_blob else None
    m = _through(pushed, proxy, oci_mount)
    with pytest.raises(OSError) as e:
        open(m.mountpoint / "small", "rb")
    assert e.value.errno == errno.EIO
    assert proxy.count("GET", lambda r: r.blob == data_blob) == 4  # 1 + 3 retries
    assert proxy.count("GET", lambda r: r.blob == tree_blob) == 0
    m.unmount()
    assert m.log().count(f"registry failure: small: offset 0: bytes 0-5 of blob {data_blob}: "
                         f"{proxy.host} answered 500") == 1, m.log()


def test_concurrent_opens_of_a_one_block_file_fetch_its_block_once(pushed, proxy):  # noqa: F811
    import threading

    from verityfuse import oci_source
    from verityfuse.mountopts import Settings

    ref = "oci://" + proxy.host + "/" + pushed["ref"].split("/", 1)[1]
    remote = oci_source.remote_from_settings(ref, Settings(trust_key=[str(pushed["pub"])],
                                                           plain_http=True))
    try:
        node = next(n for n in remote.manifest.tree.files() if n.path == "small")
        gate, trees = threading.Barrier(8), []

        def opener():
            gate.wait()
            trees.append(remote.open_tree(node, "small"))
        threads = [threading.Thread(target=opener) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(trees) == 8 and all(t.descriptor.data_size == 6 for t in trees)
        assert proxy.count("GET", lambda r: r.blob == sha256_digest(b"hello\n")) == 1
        assert proxy.count("GET", lambda r: r.blob == tree_object_blob(pushed, "small")) == 0
    finally:
        remote.close()


def test_a_small_file_of_blocks_is_opened_and_read_with_one_request(pushed, proxy,  # noqa: F811
                                                                    oci_mount, tmp_path):
    """A file of two blocks (its tree: one block of their hashes) costs one request for
    all its bytes, none for its tree object; what it exports is fsverity-utils'."""
    data = pushed["files"]["sub/deep/exact"]
    data_blob, tree_blob = sha256_digest(data), tree_object_blob(pushed, "sub/deep/exact")
    m = _through(pushed, proxy, oci_mount)
    before = len(proxy.requests)
    assert _read(m.mountpoint / "sub/deep/exact") == data
    assert [(r.method, r.blob, r.range) for r in proxy.requests[before:]] == \
        [("GET", data_blob, (0, len(data) - 1))]
    tree_file = tmp_path / "tree"
    subprocess.run(["fsverity", "digest", pushed["src"] / "sub/deep/exact", "--out-merkle-tree",
                    tree_file], capture_output=True, check=True)
    dumped = subprocess.run([*VF, "dump-metadata", "merkle_tree", m.mountpoint / "sub/deep/exact"],
                            capture_output=True)
    assert dumped.returncode == 0 and dumped.stdout == tree_file.read_bytes(), dumped.stderr
    assert proxy.count("GET", lambda r: r.blob == tree_blob) == 0
    assert status(m)["integrity_failures"] == 0


def test_a_damaged_block_of_a_small_file_is_eio(pushed, proxy, oci_mount):  # noqa: F811
    """The registry flips a byte of the blocks: the tree they give does not match, so the
    tree object is fetched and the read fails its check (EIO)."""
    data = pushed["files"]["sub/deep/exact"]
    data_blob, tree_blob = sha256_digest(data), tree_object_blob(pushed, "sub/deep/exact")
    proxy.rule = lambda r: "flip" if r.blob == data_blob else None
    m = _through(pushed, proxy, oci_mount)
    with pytest.raises(OSError) as e:
        _read(m.mountpoint / "sub/deep/exact")
    assert e.value.errno == errno.EIO
    assert proxy.count("GET", lambda r: r.blob == tree_blob) == 1
    assert _read(m.mountpoint / "small") == b"hello\n"  # others unharmed


def test_an_open_waiting_for_one_block_of_a_small_file_still_needs_one_request(  # noqa: F811
        pushed, proxy):
    """Another reader fetches block 0 of a two-block file when it is opened: the open
    claims block 1, waits for block 0, then fetches only its bytes (one request, the tree
    made from them), instead of taking its own claim for another reader's and falling
    back to the tree object (review of s32: one more request, and block 1 fetched twice)."""
    import threading
    import time

    from verityfuse import oci_source
    from verityfuse.mountopts import Settings
    from verityfuse.small_trees import MemoryTree

    name = "sub/deep/exact"
    data = pushed["files"][name]
    ref = "oci://" + proxy.host + "/" + pushed["ref"].split("/", 1)[1]
    remote = oci_source.remote_from_settings(ref, Settings(trust_key=[str(pushed["pub"])],
                                                           plain_http=True))
    try:
        node = next(n for n in remote.manifest.tree.files() if n.path == name)
        fsv, cache = node.digest_text, remote.blocks
        with cache.cond:
            cache.inflight.add((fsv, 0))  # another reader's claim
        before = len(proxy.requests)
        opened = []
        t = threading.Thread(target=lambda: opened.append(remote.open_tree(node, name)))
        t.start()
        for _ in range(3000):  # until the open has claimed block 1: it then waits, unlocked
            with cache.cond:
                if (fsv, 1) in cache.inflight:
                    cache.put((fsv, 0), data[:4096], 0)  # the other reader is done
                    cache.inflight.discard((fsv, 0))
                    cache.cond.notify_all()
                    break
            time.sleep(0.01)
        else:
            pytest.fail("the open never claimed block 1")
        t.join(30)
        assert len(opened) == 1
        assert isinstance(getattr(opened[0], "_tree", opened[0]), MemoryTree), opened[0]
        opened[0].close()
        assert [(r.method, r.blob, r.range) for r in proxy.requests[before:]] == \
            [("GET", sha256_digest(data), (0, len(data) - 1))]
        assert not cache.inflight
    finally:
        remote.close()
