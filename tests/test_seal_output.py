"""Sealing writes exactly the bytes it always wrote: the store's objects and index
entries, the manifest file and its digest.  The expected manifest values were
computed by the sealing code before it was batched and streamed (commit e9838e0);
the objects are checked against the real `fsverity digest`.
"""

import hashlib
import json
import os
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import fsverity_digest, pattern, write
from verityfuse import identity
from verityfuse import manifest as mf
from verityfuse.store_object import HEADER_SIZE, OBJECT_HEADER, OBJECT_MAGIC

VF = [sys.executable, "-m", "verityfuse.cli"]
T0 = 1_700_000_000_123_456_789  # every mtime, in ns, is T0 + its position below

# (path, kind, content or target, mode): names chosen so that path-byte order is not
# the order of a depth-first walk ("a-b" and "a.txt" sort between "a" and "a/x").
TREE = [
    ("a", "dir", None, 0o755),
    ("a/x", "file", pattern(4097), 0o644),
    ("a/y", "symlink", "../b", 0o777),
    ("a-b", "file", b"", 0o600),
    ("a.txt", "file", b"1", 0o640),
    ("b", "file", pattern(100000), 0o755),
    ("c", "file", pattern(4096), 0o644),
    ("deep", "dir", None, 0o750),
    ("deep/er", "dir", None, 0o700),
    ("deep/er/z", "file", pattern(5000)[::-1], 0o444),
    ("deep/large", "file", pattern(1 << 21), 0o644),  # a tree over 64 KiB at 1 KiB blocks
    ("\u00e9t\u00e9", "file", pattern(16384), 0o644),
]
FILES = [p for p, kind, _, _ in TREE if kind == "file"]

# seal options -> (manifest digest, SHA-256 of the unsigned manifest file, of the signed one)
EXPECTED = {
    (): ("sha256:02ce8cd6f7e93a4f8e4fb59eb463aabe2759bea1b7a670b7f4d55849e02e1d5b",
         "908ec3121172e49cf81f7408b9aa97213981fbe0cb446c48ce3da2f9f037a066",
         "5b19c1fbbce6541a4481b135e2cf62c939749cbfc8b5e8517dc2077962feebbb"),
    ("--block-size=1024", "--salt=00ff", "--hash-alg=sha512"): (
        "sha256:13cac900e081eae50c13da5b5bdf19eb33672350c3bde56e45d0fc3341306916",
        "5953df236b5e4f6f41d9f8ee11a9876a5bb43c94bfda862e55309114d1287888",
        "316109c97a3dbd4ccc8cdd8d490b8a2469d2a493744577b85ee982473b2004b0"),
}


def make_tree(root):
    if os.geteuid() != 0:
        pytest.skip("the expected manifest records uid and gid 0")
    root.mkdir()
    for path, kind, data, _ in TREE:
        p = root / path
        if kind == "dir":
            p.mkdir()
        elif kind == "file":
            write(p, data)
        else:
            os.symlink(data, p)
    for n, (path, kind, _, mode) in enumerate(reversed(TREE)):  # children before parents
        p = root / path
        if kind != "symlink":
            os.chmod(p, mode)
        os.chown(p, 0, 0, follow_symlinks=False)
        os.utime(p, ns=(T0, T0 + len(TREE) - n), follow_symlinks=False)
    os.chmod(root, 0o755)
    os.utime(root, ns=(T0, T0))


def run(*args):
    r = subprocess.run([*VF, *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


def key_file(tmp_path):
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # Ed25519 signs deterministically
    path = tmp_path / "key.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def check_store(src, store, opts, index=True):
    """Every object is header || fsverity's descriptor || fsverity's tree, and every index
    entry is the JSON it always was, with fsverity's descriptor for a file of one block
    (format 3), which has no object, a manifest's file neither; nothing else is in the
    store.  Without ``index`` (`seal --manifest`), no index entry either."""
    objects, entries = set(), set()
    for rel in FILES:
        line, tree, desc = fsverity_digest(src / rel, *opts)
        digest = line.split()[0]
        alg, hexd = digest.split(":")
        one_block = int.from_bytes(desc[8:16], "little") <= 1 << desc[2]  # size, log2(block)
        assert one_block == (tree == b""), rel
        if not one_block:
            obj = store / "objects" / alg / hexd[:2] / hexd
            header = OBJECT_HEADER.pack(OBJECT_MAGIC, HEADER_SIZE, 0, len(tree), b"")
            assert obj.read_bytes() == header + desc + tree, rel
            objects.add(str(obj.relative_to(store)))
        for oracle in (".oracle.tree", ".oracle.desc"):  # fsverity_digest's, beside the file
            os.unlink((src / rel).parent / oracle)
        if not index:
            continue
        fd = os.open(src / rel, os.O_RDONLY)
        try:
            key = identity.key_of(fd)
        finally:
            os.close(fd)
        doc = {"digest": digest, "path": rel, "version": 2}
        if one_block:
            doc["descriptor"] = desc.hex()
        entry = store / "inodes" / key[:2] / key
        assert entry.read_bytes() == json.dumps(doc, sort_keys=True).encode() + b"\n", rel
        entries.add(str(entry.relative_to(store)))
    found = {str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()}
    assert found == objects | entries | {"VERSION"}
    assert os.listdir(store / "tmp") == []


@pytest.mark.parametrize("opts", list(EXPECTED))
def test_seal_writes_the_same_store_as_fsverity_digest(tmp_path, opts):
    src = tmp_path / "src"
    make_tree(src)
    r = run("seal", src, *opts)
    lines = r.stdout.splitlines()
    # A directory's files, then its subdirectories, each in name order.
    order = ["a-b", "a.txt", "b", "c", "\u00e9t\u00e9", "a/x", "deep/large", "deep/er/z"]
    assert [ln.split(" ", 1)[1] for ln in lines] == [str(src / p) for p in order]
    for ln in lines:
        digest, path = ln.split(" ", 1)
        assert digest == fsverity_digest(path, *opts)[0].split()[0]
    check_store(src, src / ".verityfuse", opts)


@pytest.mark.parametrize("opts", list(EXPECTED))
def test_seal_manifest_bytes_are_unchanged(tmp_path, opts):
    digest, unsigned, signed = EXPECTED[opts]
    src = tmp_path / "src"
    make_tree(src)
    m = tmp_path / "m.json"
    r = run("seal", src, *opts, "--manifest", m, "--unsigned", "--sequence", "7",
            "--store", tmp_path / "store")
    assert f", {digest}, sequence 7" in r.stderr
    assert hashlib.sha256(m.read_bytes()).hexdigest() == unsigned
    # --local: the same manifest, and the index entries `seal` writes as well
    run("seal", src, *opts, "--manifest", m, "--sign-key", key_file(tmp_path), "--sequence", "8",
        "--store", tmp_path / "both", "--local")
    assert hashlib.sha256(m.read_bytes()).hexdigest() == signed
    check_store(src, tmp_path / "store", opts, index=False)  # last: the oracle changes mtimes
    check_store(src, tmp_path / "both", opts)
    assert sorted(os.listdir(tmp_path)) == ["both", "key.pem", "m.json", "src", "store"]


# VmHWM, not ru_maxrss: that one keeps the parent's peak across fork and exec.
PEAK = """
import sys
from verityfuse import cli, store_batch
store_batch.MAX_FILES = int(sys.argv.pop(1))
code = cli.main(sys.argv[1:])
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
print(code, hwm.split()[1])
"""


def peak_kib_sealing(tmp_path, files: int, batch: int, *opts) -> int:
    src = tmp_path / f"src{files}"
    for i in range(files):
        if i % 100 == 0:
            (src / f"d{i // 100:03d}").mkdir(parents=True)
        write(src / f"d{i // 100:03d}" / f"f{i:05d}", pattern(i * 997 % 9000))  # 0-9000 bytes
    # One process: seal_pool's workers add a fixed window of results in flight (up to
    # 8 chunks of 512 files a worker, a few hundred bytes each), which 300 files do not
    # fill; its bound is tested on its own.
    r = subprocess.run([sys.executable, "-c", PEAK, str(batch), "seal", str(src), "--manifest",
                        str(tmp_path / f"m{files}.json"), "--store", str(tmp_path / f"s{files}"),
                        "--threads", "1", *opts], capture_output=True, text=True)
    code, peak = r.stdout.split()[-2:]
    assert code == "0", r.stderr
    return int(peak)


@pytest.mark.parametrize("opts", [["--unsigned"], ["--sign-key", "KEY"]])
def test_seal_manifest_memory_does_not_grow_with_the_number_of_files(tmp_path, opts):
    """Entries are written as they are produced: once a batch is full (256 files here; 4096
    by default, which holds about 3 MiB), 6000 files cost the same memory as 300.  (Held in
    memory, the entries cost about 1.6 KiB each: 9 MiB more.)"""
    opts = [str(key_file(tmp_path)) if o == "KEY" else o for o in opts]
    small = peak_kib_sealing(tmp_path, 300, 256, *opts)
    large = peak_kib_sealing(tmp_path, 6000, 256, *opts)
    # Ed25519 needs the whole payload: signing maps the file (page cache, not a copy).
    mapped = 0
    if "--sign-key" in opts:
        mapped = len(mf.read_envelope(str(tmp_path / "m6000.json"))[1]) >> 10
    assert large - small < (1 << 10) + mapped, (small, large, mapped)


def test_an_entry_the_format_cannot_hold_is_refused_and_nothing_is_written(tmp_path):
    """Checked as each entry is written: a path whose line would pass 16 KiB (control
    characters are escaped six bytes each) is refused naming it, escaped; M is not written
    and no temporary file is left beside it."""
    src = tmp_path / "src"
    deep = src.joinpath(*["\x01" * 200] * 14)
    deep.mkdir(parents=True)
    write(deep / "f", b"data")
    m = tmp_path / "m.json"
    r = subprocess.run([*VF, "seal", str(src), "--manifest", str(m), "--unsigned",
                        "--store", str(tmp_path / "store")], capture_output=True, text=True)
    assert r.returncode == 1
    bad = "/".join(["\x01" * 200] * 14)  # the first entry too long: 14 * 201 - 1 bytes, escaped
    assert r.stderr.endswith(f"ERROR: {bad!r} cannot be recorded in a manifest: its entry is "
                             f"longer than 16384 bytes\n"), r.stderr
    assert sorted(os.listdir(tmp_path)) == ["src", "store"]
