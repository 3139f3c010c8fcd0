"""seal_small (_sealsmall.c): a small file sealed into tmp/ in one native call.

It must write exactly the bytes the Python path writes (the same run with
VERITYFUSE_PURE_PYTHON=1 is the oracle for the store and the manifest,
fsverity-utils for the digests), and decline what it does not handle with
nothing left behind, so that the Python path seals it and words any error."""

import os
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import fsverity_digest, fuse_helper, pattern, write
from verityfuse import hashers, identity, merkle, seal_pool
from verityfuse.sealing import native_stager, stage_path
from verityfuse.source_dir import SourceDir
from verityfuse.store import Store

VF = [sys.executable, "-m", "verityfuse.cli"]
MIB = 1 << 20
SIZES = [0, 1, 1023, 1024, 1025, 4095, 4096, 4097, 8192, 16384, 16385, 65536,
         128 * 1024 + 5, MIB - 1, MIB, MIB + 1]
PARAMS = [
    [],
    ["--hash-alg", "sha512"],
    ["--block-size", "1024", "--salt", "00112233"],
    ["--block-size", "65536", "--hash-alg", "sha512", "--salt", "ab" * 32],
    ["--block-size", "2048", "--salt", "ff" * 7],
]

needs_native = pytest.mark.skipif(getattr(hashers._hashblocks, "seal_small", None) is None,
                                  reason="the native module is not built")


def make_tree(src):
    """SIZES at the top, 40 more small files below (enough for the worker processes),
    names JSON has to quote, and what is not a regular file."""
    os.makedirs(src / "many")
    for i, n in enumerate(SIZES):
        write(src / f"s{n:08d}", pattern(n + i)[i:])
    for i in range(40):
        write(src / "many" / f"f{i:02d}", pattern(3000 + 97 * i)[i:])
    write(src / 'quo"te\\back', b"q" * 5000)
    write(src / "\u00e9t\u00e9\u2603", b"u" * 4097)
    # Every kind of escape json.dumps makes (the native call makes its own JSON).
    write(src / "c\b\f\n\r\t\x01\x1f\x7f~ \U0001f600\uffff\u0100", b"e" * 100)
    os.makedirs(os.fsencode(src / "odd"), exist_ok=True)
    with open(os.path.join(os.fsencode(src / "odd"), b"caf\xe9\x01"), "wb") as f:
        f.write(b"latin-1 name")
    with open(os.path.join(os.fsencode(src / "odd"), b"\xed\xa0\x80\xf0\x9f"), "wb") as f:
        f.write(b"a surrogate's UTF-8, a cut one")
    os.mkfifo(src / "fifo")
    os.symlink("s00004096", src / "link")


def seal(src, store, params, pure, *extra):
    env = dict(os.environ)
    env.pop("VERITYFUSE_PURE_PYTHON", None)
    if pure:
        env["VERITYFUSE_PURE_PYTHON"] = "1"
    return subprocess.run(VF + ["seal", str(src), "--store", str(store), *params, *extra],
                          env=env, capture_output=True, check=True).stdout


def contents(root):
    """{relative path: bytes} of every file under root (tmp/ must be empty)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


@needs_native
@pytest.mark.parametrize("params", PARAMS, ids=lambda p: "-".join(p) or "default")
def test_a_seal_writes_the_python_paths_bytes(tmp_path, params):
    src = tmp_path / "src"
    make_tree(src)
    native = seal(src, tmp_path / "native", params, False, "--threads", "2")
    python = seal(src, tmp_path / "python", params, True, "--threads", "2")
    assert native == python  # the same digests, names and order
    got, want = contents(tmp_path / "native"), contents(tmp_path / "python")
    assert sorted(got) == sorted(want) and got == want
    assert not any(k.startswith("tmp/") for k in got)
    assert len([k for k in got if k.startswith("inodes/")]) == len(SIZES) + 40 + 5
    opts = {"--hash-alg": "--hash-alg", "--block-size": "--block-size", "--salt": "--salt"}
    oracle = [f"{opts[params[i]]}={params[i + 1]}" for i in range(0, len(params), 2)]
    lines = dict(reversed(line.split(" ", 1)) for line in native.decode().splitlines())
    for n in SIZES:
        path = src / f"s{n:08d}"
        want_line = fsverity_digest(path, *oracle)[0]
        assert lines[str(path)] == want_line.split(" ")[0], n


@needs_native
@pytest.mark.parametrize("params", PARAMS[:3], ids=lambda p: "-".join(p) or "default")
def test_a_manifest_seal_writes_the_python_paths_bytes(tmp_path, params):
    src = tmp_path / "src"
    make_tree(src)
    os.unlink(src / "fifo")  # a manifest refuses it (its own test): the run must succeed
    out = {}
    for kind, pure in (("native", False), ("python", True)):
        m = tmp_path / f"{kind}.json"
        out[kind] = seal(src, tmp_path / kind, params, pure, "--manifest", str(m), "--unsigned")
    assert out["native"] == out["python"]
    assert (tmp_path / "native.json").read_bytes() == (tmp_path / "python.json").read_bytes()
    assert contents(tmp_path / "native") == contents(tmp_path / "python")


@pytest.mark.parametrize("pure", [False, True], ids=["native", "python"])
def test_a_manifest_seal_indexes_no_inode_unless_local(tmp_path, pure):
    """`seal --manifest` writes the objects a manifest mount finds by digest and no index
    entry (it would name an inode of the machine that sealed); with --local, the store
    `seal` writes, byte for byte, and a local verify finds every file intact."""
    src = tmp_path / "src"
    make_tree(src)
    os.unlink(src / "fifo")
    shutil.rmtree(os.fsencode(src / "odd"))  # names a manifest cannot hold (not UTF-8)
    local = seal(src, tmp_path / "local", [], pure)
    lines = {}
    for kind, extra in (("manifest", []), ("both", ["--local"])):
        lines[kind] = seal(src, tmp_path / kind, [], pure, "--manifest",
                           str(tmp_path / f"{kind}.json"), "--unsigned", *extra)
    assert lines["manifest"] == lines["both"]  # in the manifest's order, not the walk's
    assert sorted(lines["manifest"].splitlines()) == sorted(local.splitlines())
    want = contents(tmp_path / "local")
    assert len([k for k in want if k.startswith("inodes/")]) == len(SIZES) + 40 + 3
    assert contents(tmp_path / "both") == want
    assert contents(tmp_path / "manifest") == {k: v for k, v in want.items()
                                               if not k.startswith("inodes/")}
    assert (tmp_path / "manifest.json").read_bytes() == (tmp_path / "both.json").read_bytes()
    r = subprocess.run(VF + ["verify", str(src), "--store", str(tmp_path / "manifest")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == "" and "0 sealed" in r.stderr, r
    assert r.stderr.endswith(f"ERROR: nothing was verified: no sealed file under '{src}' (its "
                             f"store has no index entry: a store `seal --manifest` wrote is "
                             f"checked with `verify --manifest M`; `seal --manifest --local` "
                             f"indexes the files too)\n"), r.stderr
    r = subprocess.run(VF + ["verify", str(src), "--store", str(tmp_path / "both")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r


@needs_native
def test_a_manifest_records_the_mtime_the_python_path_records(tmp_path):
    """The mtime comes back in seconds and nanoseconds: one before 1970 is recorded to
    the nanosecond as the Python path records it, and one past 2262 (more than 64 bits
    of nanoseconds) is refused by both alike, never recorded wrapped around."""
    from verityfuse import manifest, manifest_tree

    src = tmp_path / "src"
    make_tree(src)
    os.unlink(src / "fifo")
    write(src / "old", b"o" * 5000)
    os.utime(src / "old", ns=(0, -1_000_000_000_123_456_789))
    runs = {}
    for kind, pure in (("native", False), ("python", True)):
        m = tmp_path / f"{kind}.json"
        seal(src, tmp_path / kind, [], pure, "--manifest", str(m), "--unsigned")
        runs[kind] = m.read_bytes()
    assert runs["native"] == runs["python"]
    _, payload = manifest.read_envelope(str(tmp_path / "native.json"))
    old = [e for e in manifest_tree.iter_entries(payload) if e["path"] == "old"]
    assert [e["mtime"] for e in old] == [-1_000_000_000_123_456_789]

    os.utime(src / "old", ns=(0, 10_413_792_000 * 10**9 + 5))  # the year 2300
    said = {}
    for kind, pure in (("native", False), ("python", True)):
        env = dict(os.environ, VERITYFUSE_PURE_PYTHON="1") if pure else \
            {k: v for k, v in os.environ.items() if k != "VERITYFUSE_PURE_PYTHON"}
        r = subprocess.run(VF + ["seal", str(src), "--store", str(tmp_path / f"{kind}2"),
                                 "--manifest", str(tmp_path / f"{kind}2.json"), "--unsigned"],
                           env=env, capture_output=True, text=True)
        said[kind] = (r.returncode, r.stderr.replace(kind, "KIND"))
        assert not (tmp_path / f"{kind}2.json").exists()
    assert said["native"] == said["python"]
    assert said["native"][0] != 0 and "its mtime 10413792000000000005 is out of range" in \
        said["native"][1], said


@pytest.fixture
def stager(tmp_path):
    src = tmp_path / "src"
    os.mkdir(src)
    write(src / "small", pattern(3000))
    write(src / "big", pattern(seal_pool.SMALL + 1))  # a worker's files end at SMALL
    write(src / "edge", pattern(seal_pool.SMALL))
    os.mkfifo(src / "fifo")
    os.symlink("small", src / "link")
    os.mkdir(src / "dir")
    os.mkdir(src / "other")
    with SourceDir(str(src)) as sd, Store(str(tmp_path / "store"), create=True) as store:
        many = native_stager(store, sd, merkle.Params())
        if many is None:
            pytest.skip("the native module is not built")
        yield src, store, lambda rel: many([rel])[0]


def tmp_files(store):
    return sorted(os.listdir(os.path.join(store.path, "tmp")))


def test_what_it_declines_leaves_nothing_behind(stager):
    src, store, stage = stager
    for rel in ["fifo", "link", "dir", "big", "missing", "../src/small", "dir/../small"]:
        assert stage(rel) is None, rel
    assert tmp_files(store) == []
    staged, st = stage("small")
    assert st is None  # asked only with objects (a manifest's record)
    assert staged.obj_tmp is None and staged.data_size == 3000  # one block, format 3: no object
    assert tmp_files(store) == [staged.index_tmp]
    fd = os.open(src / "small", os.O_RDONLY)
    try:
        assert staged.key == identity.key_of(fd)
    finally:
        os.close(fd)
    staged.drop(store)
    assert tmp_files(store) == []
    staged, _ = stage("edge")  # the largest file a worker seals: natively too
    assert staged.data_size == seal_pool.SMALL and len(tmp_files(store)) == 2
    staged.drop(store)


def test_a_file_on_another_filesystem_is_declined(stager):
    """Its fsid is not SOURCE's: the Python path keys it with its own."""
    src, store, stage = stager
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "vf-test", str(src / "other")],
                   check=True)
    try:
        write(src / "other" / "f", b"elsewhere")
        assert stage("other/f") is None
        assert tmp_files(store) == []
    finally:
        subprocess.run(["umount", str(src / "other")], check=True)


def test_its_stat_is_the_files(tmp_path):
    """For a manifest (seal --manifest), what a manifest records of the file's fstat comes
    back too (mode, owner, size, mtime in ns), as manifest_tree.entry_of reads it."""
    src = tmp_path / "src"
    os.mkdir(src)
    write(src / "f", pattern(4097))
    os.chmod(src / "f", 0o640)
    os.utime(src / "f", ns=(1_600_000_000_123_456_789, 1_700_000_000_987_654_321))
    with SourceDir(str(src)) as sd, Store(str(tmp_path / "store"), create=True) as store:
        stage = native_stager(store, sd, merkle.Params(), manifest=True, index=False)
        if stage is None:
            pytest.skip("the native module is not built")
        os.chown(src / "f", 1234, 5678)
        [(staged, st)] = stage(["f"])
        assert st == (stat.S_IFREG | 0o640, 1234, 5678, 4097, 1_700_000_000_987_654_321)
        assert (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns) == tuple(st)
        # A manifest's file is found by digest: its object alone, no key, no index entry.
        assert staged.key is None and staged.index_tmp is None
        assert tmp_files(store) == [staged.obj_tmp]
        staged.drop(store)
        assert tmp_files(store) == []
        write(src / "one", pattern(4096))  # and one of one block: nothing at all
        [(staged, st)] = stage(["one"])
        assert (staged.obj_tmp, staged.index_tmp, staged.key, st.st_size) == (None, None, None,
                                                                             4096)
        assert tmp_files(store) == []


@pytest.mark.mount
@needs_native
def test_a_file_that_reads_short_is_never_sealed_as_its_size(tmp_path):
    """A file whose reads end before the size its file system gives (a FUSE or network
    source answering so, or a file truncated between the fstat and the read): the native
    stager declines it with nothing left behind, and the Python path refuses it, naming
    both counts.  It is never sealed as its size with the missing bytes made up."""
    mnt = tmp_path / "src"
    mnt.mkdir()
    with fuse_helper("short_read_fs.py", mnt, "short=3000:2999", "whole=3000:3000",
                     what="the short-read file system"):
        assert os.stat(mnt / "short").st_size == 3000
        with SourceDir(str(mnt)) as sd, Store(str(tmp_path / "store"), create=True) as store:
            stage = native_stager(store, sd, merkle.Params(), manifest=True, index=False)
            assert stage(["short"]) == [None]
            assert tmp_files(store) == []
            [(staged, _)] = stage(["whole"])
            assert staged.data_size == 3000
            staged.drop(store)
        # A manifest's seal (a seal for local mode refuses FUSE files: test_local_edges).
        r = subprocess.run(VF + ["seal", str(mnt), "--store", str(tmp_path / "st"),
                                 "--manifest", str(tmp_path / "m.json")],
                           capture_output=True, text=True)
        assert r.returncode == 1, r
        assert r.stderr == (f"WARNING: can't seal '{mnt}/short': file shrank while hashing: "
                            f"expected 3000 bytes, got 2999\n"
                            f"ERROR: manifest {tmp_path}/m.json not written: 1 file(s) could not "
                            f"be sealed\n")
        expected = fsverity_digest(write(tmp_path / "whole", pattern(3000)))[0].split()[0]
        assert r.stdout == f"{expected} {mnt}/whole\n"


@pytest.mark.mount
@needs_native
def test_a_file_written_while_it_is_read_is_never_sealed(tmp_path):
    """A file whose mtime moves while it is read (written meanwhile: its bytes may be
    half old, half new): sealing it used to record a digest of bytes the file never held,
    exit 0, and every later read failed.  The native stager declines it (an fstat after
    its read), and the Python path, reading it again, refuses it naming what moved;
    `digest` too.  The file system here moves a file's mtime at every read."""
    mnt = tmp_path / "src"
    mnt.mkdir()
    with fuse_helper("short_read_fs.py", mnt, "busy=3000:3000:rewrite:0",
                     "large=3000000:3000000:rewrite:0", "whole=3000:3000",
                     what="the short-read file system"):
        with SourceDir(str(mnt)) as sd, Store(str(tmp_path / "store"), create=True) as store:
            stage = native_stager(store, sd, merkle.Params(), manifest=True, index=False)
            assert stage(["busy"]) == [None]
            assert tmp_files(store) == []
        r = subprocess.run(VF + ["seal", str(mnt), "--store", str(tmp_path / "st"),
                                 "--manifest", str(tmp_path / "m.json")],
                           capture_output=True, text=True)
        assert r.returncode == 1, r
        warnings = sorted(r.stderr.splitlines()[:2])
        assert warnings[0].startswith(f"WARNING: can't seal '{mnt}/busy': file changed while "
                                      f"it was read (mtime 2.000000000 -> 3.000000000)"), \
            r.stderr  # the third read
        assert warnings[1].startswith(f"WARNING: can't seal '{mnt}/large': file changed while "
                                      f"it was read (mtime 0.000000000 -> "), r.stderr
        expected = fsverity_digest(write(tmp_path / "whole", pattern(3000)))[0].split()[0]
        assert r.stdout == f"{expected} {mnt}/whole\n"
        r = subprocess.run(VF + ["digest", str(mnt / "large")], capture_output=True, text=True)
        assert r.returncode == 1, r
        assert "file changed while it was read (mtime" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


@needs_native
def test_one_call_seals_a_chunk_as_the_python_path_does_each_file(tmp_path):
    """A chunk of paths in one native call: a result for each, in order, None for what
    it declines (not a regular file, over seal_pool.SMALL, no such path, no path: a
    manifest's directory), with nothing of those left behind.  Each file's index entry
    is the Python path's byte for byte: the call writes its own JSON of the path, for
    every kind of escape (tests the names of make_tree), and names its tmp/ files apart
    under this process's pid."""
    src = tmp_path / "src"
    make_tree(src)
    files = sorted(os.path.relpath(os.path.join(d, n), src)
                   for d, _, names in os.walk(src) for n in names
                   if stat.S_ISREG(os.lstat(os.path.join(d, n)).st_mode)
                   and os.path.getsize(os.path.join(d, n)) <= seal_pool.SMALL)
    declined = ["fifo", "link", "many", "missing", f"s{MIB + 1:08d}", None, "../src/many/f00"]
    rels = files[:20] + declined + files[20:]
    with SourceDir(str(src)) as sd, Store(str(tmp_path / "store"), create=True) as store:
        got = native_stager(store, sd, merkle.Params())(rels)
        assert len(got) == len(rels)
        assert [rel for rel, g in zip(rels, got) if g is None] == declined
        made = [n for rel, g in zip(rels, got) if g is not None
                for n in (g[0].index_tmp, g[0].obj_tmp) if n is not None]
        assert tmp_files(store) == sorted(made) and len(set(made)) == len(made)
        assert {n.split(".")[0] for n in made} == {str(os.getpid())}
        tmp = os.path.join(store.path, "tmp")
        for rel, g in zip(rels, got):
            if g is None:
                continue
            staged, _ = g
            python, _ = stage_path(store, sd, rel, merkle.Params())
            assert (staged.obj_tmp is None) == (python.obj_tmp is None), rel
            assert staged._replace(index_tmp=python.index_tmp, obj_tmp=python.obj_tmp) == python
            for a, b in ((staged.index_tmp, python.index_tmp), (staged.obj_tmp, python.obj_tmp)):
                if a is not None:
                    with open(os.path.join(tmp, a), "rb") as fa, \
                            open(os.path.join(tmp, b), "rb") as fb:
                        assert fa.read() == fb.read(), rel
            python.drop(store)
            staged.drop(store)
        assert tmp_files(store) == []


@needs_native
def test_what_a_workers_chunk_declined_is_not_tried_natively_again(tmp_path, monkeypatch):
    """In a worker, the stager is called for a file only after ``many`` declined it: it
    goes to the Python path at once (which says what is wrong, or hands a large file
    back), without a second native open; here, the native call is tried first."""
    from verityfuse import sealing

    src = tmp_path / "src"
    os.mkdir(src)
    write(src / "big", pattern(seal_pool.SMALL + 1))
    write(src / "small", pattern(3000))
    calls = []
    real = sealing.native_stager

    def counted(*a, **kw):
        many = real(*a, **kw)
        return lambda rels: (calls.append(list(rels)), many(rels))[1]

    monkeypatch.setattr(sealing, "native_stager", counted)
    with SourceDir(str(src)) as sd, Store(str(tmp_path / "store"), create=True) as store:
        stager = sealing.FileStager(store, sd, merkle.Params())
        assert stager.many(["big", "small"])[0] is None and calls == [["big", "small"]]
        with pytest.raises(seal_pool.Here):
            stager("big", False)
        assert calls == [["big", "small"]]
        staged, _ = stager("small", True)
        assert calls == [["big", "small"], ["small"]] and staged.data_size == 3000
