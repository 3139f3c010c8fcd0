"""Seal and verify walk SOURCE beneath one directory fd, following no symlink.

The attack: a process that may write in SOURCE (a build step sealed by root)
swaps a directory for a symlink to a directory outside SOURCE between two of
seal's system calls: after the walk listed the directory and before it lists it
or stages a file in it.  Walking by path followed the symlink, so a file from
outside SOURCE (here `secret`) was sealed under the directory's name, and in
manifest mode a signed manifest vouched for its bytes.  Now each path is
resolved beneath SOURCE's fd with no symlink anywhere on it: the swapped path is
refused, by name, and nothing outside SOURCE is read.
"""

import errno
import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest

from verityfuse import api, merkle
from verityfuse.manifest_record import ManifestRecorder
from verityfuse.sealing import stage_path, verify_file, walk_files, seal_path
from verityfuse.source_dir import SourceDir
from verityfuse.store import Store
from verityfuse.store_batch import Batch
from verityfuse.verifier import TreeBlockCache

PARAMS = merkle.Params(merkle.SHA256, 4096)
SECRET = b"root's secret, outside SOURCE\n"


@pytest.fixture
def tree(tmp_path):
    """SOURCE with a/x and f; OUT (outside SOURCE) with x and secret."""
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x").write_bytes(b"inside\n")
    (src / "f").write_bytes(b"top\n")
    out.mkdir()
    (out / "x").write_bytes(SECRET)
    (out / "secret").write_bytes(SECRET)
    return src, out


def swap(src, out):
    """SOURCE/a becomes a symlink to OUT (the attacker's move)."""
    os.rename(src / "a", src / "a.orig")
    os.symlink(out, src / "a")


class Swapping(ManifestRecorder):
    """Swaps a for a symlink when the walk reaches path ``at`` (deterministic race)."""

    def __init__(self, *a, at, src, out, **kw):
        super().__init__(*a, **kw)
        self.at, self.src, self.out = at, src, out

    def _items(self, rel):
        for item in super()._items(rel):
            if item[0] == self.at and not os.path.islink(self.src / "a"):
                swap(self.src, self.out)  # after the walk listed it, before it is used
            yield item


def record(tmp_path, src, out, at):
    warnings = []
    with Store(str(tmp_path / "store"), create=True) as store, SourceDir(str(src)) as s:
        with Batch(store) as batch:
            rec = Swapping(s, store, PARAMS, batch, warn=warnings.append, threads=1,
                           at=at, src=src, out=out)
            try:
                entries = list(rec.walk("."))
            except OSError as e:
                return None, warnings, e, rec
    return entries, warnings, None, rec


def test_manifest_seal_never_lists_a_directory_swapped_for_a_symlink(tree, tmp_path):
    src, out = tree
    # "a" is listed by the root's listing, then swapped before its own listing.
    entries, warnings, err, _ = record(tmp_path, src, out, at="a")
    assert entries is None, [e["path"] for e in entries]  # no manifest of a changed tree
    assert err.errno == errno.ELOOP
    assert err.filename == os.path.join(str(src), "a")
    assert "symlink" in err.strerror


def test_manifest_seal_never_stages_a_file_through_a_swapped_directory(tree, tmp_path):
    src, out = tree
    # a/x is listed (inside SOURCE), then a is swapped before a/x is staged.
    entries, warnings, err, rec = record(tmp_path, src, out, at="a/x")
    assert err is None
    paths = {e["path"]: e for e in entries}
    assert "a/x" not in paths  # refused, not sealed with OUT/x's bytes
    outside = str(api.digest(out / "x"))
    assert all(e.get("digest") != outside for e in entries)
    assert rec.failed == 1
    assert len(warnings) == 1 and f"'{src}/a/x'" in warnings[0] and "symlink" in warnings[0], warnings
    assert paths["f"]["digest"].startswith("sha256:")


def test_local_walk_reports_a_directory_swapped_for_a_symlink(tree, tmp_path):
    src, out = tree
    with Store(str(tmp_path / "store"), create=True) as store, SourceDir(str(src)) as s:
        found, unreadable = [], []
        for rel in walk_files(s, store, unreadable=lambda r, e: unreadable.append((r, e.errno))):
            found.append(rel)
            if rel == "f":  # the root's files come before its subdirectories
                swap(src, out)
    assert found == ["f"]  # never OUT's x or secret under a/
    assert unreadable == [("a", errno.ELOOP)]


UNREAD = " (a directory that could not be listed: nothing under it was read)"


def deep_tree(root, depth=500):
    """root/d/d/.../leaf with a path longer than PATH_MAX (4096) below root, and root/top."""
    root.mkdir()
    (root / "top").write_bytes(b"top\n")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("dir000000", dir_fd=fd)
            nfd = os.open("dir000000", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(b"deep\n")
    finally:
        os.close(fd)


def remove_deep(root):
    subprocess.run(["rm", "-rf", str(root)], check=True)  # rmtree fails on such paths


def test_seal_and_verify_say_which_directory_they_could_not_list(tmp_path):
    """A directory that cannot be listed (here: its path is longer than PATH_MAX) is an
    error that names it, and the exit status says so: what is under it is neither
    sealed nor verified, which a silent skip would hide (verify --strict said all was
    intact)."""
    src = tmp_path / "src"
    deep_tree(src)
    (src / "zz").mkdir()
    (src / "zz" / "x").write_bytes(b"x\n")
    try:
        store = str(tmp_path / "store")
        cli = [sys.executable, "-m", "verityfuse"]
        r = subprocess.run(cli + ["seal", str(src), "--store", store, "--json"],
                           capture_output=True, text=True)
        assert r.returncode == 1
        out = [json.loads(line) for line in r.stdout.splitlines()]
        # In walk order, the directory after the files (the walk runs ahead of the results).
        assert [o["file"] for o in out[:2]] == [f"{src}/top", f"{src}/zz/x"]
        assert out[2]["file"].startswith(f"{src}/dir000000/")
        assert out[2]["error"] == "File name too long" + UNREAD and len(out) == 3
        r = subprocess.run(cli + ["seal", str(src), "--store", store], capture_output=True,
                           text=True)
        assert r.returncode == 1 and r.stdout.count("\n") == 2
        assert r.stderr.startswith(f"ERROR: can't seal '{src}/dir000000/"), r.stderr
        assert r.stderr.endswith("': File name too long" + UNREAD + "\n")
        assert r.stderr.count("\n") == 1
        r = subprocess.run(cli + ["verify", str(src), "--store", store, "--strict"],
                           capture_output=True, text=True)
        assert r.returncode == 1
        assert r.stdout.startswith(f"ERROR {src}/dir000000/") and \
            r.stdout.endswith(": File name too long" + UNREAD + "\n"), r.stdout
        assert "2 of 2 sealed files intact, 1 unreadable" in r.stderr
        report = api.verify(src, store=store)
        assert not report.ok and [f.status for f in report.files] == ["error", "ok", "ok"]
        with pytest.raises(OSError) as e:
            api.seal(src, store=store)
        assert e.value.errno == errno.ENAMETOOLONG
    finally:
        remove_deep(src)


def test_stage_and_seal_refuse_a_path_through_a_swapped_directory(tree, tmp_path):
    src, out = tree
    swap(src, out)
    with Store(str(tmp_path / "store"), create=True) as store, SourceDir(str(src)) as s:
        for call in (lambda: stage_path(store, s, "a/x", PARAMS),
                     lambda: seal_path(store, s, "a/x", PARAMS),
                     lambda: stage_path(store, str(src), "a/x", PARAMS)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.ELOOP
            assert e.value.filename == f"{src}/a/x"
        res = verify_file(store, s, "a/secret", TreeBlockCache())
        assert res.error is not None and res.error.errno == errno.ELOOP
        assert not res.sealed
    inodes = tmp_path / "store" / "inodes"
    assert not inodes.exists() or [p for p in inodes.rglob("*") if p.is_file()] == []


def test_a_symlink_swapped_in_for_a_recorded_symlink_target_is_read_beneath(tree, tmp_path):
    """A symlink's target is read from the link beneath SOURCE: a directory on its
    path swapped for a symlink refuses it instead of reading OUT's link."""
    src, out = tree
    os.symlink("target-in", src / "a" / "l")
    os.symlink("target-out", out / "l")
    entries, warnings, err, rec = record(tmp_path, src, out, at="a/l")
    assert err is None
    paths = {e["path"]: e for e in entries}
    assert "a/l" not in paths
    assert any("'%s/a/l'" % src in w and "symlink" in w for w in warnings), warnings



def test_verify_manifest_never_lists_unlisted_names_through_a_swapped_directory(tree, monkeypatch):
    """verify --manifest reports the paths in SOURCE its manifest does not list; a
    directory swapped for a symlink while it walks must not make it list (and name in
    its report) what is outside SOURCE.  The swap comes at the walk's second listing
    (a's); the code before listed OUT through the symlink: a/not-yours, a/secret."""
    from verityfuse import manifest_check

    src, out = tree
    (out / "not-yours").write_bytes(b"x")
    listed = {".", "a", "a/x", "f"}
    assert list(manifest_check.unlisted(str(src), listed, skip=())) == []
    real_scandir, calls = os.scandir, []

    def scandir(*a):
        calls.append(a)
        if len(calls) == 2:
            swap(src, out)
        return real_scandir(*a)

    monkeypatch.setattr(os, "scandir", scandir)
    found = list(manifest_check.unlisted(str(src), listed, skip=()))
    assert len(calls) == 2 and os.path.islink(src / "a")
    assert found == []  # a was opened (beneath SOURCE) before the swap: its own entries


def test_a_path_named_through_a_symlink_is_refused_as_in_manifest_mode(tmp_path):
    """seal never follows a symlink under SOURCE, not even in the middle of a path the
    user named (manifest mode refused it already): the message says why."""
    src = tmp_path / "src"
    (src / "real" / "e").mkdir(parents=True)
    (src / "real" / "e" / "f").write_bytes(b"f\n")
    os.symlink("real", src / "ld")
    r = subprocess.run([sys.executable, "-m", "verityfuse", "seal", str(src), str(src / "ld/e/f"),
                        "--store", str(tmp_path / "store")], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (f"ERROR: can't seal '{src}/ld/e/f': it or a directory on its path is a "
                        "symlink, and no symlink is followed under the source directory (a "
                        "path named through one, or a tree that changed while it was read)\n")


class _Renumbered:
    """A directory entry whose inode number is not its file's stat's, as a FUSE file
    system's readdir may give it (the number is the server's to choose)."""

    def __init__(self, entry):
        self._entry = entry

    def __getattr__(self, name):
        return getattr(self._entry, name)

    def inode(self):
        return self._entry.inode() ^ 0x5A5A5A


def test_a_manifest_in_source_is_left_out_where_readdir_numbers_are_not_stats(tmp_path,
                                                                              monkeypatch):
    """The walk lstats no regular file but those it might have to skip, told by inode
    number and by name: on a filesystem whose readdir numbers differ from its stat's,
    the manifest being written in SOURCE (its temporary file) and the one written
    before are still left out, not sealed into the manifest."""
    from verityfuse import cli, manifest, manifest_tree

    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 5000)
    listing = SourceDir.listing

    @contextmanager
    def renumbered(self, rel):
        with listing(self, rel) as found:
            yield [_Renumbered(d) for d in found]

    monkeypatch.setattr(SourceDir, "listing", renumbered)
    m = src / "manifest.json"
    for _ in range(2):  # the second run finds the first run's manifest in SOURCE
        assert cli.main(["seal", str(src), "--manifest", str(m), "--unsigned",
                         "--threads", "1"]) == 0
        payload = manifest.read_envelope(str(m))[1]
        assert [e["path"] for e in manifest_tree.iter_entries(payload)] == [".", "a"]


def test_another_link_to_the_manifest_in_source_is_left_out(tmp_path):
    """Told by inode number: a second name of the manifest is the manifest, which a
    manifest cannot vouch for (sealing it changes it)."""
    from verityfuse import cli, manifest, manifest_tree

    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 5000)
    m = src / "manifest.json"
    assert cli.main(["seal", str(src), "--manifest", str(m), "--unsigned", "--threads", "1"]) == 0
    os.link(m, src / "b-link")
    assert cli.main(["seal", str(src), "--manifest", str(m), "--unsigned", "--threads", "1"]) == 0
    payload = manifest.read_envelope(str(m))[1]
    assert [e["path"] for e in manifest_tree.iter_entries(payload)] == [".", "a"]
