"""Trees served lazily from an OCI registry (issue 20; protocol/oci-artifact.md).

A real registry (Debian's docker-registry, tests/registry.py) on 127.0.0.1:
push, mount oci://, read.  Bytes fetched are read from the mount's status
(the client's own count) and from the registry side where it matters; the
registry's filesystem storage is altered directly to play a hostile registry.
"""

import errno
import json
import mmap
import os
import re
import subprocess
import sys
import time

import pytest

from verityfuse import manifest as mf
from verityfuse.testing import VerifiedMount, fuse_unavailable_reason

from registry import registry  # noqa: F401  (the fixture)

VF = [sys.executable, "-m", "verityfuse.cli"]
BIG = 8 << 20


def vf(*args, timeout=120):
    return subprocess.run([*VF, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def content(n: int, seed: int) -> bytes:
    """Distinct, incompressible-enough bytes (every 4 KiB block differs)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += (f"{seed}:{i}:" * 400).encode()[:4096]
        i += 1
    return bytes(out[:n])


@pytest.fixture
def tree(tmp_path):
    """A sealed, signed tree: {relpath: bytes}, and the paths of the manifest and keys."""
    src = tmp_path / "src"
    (src / "sub" / "deep").mkdir(parents=True)
    files = {"small": b"hello\n", "empty": b"", "big": content(BIG, 1),
             "sub/odd": content(5 * 4096 + 17, 2), "sub/deep/copy": content(BIG, 1),
             "sub/deep/exact": content(2 * 4096, 3)}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    os.symlink("small", src / "link")
    mf.generate_key(str(tmp_path / "key.pem"), str(tmp_path / "pub.pem"))
    r = vf("seal", src, "--manifest", tmp_path / "m.json", "--sign-key", tmp_path / "key.pem")
    assert r.returncode == 0, r.stderr
    payload = mf.authenticate(str(tmp_path / "m.json"),
                              [mf.load_public_key(str(tmp_path / "pub.pem"))])
    return dict(src=src, files=files, manifest=tmp_path / "m.json", pub=tmp_path / "pub.pem",
                digest=mf.manifest_digest(payload))


def push(tree, ref):
    r = vf("push", tree["src"], ref, "--manifest", tree["manifest"], "--plain-http")
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture
def pushed(tree, registry):  # noqa: F811
    ref = f"{registry.host}/vf/tree:v1"
    tree["push_output"] = push(tree, ref)
    tree["ref"] = ref
    return tree


@pytest.fixture
def oci_mount(tmp_path):
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(reason)
    mounts = []

    def mount(ref, *args):
        mnt = tmp_path / f"mnt{len(mounts)}"
        mnt.mkdir()
        m = VerifiedMount(f"oci://{ref}", mnt, extra_args=["--plain-http", *map(str, args)])
        mounts.append(m)
        return m
    try:
        yield mount
    finally:
        for m in mounts:
            m.unmount()


def status(m) -> dict:
    return json.loads(os.getxattr(m.mountpoint, "user.verityfuse.status"))


def fetched(m) -> int:
    return status(m)["registry"]["bytes_fetched"]


def pread_block(path, offset, size=4096):
    """One read that reaches the daemon as exactly this range (no readahead)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


# -- push --------------------------------------------------------------------------------

def test_push_uploads_each_blob_once(pushed):
    out = pushed["push_output"]
    # 5 distinct digests (big and its copy share one): 5 tree objects, 4 data blobs (the
    # empty file has none), the signed manifest.
    assert "10 blobs uploaded" in out, out
    assert f"manifest digest {pushed['digest']}\n" in out
    again = push(pushed, pushed["ref"])
    assert "0 blobs uploaded (0 bytes), 10 already present" in again, again
    # The same artifact: one tree has one OCI manifest.
    assert out.splitlines()[0] == again.splitlines()[0]


def test_push_refuses_a_file_changed_after_sealing(tree, registry):  # noqa: F811
    data = bytearray(tree["files"]["sub/odd"])
    data[5000] ^= 1
    (tree["src"] / "sub/odd").write_bytes(bytes(data))
    r = vf("push", tree["src"], f"{registry.host}/vf/bad:v1", "--manifest", tree["manifest"],
           "--plain-http")
    assert r.returncode == 1
    assert "ERROR: sub/odd: data block at offset 4096: expected hash" in r.stderr, r.stderr


def test_push_reads_on_where_the_source_reads_short(tmp_path, registry):  # noqa: F811
    """A source that answers each read with at most 1000 bytes (a FUSE or network file
    system may): push reads on until a piece is whole.  Before, a short piece was taken
    for the file's end, zero-padded and failed its check ("data block at offset 0")."""
    from conftest import fuse_helper, pattern, write

    plain, share = tmp_path / "plain", tmp_path / "share"
    plain.mkdir()
    share.mkdir()
    sizes = {"one": 3000, "big": 70000}
    for name, size in sizes.items():
        write(plain / name, pattern(size))
    mf.generate_key(str(tmp_path / "key.pem"), str(tmp_path / "pub.pem"))
    r = vf("seal", plain, "--manifest", tmp_path / "m.json", "--sign-key", tmp_path / "key.pem")
    assert r.returncode == 0, r.stderr
    with fuse_helper("short_read_fs.py", share,
                     *(f"{n}={s}:{s}:chunk:1000" for n, s in sizes.items()),
                     what="the short-reading source"):
        r = vf("push", share, f"{registry.host}/vf/short:v1", "--manifest", tmp_path / "m.json",
               "--store", plain / ".verityfuse", "--plain-http")
    assert r.returncode == 0, r.stderr
    assert "5 blobs uploaded" in r.stdout, r.stdout  # two trees, two files' bytes, the manifest


def test_push_refuses_a_file_of_one_block_changed_after_sealing(tree, registry, tmp_path):  # noqa: F811
    """A file of one block has no object in the store: push makes its object from its
    bytes, which must give the manifest's digest; a changed one is named, with the
    digest its bytes give (fsverity-utils') and the manifest's, or its size."""
    from conftest import fsverity_digest
    oracle = tmp_path / "oracle"
    oracle.mkdir()
    (oracle / "f").write_bytes(b"hello\n")
    sealed = fsverity_digest(oracle / "f")[0].split()[0]
    (oracle / "f").write_bytes(b"jello\n")
    now = fsverity_digest(oracle / "f")[0].split()[0]
    ref = f"{registry.host}/vf/bad:v1"
    for data, why in ((b"jello\n", f"gives {now}, the manifest says {sealed}"),
                      (b"hello!\n", "is more than 6 bytes, the manifest says 6"),
                      (b"hell", "is 4 bytes, the manifest says 6")):
        (tree["src"] / "small").write_bytes(data)
        r = vf("push", tree["src"], ref, "--manifest", tree["manifest"], "--plain-http")
        assert (r.returncode, r.stderr) == (1, f"ERROR: small: the file {why}\n"), r.stderr


# -- mount ------------------------------------------------------------------------------

def test_mount_serves_every_file_byte_exact(pushed, oci_mount):
    m = oci_mount(pushed["ref"], "--trust-key", pushed["pub"])
    root = m.mountpoint
    assert sorted(os.listdir(root)) == ["big", "empty", "link", "small", "sub"]
    assert os.readlink(root / "link") == "small"
    for rel, data in pushed["files"].items():
        assert (root / rel).read_bytes() == data, rel
        assert os.stat(root / rel).st_size == len(data)
    st = status(m)
    assert st["mode"] == "manifest" and st["manifest_digest"] == pushed["digest"]
    assert st["integrity_failures"] == 0


def test_mount_by_digest_with_pinned_manifest(pushed, oci_mount):
    oci = pushed["push_output"].splitlines()[0].rsplit("@", 1)[1]
    ref = pushed["ref"].rsplit(":", 1)[0] + "@" + oci
    m = oci_mount(ref, "--manifest-digest", pushed["digest"])
    assert (m.mountpoint / "sub/odd").read_bytes() == pushed["files"]["sub/odd"]


def test_nothing_is_fetched_until_read_and_a_block_read_fetches_a_block(pushed, oci_mount):
    m = oci_mount(pushed["ref"], "--trust-key", pushed["pub"])
    at_mount = fetched(m)
    manifest_size = os.path.getsize(pushed["manifest"])
    # The OCI manifest and the signed manifest only.
    assert at_mount > manifest_size and at_mount < manifest_size + 4096
    os.listdir(m.mountpoint / "sub")
    os.stat(m.mountpoint / "big")
    assert fetched(m) == at_mount
    fd = os.open(m.mountpoint / "big", os.O_RDONLY)
    try:
        # 8 MiB of 4 KiB blocks: 2048 hashes of 32 bytes = 16 tree blocks, one root block.
        tree_object = 64 + 256 + 17 * 4096
        assert fetched(m) == at_mount + tree_object
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        assert os.pread(fd, 4096, 5 << 20) == pushed["files"]["big"][5 << 20:(5 << 20) + 4096]
    finally:
        os.close(fd)
    assert fetched(m) == at_mount + tree_object + 4096
    # Its copy has the same digest: the tree object and the block come from the caches.
    assert pread_block(m.mountpoint / "sub/deep/copy", 5 << 20) == \
        pushed["files"]["big"][5 << 20:(5 << 20) + 4096]
    assert fetched(m) == at_mount + tree_object + 4096
    r = vf("status", m.mountpoint)
    assert r.returncode == 0
    assert f"oci://{pushed['ref']}: {at_mount + tree_object + 4096} bytes fetched (4 GET)" \
        in r.stdout, r.stdout


def test_the_data_cache_is_bounded(pushed, oci_mount):
    m = oci_mount(pushed["ref"], "--trust-key", pushed["pub"], "--cache-size", 4)
    assert (m.mountpoint / "big").read_bytes() == pushed["files"]["big"]
    cache = status(m)["registry"]["data_cache"]
    assert cache["max_bytes"] == 4 << 20
    assert 0 < cache["bytes"] <= 4 << 20


def test_concurrent_reads_of_a_block_fetch_it_once(pushed, proxy):
    """Many threads read the same range through one reader: one range request."""
    import threading
    from verityfuse import oci_reader, oci_source
    from verityfuse.mountopts import Settings
    from verityfuse.verifier import TreeBlockCache, Verifier
    from verityfuse.oci_client import sha256_digest

    ref = "oci://" + proxy.host + "/" + pushed["ref"].split("/", 1)[1]
    remote = oci_source.remote_from_settings(ref, Settings(trust_key=[str(pushed["pub"])],
                                                           plain_http=True))
    try:
        node = next(n for n in remote.manifest.tree.files() if n.path == "big")
        tree = remote.open_tree(node, "big")
        reader = oci_reader.OciReader(remote, node, Verifier(tree, TreeBlockCache(), "big"),
                                      "big")
        gate = threading.Barrier(8)
        out = []

        def read():
            gate.wait()
            out.append(bytes(reader.read(1 << 20, 256 << 10)))
        threads = [threading.Thread(target=read) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        big = pushed["files"]["big"]
        assert out == [big[1 << 20:(1 << 20) + (256 << 10)]] * 8
        blob = sha256_digest(big)
        assert proxy.count("GET", lambda r: r.blob == blob) == 1
        tree.close()
    finally:
        remote.close()


def test_readers_waiting_on_a_failed_fetch_fail_with_it(pushed, proxy):
    """Readers of a block another reader fetches wait for it; when that fetch failed,
    each claimed the block and fetched it again, one after another, each waiting out a
    timeout of its own (20 readers of a stalled block: minutes; found by review, s44).
    They now fail with the fetch they waited on: one request, one timeout; and a stall
    makes the block's reads fail at once for the registry timeout after it."""
    import threading
    import time
    from verityfuse import oci_reader, oci_source
    from verityfuse.errors import VerityError
    from verityfuse.mountopts import Settings
    from verityfuse.verifier import TreeBlockCache, Verifier

    ref = "oci://" + proxy.host + "/" + pushed["ref"].split("/", 1)[1]
    remote = oci_source.remote_from_settings(ref, Settings(
        trust_key=[str(pushed["pub"])], plain_http=True, registry_timeout=1))
    blob = _big_blob(pushed)
    proxy.rule = lambda r: "stall" if r.blob == blob and r.range and r.range[0] == BAD else None
    try:
        node = next(n for n in remote.manifest.tree.files() if n.path == "big")
        tree = remote.open_tree(node, "big")
        reader = oci_reader.OciReader(remote, node, Verifier(tree, TreeBlockCache(), "big"),
                                      "big")
        gets = lambda: proxy.count("GET", lambda r: r.blob == blob and r.range[0] == BAD)  # noqa: E731
        gate = threading.Barrier(6)
        out = []

        def read():
            gate.wait()
            try:
                reader.read(BAD, 4096)
                out.append("read")
            except VerityError as e:
                out.append(type(e).__name__)
        threads = [threading.Thread(target=read) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert out == ["TooSlow"] * 6
        six = gets()
        # A stall cools for the registry timeout: readers that come one after another (as
        # the kernel sends the readers of one page) fail at once, with no request, ...
        with pytest.raises(VerityError, match=r"^bytes 12288-16383 of blob .*: (Read timed "
                                              r"out\. \(read timeout=1\)|the answer took)"):
            reader.read(BAD, 4096)
        assert gets() == six
        time.sleep(1.5)  # ... and after it the block is asked for again
        with pytest.raises(VerityError):
            reader.read(BAD, 4096)
        assert gets() == 2 * six  # a lone reader's fetch: what the six together cost
        tree.close()
    finally:
        remote.close()


def test_altered_registry_blob_fails_only_its_blocks(pushed, registry, oci_mount):  # noqa: F811
    big = pushed["files"]["big"]
    from verityfuse.oci_client import sha256_digest
    blob = registry.blob_path(sha256_digest(big))
    with open(blob, "r+b") as f:
        f.seek(3 * 4096 + 100)
        f.write(b"X")
    m = oci_mount(pushed["ref"], "--trust-key", pushed["pub"])
    path = m.mountpoint / "big"
    with pytest.raises(OSError) as e:
        pread_block(path, 3 * 4096)
    assert e.value.errno == errno.EIO
    for block in (0, 2, 4, 1000, 2047):
        assert pread_block(path, block * 4096) == big[block * 4096:(block + 1) * 4096]
    # A large read that spans the bad block stops short before it (the kernel returns
    # what it read before the failed page); one that starts there fails.
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 1 << 20, 0) == big[:3 * 4096]
        with pytest.raises(OSError) as e:
            os.pread(fd, 1 << 20, 3 * 4096)
        assert e.value.errno == errno.EIO
        assert os.pread(fd, 1 << 20, 4 * 4096) == big[4 * 4096:4 * 4096 + (1 << 20)]
    finally:
        os.close(fd)
    m.unmount()
    log = m.log()
    assert log.count("big: data block at offset 12288: expected hash") == 1, log


@pytest.mark.parametrize("how", ["digest", "key", "rollback"])
def test_wrong_trust_refused(pushed, tmp_path, how):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if how == "rollback":  # a manifest older than the guest's minimum sequence
        trust = ["--trust-key", pushed["pub"], "--min-sequence", 1000]
        why = "is older than the minimum 1000: a rollback?"
    elif how == "digest":
        trust = ["--manifest-digest", "sha256:" + "00" * 32]
        why = f"manifest digest {pushed['digest']} is not the pinned sha256:{'00' * 32}"
    else:
        mf.generate_key(str(tmp_path / "other.pem"), str(tmp_path / "other.pub"))
        trust = ["--trust-key", tmp_path / "other.pub"]
        why = "not signed by a trusted key"
    r = vf("mount", "-f", f"oci://{pushed['ref']}", mnt, "--plain-http", *trust, timeout=60)
    assert r.returncode == 1
    assert "refusing to mount" in r.stderr and why in r.stderr, r.stderr
    assert f"{pushed['ref']} (manifest blob sha256:" in r.stderr
    assert not os.path.ismount(mnt)


def test_no_trust_refused(pushed, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = vf("mount", "-f", f"oci://{pushed['ref']}", mnt, "--plain-http", timeout=60)
    assert r.returncode == 1
    assert "a registry is never trusted: give --trust-key and/or --manifest-digest" in r.stderr


# -- a hostile or failing registry (tests/hostile_proxy.py) -------------------------------

@pytest.fixture
def proxy(registry):  # noqa: F811
    from hostile_proxy import HostileProxy
    p = HostileProxy(registry.host)
    try:
        yield p
    finally:
        p.stop()


BAD = 3 * 4096  # the block the proxy damages


def tree_object_blob(pushed, path: str) -> str:
    """The blob digest of ``path``'s tree object: the store format's header, then
    fsverity-utils' descriptor and tree of its bytes, hashed (what a store object holds;
    a file of one block has none in the store, and push makes the same bytes)."""
    from conftest import fsverity_digest
    from verityfuse.oci_client import sha256_digest
    from verityfuse.store_object import HEADER_SIZE, OBJECT_HEADER, OBJECT_MAGIC
    oracle = pushed["src"].parent / "oracle"
    oracle.mkdir(exist_ok=True)
    (oracle / "f").write_bytes(pushed["files"][path])
    _, tree, desc = fsverity_digest(oracle / "f")
    return sha256_digest(OBJECT_HEADER.pack(OBJECT_MAGIC, HEADER_SIZE, 0, len(tree), b"")
                         + desc + tree)


def _big_blob(pushed):
    from verityfuse.oci_client import sha256_digest
    return sha256_digest(pushed["files"]["big"])


def _through(pushed, proxy, oci_mount, *args, timeout=10):
    """A mount of the pushed image through the proxy.  ``timeout``: the registry timeout,
    short only for a test of a stall (a loaded machine's slow answer, past a short
    timeout, is a retry, and a test counting requests would count one more)."""
    ref = proxy.host + "/" + pushed["ref"].split("/", 1)[1]
    return oci_mount(ref, "--trust-key", pushed["pub"], "--registry-timeout", timeout, *args)


@pytest.mark.parametrize("fault,logged", [
    ("flip", "integrity failure: big: data block at offset 12288: expected hash"),
    ("other", "integrity failure: big: data block at offset 12288: expected hash"),
    ("short", "registry failure: big: offset 12288: bytes 12288-16383 of blob {blob}: the body "
              "is 4095 bytes, 4096 were asked for"),
    ("truncated", "registry failure: big: offset 12288: bytes 12288-16383 of blob {blob}: "),
    ("long", "registry failure: big: offset 12288: bytes 12288-16383 of blob {blob}: the body "
             "is longer than the 4096 bytes asked for"),
    ("range", "registry failure: big: offset 12288: bytes 12288-16383 of blob {blob}: asked for "
              "bytes 12288-16383, the registry answered Content-Range 'bytes 16384-20479/*'"),
    ("500", "registry failure: big: offset 12288: bytes 12288-16383 of blob {blob}: "
            "127.0.0.1:"),
    ("loop", "registry failure: big: offset 12288: bytes 12288-16383 of blob {blob}: "),
    ("stall", "registry failure: big: offset 12288: bytes 12288-16383 of blob {blob}: "),
])
def test_hostile_registry_costs_the_damaged_block_only(pushed, proxy, oci_mount, fault, logged):
    big, blob = pushed["files"]["big"], _big_blob(pushed)
    if fault == "other":  # the same range of another blob: big's tree object (70 KiB)
        proxy.other_blob = tree_object_blob(pushed, "big")
    proxy.rule = lambda r: fault if r.blob == blob and r.range and r.range[0] == BAD else None
    m = _through(pushed, proxy, oci_mount, timeout=1 if fault == "stall" else 10)
    path = m.mountpoint / "big"
    with pytest.raises(OSError) as e:
        pread_block(path, BAD)
    assert e.value.errno == errno.EIO
    for block in (0, 2, 4, 2047):
        assert pread_block(path, block * 4096) == big[block * 4096:(block + 1) * 4096]
    assert (m.mountpoint / "sub/odd").read_bytes() == pushed["files"]["sub/odd"]
    with pytest.raises(OSError):
        pread_block(path, BAD)  # still failing: a failure is not cached as success
    m.unmount()
    line = logged.format(blob=blob)
    assert m.log().count(line) == 1, m.log()


def test_a_registrys_damage_is_not_blamed_on_the_disk_cache(pushed, proxy, oci_mount, tmp_path):
    """With --cache DIR, a block the registry damaged was taken for one the cache's disk
    had changed: logged as such, which sends an operator to the wrong storage, and
    fetched once more.  Only blocks read back from the disk are retried so."""
    big, blob = pushed["files"]["big"], _big_blob(pushed)
    proxy.rule = lambda r: "flip" if r.blob == blob and r.range and r.range[0] == BAD else None
    cache = tmp_path / "cache"
    cache.mkdir()
    m = _through(pushed, proxy, oci_mount, "--cache", cache)
    from conftest import drop_caches

    def pread_exactly(offset, size):  # no readahead: the daemon is asked for these bytes
        fd = os.open(m.mountpoint / "big", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)
    assert pread_exactly(BAD - 4096, 4096) == big[BAD - 4096:BAD]  # now in the disk cache
    for _ in range(2):
        drop_caches()
        # One read: a block from the disk, a damaged one; what the kernel makes of its
        # EIO is the good block alone (it reads again page by page).
        assert pread_exactly(BAD - 4096, 8192) == big[BAD - 4096:BAD]
    m.unmount()
    assert "no longer verify" not in m.log(), m.log()
    assert m.log().count("integrity failure: big: data block at offset 12288") == 1, m.log()


def test_transient_500s_are_retried(pushed, proxy, oci_mount):
    big, blob = pushed["files"]["big"], _big_blob(pushed)
    left = [2]

    def rule(r):
        if r.blob == blob and r.range and r.range[0] == BAD and left[0]:
            left[0] -= 1
            return "500"
        return None
    proxy.rule = rule
    m = _through(pushed, proxy, oci_mount)
    assert pread_block(m.mountpoint / "big", BAD) == big[BAD:BAD + 4096]
    assert proxy.count("GET", lambda r: r.blob == blob and r.range == (BAD, BAD + 4095)) == 3


def test_a_broken_body_is_fetched_again(pushed, proxy, oci_mount):
    big, blob = pushed["files"]["big"], _big_blob(pushed)
    left = [1]

    def rule(r):
        if r.blob == blob and r.range and r.range[0] == BAD and left[0]:
            left[0] -= 1
            return "truncated"
        return None
    proxy.rule = rule
    m = _through(pushed, proxy, oci_mount)
    assert pread_block(m.mountpoint / "big", BAD) == big[BAD:BAD + 4096]
    assert proxy.count("GET", lambda r: r.blob == blob and r.range == (BAD, BAD + 4095)) == 2


def test_redirects_are_followed(pushed, proxy, oci_mount):
    big, blob = pushed["files"]["big"], _big_blob(pushed)
    proxy.rule = lambda r: "redirect" if r.blob == blob else None
    m = _through(pushed, proxy, oci_mount)
    assert pread_block(m.mountpoint / "big", BAD) == big[BAD:BAD + 4096]
    assert (m.mountpoint / "big").read_bytes() == big


def test_a_stall_does_not_hang_other_files(pushed, proxy, oci_mount):
    import threading
    big, blob = pushed["files"]["big"], _big_blob(pushed)
    stalled = threading.Event()

    def rule(r):
        if r.blob == blob and r.range and r.range[0] == BAD:
            stalled.set()
            return "stall"
        return None
    proxy.rule = rule
    m = _through(pushed, proxy, oci_mount, timeout=1)
    result = {}

    def read_bad():
        try:
            pread_block(m.mountpoint / "big", BAD)
            result["bad"] = "read"
        except OSError as e:
            result["bad"] = e.errno
    t = threading.Thread(target=read_bad)
    t.start()
    try:
        assert stalled.wait(30)
        # While that read waits on the registry, other files and metadata are served.
        assert (m.mountpoint / "sub/odd").read_bytes() == pushed["files"]["sub/odd"]
        assert pread_block(m.mountpoint / "big", 0) == big[:4096]
        assert sorted(os.listdir(m.mountpoint / "sub")) == ["deep", "odd"]
        assert "bad" not in result
    finally:
        t.join(60)
    assert result["bad"] == errno.EIO


def test_a_stalled_tree_fetch_for_metadata_does_not_hang_the_mount(pushed, proxy, oci_mount):
    """getxattr of an unopened file's fs-verity descriptor fetches its tree object: while
    the registry stalls on it, other files and metadata are still served."""
    import threading
    from verityfuse.oci_client import sha256_digest
    big = pushed["files"]["big"]
    m = _through(pushed, proxy, oci_mount, timeout=1)
    assert pread_block(m.mountpoint / "big", 0) == big[:4096]  # big's tree is fetched now
    data = {sha256_digest(b) for b in pushed["files"].values()}
    stalled = threading.Event()

    def rule(r):
        if r.blob and r.blob not in data:  # a tree object
            stalled.set()
            return "stall"
        return None
    proxy.rule = rule
    result = {}

    def descriptor():
        try:
            os.getxattr(m.mountpoint / "sub/odd", "user.fsverity.descriptor")
            result["odd"] = "read"
        except OSError as e:
            result["odd"] = e.errno
    t = threading.Thread(target=descriptor)
    t.start()
    try:
        assert stalled.wait(30)
        assert pread_block(m.mountpoint / "big", BAD) == big[BAD:BAD + 4096]
        assert sorted(os.listdir(m.mountpoint / "sub")) == ["deep", "odd"]
        assert "odd" not in result
    finally:
        t.join(60)
    assert result["odd"] == errno.EIO


def _blocked_in_read(tid: int) -> bool:
    """Whether thread ``tid`` of this process sleeps in pread64 (syscall 17 on x86-64;
    /proc shows the call and its state): a read of the mount waiting on the daemon."""
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            call = f.read().split()[0]
        with open(f"/proc/self/task/{tid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return call == "17" and state in ("S", "D")  # FUSE waits interruptibly, then killably


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="reads syscall numbers of x86-64")
def test_stalled_reads_of_one_file_leave_the_mount_to_the_others(pushed, proxy, oci_mount):
    """More stalled reads of one file than one blob may have worker threads (8 of 32),
    and than the kernel's default of reads in flight (12): a few wait in threads, the
    rest without one, so another file, and what is cached of this one, is read at once,
    while every stalled read still waits (found by review, s44: a healthy file waited for the stalled reads'
    deadlines).  When the stalled fetches fail, the reads queued for a thread fail with
    them, each without a request and a deadline of its own."""
    import threading
    from verityfuse.ops_read import PER_BLOB_THREADS
    big, blob = pushed["files"]["big"], _big_blob(pushed)
    proxy.rule = lambda r: "stall" if r.blob == blob and r.range and r.range[0] else None
    m = _through(pushed, proxy, oci_mount, timeout=2)
    assert pread_block(m.mountpoint / "big", 0) == big[:4096]  # cached in the daemon
    offsets = [k << 18 for k in range(1, 32)]  # 31 blocks 256 KiB apart: 31 requests
    done, tids = {}, []

    def read(off):
        tids.append(threading.get_native_id())
        try:
            done[off] = pread_block(m.mountpoint / "big", off) == big[off:off + 4096]
        except OSError as e:
            done[off] = e.errno
    readers = [threading.Thread(target=read, args=(off,)) for off in offsets]
    for t in readers:
        t.start()
    try:
        # Every reader waits in its read (so the daemon has its request) before the
        # other file is read: its request comes after all of theirs.
        for _ in range(3000):
            if len(tids) == len(offsets) and all(map(_blocked_in_read, tids)):
                break
            time.sleep(0.01)
        else:
            pytest.fail("the readers never all waited in a read")
        assert (m.mountpoint / "sub/odd").read_bytes() == pushed["files"]["sub/odd"]
        # What the daemon has of the stalled file is served too (O_DIRECT: from the daemon).
        fd = os.open(m.mountpoint / "big", os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096)
            assert os.preadv(fd, [buf], 0) == 4096 and buf[:] == big[:4096]
        finally:
            os.close(fd)
        assert done == {}  # no stalled read was answered before these
        for t in readers:
            t.join(120)
        assert done == {off: errno.EIO for off in offsets}
        # Only the reads in threads asked (each as often as the client retries a stall):
        # the first ones, then as many of the retries the kernel makes of a failed read
        # (one, synchronous); all 31 asked before.
        asked = {r.range for r in list(proxy.requests) if r.blob == blob and r.range
                 and r.range[0]}
        assert len(asked) <= 2 * PER_BLOB_THREADS
    finally:
        proxy.rule = lambda r: None
        proxy.released.set()
        for t in readers:
            t.join(120)


def test_push_counts_uploads_at_the_registry(tree, proxy):
    ref = proxy.host + "/vf/counted:v1"
    push(tree, ref)
    assert proxy.count("POST") == 10 and proxy.count("PUT", lambda r: "/blobs/" in r.path) == 10
    push(tree, ref)
    assert proxy.count("POST") == 10  # nothing uploaded the second time
    assert proxy.count("HEAD") == 20


# -- HTTPS with a test CA, basic auth ---------------------------------------------------

@pytest.fixture
def secure_registry(tmp_path):
    from registry import Registry
    r = Registry(tmp_path / "secure", tls=True, users={"pusher": "s3cret"})
    try:
        yield r
    finally:
        r.stop()


def test_an_unreadable_registry_auth_file_is_named(tree, tmp_path):
    """Before any connection: the file, and why, without Python's "[Errno 2]"."""
    base = ["push", tree["src"], "127.0.0.1:9/vf/x:v1", "--manifest", tree["manifest"]]
    r = vf(*base, "--registry-auth", tmp_path / "nope")
    assert r.returncode == 1 and r.stderr == f"ERROR: {tmp_path}/nope: No such file or directory\n"
    r = vf(*base, "--registry-auth", tmp_path)
    assert r.returncode == 1 and r.stderr.startswith(f"ERROR: {tmp_path}: "), r.stderr
    assert "Errno" not in r.stderr


def test_a_registry_timeout_beyond_an_hour_is_refused_by_name(tmp_path):
    """10**10 seconds went through and failed inside Python's timer ("timestamp too large
    to convert to C _PyTime_t"; review, s44)."""
    zero = "sha256:" + "00" * 32
    base = ["mount", f"oci://127.0.0.1:9/x@{zero}", tmp_path, "--manifest-digest", zero]
    r = vf(*base, "--registry-timeout", "10000000000")
    assert r.returncode == 2 and "argument --registry-timeout: registry-timeout: at most 3600 " \
        "seconds, not 10000000000" in r.stderr, r.stderr
    r = vf(*base, "-o", "registry_timeout=3601")
    assert r.returncode == 2 and "registry_timeout: at most 3600 seconds, not 3601" in r.stderr, \
        r.stderr


def test_an_unreachable_registry_is_said_without_the_clients_classes(tmp_path):
    """What failed and why, not urllib3's connection object (our own subclass's name)."""
    import socket

    import urllib3

    from verityfuse.oci_http import reason
    with socket.socket() as s:  # bound, not listening: a connection to it is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        zero = "sha256:" + "00" * 32
        r = vf("mount", f"oci://127.0.0.1:{port}/x@{zero}", tmp_path, "--manifest-digest", zero,
               "--plain-http")
    assert r.returncode == 1 and r.stderr == (
        f"ERROR: refusing to mount: manifest x:{zero}: 127.0.0.1:{port}: cannot connect: "
        f"Connection refused\n"), r.stderr
    conn = object()
    late = urllib3.exceptions.ConnectTimeoutError(conn, "Connection to h timed out. (connect "
                                                        "timeout=10)")
    assert reason(urllib3.exceptions.MaxRetryError(None, "/v2/", late)) == \
        "Connection to h timed out. (connect timeout=10)"
    assert reason(ValueError("as it is")) == "as it is" and reason(ValueError()) == "ValueError"


@pytest.mark.mount
def test_https_and_basic_auth(tree, secure_registry, tmp_path, monkeypatch):
    reg = secure_registry
    ref = f"{reg.host}/vf/secure:v1"
    creds = tmp_path / "creds"
    creds.write_text("pusher:s3cret\n")
    base = ["push", tree["src"], ref, "--manifest", tree["manifest"]]
    r = vf(*base, "--registry-auth", creds)
    assert r.returncode == 1 and "certificate verify failed" in r.stderr, r.stderr
    r = vf(*base, "--registry-ca", reg.ca)
    assert r.returncode == 1 and f"registry API check: {reg.host} answered 401" in r.stderr, \
        r.stderr
    r = vf(*base, "--registry-ca", reg.ca, "--registry-auth", creds)
    assert r.returncode == 0 and "10 blobs uploaded" in r.stdout, r.stderr
    # The mount takes its credentials from the usual docker config.json.
    import base64
    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps({"auths": {f"https://{reg.host}": {
        "auth": base64.b64encode(b"pusher:s3cret").decode()}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    if fuse_unavailable_reason():
        pytest.skip(fuse_unavailable_reason())
    mnt = tmp_path / "secure-mnt"
    mnt.mkdir()
    m = VerifiedMount(f"oci://{ref}", mnt, extra_args=["--registry-ca", str(reg.ca),
                                                       "--trust-key", str(tree["pub"])])
    try:
        assert (mnt / "sub/odd").read_bytes() == tree["files"]["sub/odd"]
        assert (mnt / "big").read_bytes() == tree["files"]["big"]
    finally:
        m.unmount()


def test_a_large_tree_is_fetched_as_it_is_used(tmp_path, registry, oci_mount):  # noqa: F811
    """40 MiB of 4 KiB blocks: a tree object of 81 blocks (324 KiB), over the whole-fetch
    limit: open fetches its 320-byte header, a read the 16-block chunks it verifies with."""
    src = tmp_path / "large"
    src.mkdir()
    data = content(40 << 20, 7)
    (src / "f").write_bytes(data)
    mf.generate_key(str(tmp_path / "k.pem"), str(tmp_path / "k.pub"))
    r = vf("seal", src, "--manifest", tmp_path / "lm.json", "--sign-key", tmp_path / "k.pem")
    assert r.returncode == 0, r.stderr
    ref = f"{registry.host}/vf/large:v1"
    assert vf("push", src, ref, "--manifest", tmp_path / "lm.json", "--plain-http").returncode == 0
    m = oci_mount(ref, "--trust-key", tmp_path / "k.pub")
    at_mount = fetched(m)
    fd = os.open(m.mountpoint / "f", os.O_RDONLY)
    try:
        assert fetched(m) == at_mount + 320
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        # Data block 5120 hashes into leaf 40 = tree block 41 (after the root block 0):
        # chunk 2 (blocks 32-47), then the root block's chunk 0.
        assert os.pread(fd, 4096, 20 << 20) == data[20 << 20:(20 << 20) + 4096]
        assert fetched(m) == at_mount + 320 + 2 * 16 * 4096 + 4096
    finally:
        os.close(fd)
    assert (m.mountpoint / "f").read_bytes() == data
    # A tree block altered in the registry: the blocks it covers fail, the others read.
    m.unmount()
    from verityfuse.oci_client import sha256_digest
    obj = next((src / ".verityfuse" / "objects").rglob("*/*/*"))
    blob = registry.blob_path(sha256_digest(obj.read_bytes()))
    with open(blob, "r+b") as f:
        f.seek(320 + 41 * 4096 + 10)  # leaf 40: data blocks 5120-5247
        f.write(b"\0\0\0\0")
    m = oci_mount(ref, "--trust-key", tmp_path / "k.pub")
    with pytest.raises(OSError) as e:
        pread_block(m.mountpoint / "f", 20 << 20)
    assert e.value.errno == errno.EIO
    assert pread_block(m.mountpoint / "f", 30 << 20) == data[30 << 20:(30 << 20) + 4096]
    m.unmount()
    assert "f: Merkle tree block (level 0, index 40) at tree offset 167936: expected hash" \
        in m.log(), m.log()


def test_a_failing_tree_fetch_fails_only_that_open(pushed, proxy, oci_mount):
    tree_blob = tree_object_blob(pushed, "sub/odd")
    proxy.rule = lambda r: "500" if r.blob == tree_blob and r.method == "GET" else None
    m = _through(pushed, proxy, oci_mount)
    with pytest.raises(OSError) as e:
        open(m.mountpoint / "sub/odd", "rb")
    assert e.value.errno == errno.EIO
    assert (m.mountpoint / "small").read_bytes() == b"hello\n"
    assert os.stat(m.mountpoint / "sub/odd").st_size == 5 * 4096 + 17  # metadata still served
    assert proxy.count("GET", lambda r: r.blob == tree_blob) == 4  # 1 + 3 retries
    m.unmount()
    assert m.log().count(f"registry failure: sub/odd: tree object (blob {tree_blob}): "
                         f"{proxy.host} answered 500") == 1, m.log()


# -- references and hostile OCI manifests (no registry needed) ---------------------------

def test_references():
    from verityfuse.oci_ref import parse_ref
    r = parse_ref("oci://127.0.0.1:5000/a/b-c:v1.2")
    assert (r.host, r.repo, r.tag, r.digest) == ("127.0.0.1:5000", "a/b-c", "v1.2", None)
    r = parse_ref("reg.example/app@sha256:" + "ab" * 32)
    assert (r.repo, r.reference) == ("app", "sha256:" + "ab" * 32)
    assert parse_ref("reg.example/app").reference == "latest"
    for bad, why in [("reg", "is not HOST[:PORT]/REPO"), ("reg/App", "is not a repository name"),
                     ("reg/a/../b", "is not a repository name"),
                     ("reg/a@sha256:12", "is not sha256:<64 hex digits>"),
                     ("reg/a:-x", "is not a valid tag")]:
        with pytest.raises(ValueError, match=re.escape(why)):
            parse_ref(bad)


def test_hostile_oci_manifests_are_refused_or_ignored():
    from verityfuse import oci_artifact as oa
    good = "sha256:" + "0" * 64
    cfg = {"mediaType": oa.MANIFEST_TYPE, "digest": good, "size": 10}

    def doc(**kw):
        return json.dumps(dict({"schemaVersion": 2, "config": cfg, "layers": []}, **kw)).encode()
    for body, why in [
            (b"[", "not JSON"), (b"[]", "not an OCI image manifest"),
            (doc(config={"mediaType": "application/x", "digest": good, "size": 1}),
             "not a verityfuse artifact"),
            (doc(config=dict(cfg, digest="sha256:../../x")), "config: digest 'sha256:../../x'"),
            (doc(config=dict(cfg, size=True)), "config: size 'True' is not a non-negative"),
            (doc(layers={}), "layers is not a list"),
            (doc(layers=[{"mediaType": oa.DATA_TYPE, "digest": "md5:x", "size": 1,
                          "annotations": {oa.DIGEST_ANNOTATION: "sha256:aa"}}]),
             "layers[0]: digest 'md5:x'")]:
        with pytest.raises(oa.ArtifactError, match=re.escape(why)):
            oa.parse(body)
    # Unknown layers are ignored; the first layer for a digest wins.
    art = oa.parse(doc(layers=[
        {"mediaType": "application/other", "digest": good, "size": 1},
        {"mediaType": oa.DATA_TYPE, "digest": good, "size": 5,
         "annotations": {oa.DIGEST_ANNOTATION: "sha256:aa"}},
        {"mediaType": oa.DATA_TYPE, "digest": "sha256:" + "1" * 64, "size": 6,
         "annotations": {oa.DIGEST_ANNOTATION: "sha256:aa"}}]))
    assert art.data == {"sha256:aa": oa.Blob(good, 5)} and art.trees == {}


def test_guest_pull_is_measured_and_attested_as_a_share_is(pushed, registry, tmp_path,  # noqa: F811
                                                           oci_mount):
    """The confidential-container recipe with a registry: the MountManifest event names the
    same manifest digest, and the verifier's replay accepts it; an integrity failure from
    the registry is measured as for a share."""
    reg, log = tmp_path / "reg", tmp_path / "events.log"
    m = oci_mount(pushed["ref"], "--trust-key", pushed["pub"], "--manifest-digest",
                  pushed["digest"], "--measure", f"file:{reg}", "--event-log", log)
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and " MountManifest " in lines[1]
    content = json.loads(lines[1].split(" ", 2)[2])
    assert content["manifest"] == pushed["digest"] and content["mountpoint"] == str(m.mountpoint)
    register = bytes.fromhex(reg.read_text().split()[-1]).hex()
    r = vf("attest", "replay", log, "--register", register, "--expect-manifest",
           pushed["digest"])
    assert r.returncode == 0, r.stdout + r.stderr
    # Bytes from the registry that do not verify: measured before the EIO is answered.
    from verityfuse.oci_client import sha256_digest
    with open(registry.blob_path(sha256_digest(pushed["files"]["big"])), "r+b") as f:
        f.seek(BAD)
        f.write(b"?")
    with pytest.raises(OSError):
        pread_block(m.mountpoint / "big", BAD)
    lines = log.read_text().splitlines()
    assert len(lines) == 3 and " IntegrityViolation " in lines[2]
    violation = json.loads(lines[2].split(" ", 2)[2])
    assert (violation["path"], violation["offset"]) == ("big", BAD)


def test_bearer_token_authentication(tree, proxy, tmp_path, oci_mount):
    """A registry that answers 401 with a Bearer challenge: the token comes from the
    challenge's realm with the basic credentials, and every later request carries it."""
    proxy.token_users = {"pusher": "s3cret"}
    creds = tmp_path / "creds"
    creds.write_text("pusher:wrong\n")
    ref = proxy.host + "/vf/tokens:v1"
    r = vf("push", tree["src"], ref, "--manifest", tree["manifest"], "--plain-http",
           "--registry-auth", creds)
    assert r.returncode == 1
    assert f"registry API check: token from 'http://{proxy.host}/token': answered 401" in r.stderr
    creds.write_text("pusher:s3cret\n")
    r = vf("push", tree["src"], ref, "--manifest", tree["manifest"], "--plain-http",
           "--registry-auth", creds)
    assert r.returncode == 0 and "10 blobs uploaded" in r.stdout, r.stderr
    m = oci_mount(ref, "--trust-key", tree["pub"], "--registry-auth", creds)
    assert (m.mountpoint / "sub/odd").read_bytes() == tree["files"]["sub/odd"]
    # One token per client: two for the wrong password's and the push's, one for the mount.
    assert proxy.count("GET", lambda r: r.path.startswith("/token")) == 3


def test_chunked_and_monolithic_uploads_and_range_reads(registry):  # noqa: F811
    """The client against the registry alone: a chunked upload (PATCH with Content-Range,
    then PUT ?digest=), a monolithic one, HEAD, whole and ranged GETs."""
    import io
    from verityfuse.oci_client import Client, RegistryError, sha256_digest
    from verityfuse.oci_ref import parse_ref
    c = Client(parse_ref(f"{registry.host}/vf/client"))
    try:
        data = content(300_000, 9)
        digest = sha256_digest(data)
        assert c.blob_size(digest) is None
        c.upload_blob(digest, len(data), lambda: io.BytesIO(data), chunk_size=100_000)
        assert c.requests["PATCH"] == 3
        assert c.blob_size(digest) == len(data)
        assert c.get_blob(digest, len(data), "blob") == data
        assert c.get_range(digest, 4096, 8192, "range") == data[4096:12288]
        assert c.get_range(digest, 299_990, 10, "tail") == data[-10:]
        small = b"small blob\n"
        c.upload_blob(sha256_digest(small), len(small), lambda: io.BytesIO(small))
        assert c.requests["PATCH"] == 3 and c.get_blob(sha256_digest(small), 11, "b") == small
        # The registry checks what it is given: a digest that is not the bytes' is refused.
        with pytest.raises(RegistryError, match="answered 400"):
            c.upload_blob("sha256:" + "0" * 64, 3, lambda: io.BytesIO(b"abc"))
        # A range past the end is not a 206.
        with pytest.raises(RegistryError, match="answered 416"):
            c.get_range(digest, 400_000, 10, "past the end")
    finally:
        c.close()


def test_sequential_reads_are_read_ahead(pushed, proxy):
    """A read that continues the previous one starts fetching the next range in the
    background: the third of three sequential 256 KiB reads was requested before the
    read was made, and no range is requested twice."""
    import time
    from verityfuse import oci_reader, oci_source
    from verityfuse.mountopts import Settings
    from verityfuse.verifier import TreeBlockCache, Verifier

    ref = "oci://" + proxy.host + "/" + pushed["ref"].split("/", 1)[1]
    remote = oci_source.remote_from_settings(ref, Settings(trust_key=[str(pushed["pub"])],
                                                           plain_http=True))
    big, blob, piece = pushed["files"]["big"], _big_blob(pushed), 256 << 10

    def ranges():
        with proxy.lock:
            return [r.range for r in proxy.requests if r.blob == blob]
    try:
        node = next(n for n in remote.manifest.tree.files() if n.path == "big")
        tree = remote.open_tree(node, "big")
        reader = oci_reader.OciReader(remote, node, Verifier(tree, TreeBlockCache(), "big"),
                                      "big")
        assert bytes(reader.read(0, piece)) == big[:piece]
        assert bytes(reader.read(piece, piece)) == big[piece:2 * piece]
        third = (2 * piece, 3 * piece - 1)
        for _ in range(1000):  # the readahead's request: an event, waited for
            if third in ranges():
                break
            time.sleep(0.01)
        assert ranges() == [(0, piece - 1), (piece, 2 * piece - 1), third]
        assert bytes(reader.read(2 * piece, piece)) == big[2 * piece:3 * piece]
        remote.readahead.shutdown(wait=True)
        assert ranges() == [(0, piece - 1), (piece, 2 * piece - 1), third,
                            (3 * piece, 4 * piece - 1)]
        tree.close()
    finally:
        remote.close()


def test_a_disk_cache_is_bounded_private_and_removed(pushed, oci_mount, tmp_path):
    from conftest import drop_caches
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    m = oci_mount(pushed["ref"], "--trust-key", pushed["pub"], "--cache", cache_dir,
                  "--cache-size", 4)
    [private] = cache_dir.iterdir()
    assert private.stat().st_mode & 0o777 == 0o700
    big = pushed["files"]["big"]
    assert (m.mountpoint / "big").read_bytes() == big
    cache = status(m)["registry"]["data_cache"]
    assert cache["directory"] == str(private) and 0 < cache["bytes"] <= 4 << 20
    [blocks] = private.iterdir()
    assert blocks.stat().st_blocks * 512 <= (4 << 20) + (64 << 10)  # holes punched
    # The last blocks read are still on disk: read again, they cost nothing.
    drop_caches()
    before = fetched(m)
    assert pread_block(m.mountpoint / "big", BIG - 4096) == big[-4096:]
    assert fetched(m) == before
    # A cached block altered on disk is caught by the verification on the way out, and
    # fetched again from the registry (once): the read gets the verified bytes.
    with open(blocks, "r+b") as f:
        f.seek(BIG - 4096)
        f.write(b"!")
    drop_caches()
    before = fetched(m)
    assert pread_block(m.mountpoint / "big", BIG - 4096) == big[-4096:]
    assert fetched(m) == before + 4096
    assert m.log().count(f"big: blocks of the disk cache at offset {BIG - 4096} no longer "
                         f"verify (its storage changed): fetched again") == 1, m.log()
    # Read again: from the cache, which holds the good block now.
    drop_caches()
    assert pread_block(m.mountpoint / "big", BIG - 4096) == big[-4096:]
    assert fetched(m) == before + 4096
    m.unmount()
    assert list(cache_dir.iterdir()) == []
