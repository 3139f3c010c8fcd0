"""`verityfuse verify SOURCE --manifest M`: the host's offline gate against a manifest, and
`measure-manifest --trust-key`.  Every kind of difference a mount would refuse is reported,
by path, with the same exit codes as `verify` (0 all match, 1 anything else, 2 usage)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import flip, fsverity_digest, write

VF = [sys.executable, "-m", "verityfuse.cli"]


def vf(*args):
    return subprocess.run([*VF, *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    write(src / "a", b"a" * 10000)
    write(src / "d" / "b", b"b")
    os.symlink("a", src / "l")
    assert vf("keygen", tmp_path / "k.pem", tmp_path / "p.pem").returncode == 0
    m = tmp_path / "m.json"
    assert vf("seal", src, "--manifest", m, "--sign-key", tmp_path / "k.pem").returncode == 0
    (tmp_path / "pin").write_text(vf("measure-manifest", m).stdout)
    return src, m, tmp_path


def check(src, m, tmp, *extra):
    r = vf("verify", src, "--manifest", m, "--trust-key", tmp / "p.pem", "--json", *extra)
    objs = [json.loads(line) for line in r.stdout.splitlines()]
    status = {os.path.relpath(o["file"], src): o["status"] for o in objs if "file" in o}
    return r.returncode, status, objs[-1]["summary"], r


def test_an_intact_tree_passes(tree):
    src, m, tmp = tree
    rc, status, summary, _ = check(src, m, tmp)
    assert rc == 0 and set(status.values()) == {"ok"}
    assert sorted(status) == [".", "a", "d", "d/b", "l"]
    assert summary["ok"] is True and summary["entries"] == 5 and summary["sequence"] == 1
    r = vf("verify", src, "--manifest", m, "--manifest-digest", f"@{tmp}/pin")
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("5 of 5 manifest entries match")


def test_every_difference_is_reported_by_path(tree):
    src, m, tmp = tree
    st = os.stat(src / "a")
    flip(src / "a", 5000)
    os.utime(src / "a", ns=(st.st_atime_ns, st.st_mtime_ns))  # content only
    os.chmod(src / "d" / "b", 0o600)
    os.unlink(src / "l")
    os.symlink("elsewhere", src / "l")
    write(src / "new", b"n")
    rc, status, summary, r = check(src, m, tmp)
    assert rc == 1
    assert status == {".": "differs", "a": "corrupt", "d": "ok", "d/b": "differs",
                      "l": "differs", "new": "unlisted"}
    lines = {json.loads(x)["file"]: json.loads(x) for x in r.stdout.splitlines()[:-1]}
    assert lines[f"{src}/a"]["offset"] == 4096 and lines[f"{src}/a"]["what"] == "data block at offset"
    assert lines[f"{src}/d/b"]["error"] == "mode 0600, the manifest says 0644"
    assert lines[f"{src}/l"]["error"].startswith("mtime ")
    assert lines[f"{src}/l"]["error"].endswith("; points to b'elsewhere', the manifest says b'a'")
    assert (summary["corrupt"], summary["differs"], summary["unlisted"]) == (1, 3, 1)


def test_a_file_of_one_block_is_checked_without_an_object(tree):
    """A file of one block is sealed without a store object: its bytes pass if they give
    the manifest's digest, and a changed one is corrupt, named with the digest its bytes
    give (fsverity-utils') and the manifest's."""
    src, m, tmp = tree
    assert os.listdir(src / ".verityfuse" / "objects" / "sha256") != []  # a's
    for obj in (src / ".verityfuse" / "objects").rglob("*"):
        assert not obj.is_file() or obj.stat().st_size > 320, obj  # none of one block
    sealed = fsverity_digest(write(tmp / "oracle", b"b"))[0].split()[0]
    now = fsverity_digest(write(tmp / "oracle", b"c"))[0].split()[0]
    st = os.stat(src / "d" / "b")
    write(src / "d" / "b", b"c")
    os.utime(src / "d" / "b", ns=(st.st_atime_ns, st.st_mtime_ns))  # content only
    rc, status, summary, r = check(src, m, tmp)
    assert rc == 1 and status["d/b"] == "corrupt" and summary["corrupt"] == 1, status
    line = next(json.loads(x) for x in r.stdout.splitlines() if "d/b" in x)
    assert line["error"] == f"the file gives {now}, the manifest says {sealed}", line
    r = vf("verify", src, "--manifest", m, "--trust-key", tmp / "p.pem")
    assert f"CORRUPT {src}/d/b: the file gives {now}, the manifest says {sealed}\n" in r.stdout, \
        r.stdout


def test_missing_swapped_types_and_symlinked_directories(tree):
    src, m, tmp = tree
    os.unlink(src / "d" / "b")
    os.rename(src / "d", src / "d.real")
    os.symlink("d.real", src / "d")      # the listed path through a symlink: not followed
    os.unlink(src / "a")
    os.mkdir(src / "a")                  # a directory where a file was listed
    rc, status, _, r = check(src, m, tmp)
    assert rc == 1
    assert (status["a"], status["d"], status["d/b"], status["d.real"]) == \
        ("differs", "differs", "differs", "unlisted")
    lines = {os.path.relpath(json.loads(x)["file"], src): json.loads(x)
             for x in r.stdout.splitlines()[:-1]}
    assert lines["a"]["error"] == "is a directory, the manifest lists a regular file"
    assert lines["d"]["error"] == "is a symlink, the manifest lists a directory"
    assert "without following a symlink" in lines["d/b"]["error"]
    os.unlink(src / "d")
    rc, status, _, _ = check(src, m, tmp)
    assert (status["d"], status["d/b"]) == ("missing", "missing")


def test_authentication_comes_first(tree):
    src, m, tmp = tree
    r = vf("verify", src, "--manifest", m)
    assert r.returncode == 2 and "needs --trust-key or --manifest-digest" in r.stderr
    assert vf("keygen", tmp / "k2.pem", tmp / "p2.pem").returncode == 0
    r = vf("verify", src, "--manifest", m, "--trust-key", tmp / "p2.pem")
    assert r.returncode == 1 and "not signed by a trusted key" in r.stderr
    r = vf("verify", src, "--manifest", m, "--manifest-digest", "sha256:" + "0" * 64)
    assert r.returncode == 1 and "is not the pinned" in r.stderr
    r = vf("verify", src, "--manifest", m, "--manifest-digest", f"@{tmp}/nothing")
    assert r.returncode == 2 and "nothing" in r.stderr
    r = vf("verify", src, "--trust-key", tmp / "p.pem")
    assert r.returncode == 2 and "need --manifest" in r.stderr


def test_measure_manifest_checks_the_signature_without_mounting(tree):
    src, m, tmp = tree
    r = vf("measure-manifest", m, "--trust-key", tmp / "p.pem")
    assert r.returncode == 0 and r.stdout == (tmp / "pin").read_text()
    assert vf("keygen", tmp / "k2.pem", tmp / "p2.pem").returncode == 0
    r = vf("measure-manifest", m, "--trust-key", tmp / "p2.pem")
    assert r.returncode == 1 and "not signed by a trusted key" in r.stderr and r.stdout == ""


def test_mount_takes_a_pinned_digest_from_a_file(tree, verified_mount):
    src, m, tmp = tree
    mnt = verified_mount(src, seal=False, options=[f"manifest={m},manifest_digest=@{tmp}/pin"])
    assert (mnt.mountpoint / "d" / "b").read_bytes() == b"b"


def test_human_output_escapes_names_a_host_chose(tree):
    """A name with a newline or a terminal escape, from the walked tree (the host's),
    never reaches the human output raw: it cannot forge an OK line or erase the
    CORRUPT one.  seal, verify and verify --manifest, digest and its errors."""
    src, m, tmp = tree
    flip(src / "a", 5000)
    forged = ["zz\nOK sha256:0000 a", "zz\x1b[1A\x1b[2K\rOK a", os.fsdecode(b"bad\\name\xff")]
    for name in forged:
        write(os.path.join(os.fsencode(src), os.fsencode(name)), b"x")
    shown = ["zz\\nOK sha256:0000 a", "zz\\x1b[1A\\x1b[2K\\rOK a", "bad\\\\name\\xff"]

    def out(*args):
        argv = [a if isinstance(a, bytes) else os.fsencode(str(a)) for a in args]
        r = subprocess.run([*VF, *argv], capture_output=True)
        assert b"\x1b" not in r.stdout + r.stderr and b"\r" not in r.stdout + r.stderr
        return r.returncode, r.stdout.decode("utf-8", "surrogateescape").splitlines()

    rc, lines = out("verify", src, "--manifest", m, "--trust-key", tmp / "p.pem", "-v")
    assert rc == 1
    assert [ln for ln in lines if ln.startswith("OK ")] == [
        ln for ln in lines if ln.startswith("OK ") and "zz" not in ln]
    for s in shown:
        assert f"UNLISTED {src}/{s}: " in "\n".join(lines)
    assert any(ln.startswith(f"CORRUPT {src}/a: ") for ln in lines)

    store = tmp / "store"
    rc, lines = out("seal", src, "--store", store)
    assert rc == 0
    ours = [ln.split(" ", 1)[1] for ln in lines if ln.split(" ", 1)[1] in
            {f"{src}/{s}" for s in shown}]
    assert sorted(ours) == sorted(f"{src}/{s}" for s in shown)
    flip(src / "d" / "b", 0)
    write(os.path.join(os.fsencode(src), os.fsencode(forged[0])), b"y")  # changed after sealing
    rc, lines = out("verify", src, "--store", store, "-v")
    assert rc == 1 and f"CORRUPT {src}/{shown[0]}: " in "\n".join(lines)
    assert not [ln for ln in lines if ln.startswith("OK sha256:0000")]

    rc, lines = out("digest", os.path.join(os.fsencode(src), os.fsencode(forged[1])))
    assert rc == 0 and lines[0].endswith(f" {src}/{shown[1]}")


def test_worker_processes_report_what_one_process_does(tmp_path):
    """verify --manifest checks entries in worker processes (by index into the tree each
    inherited): every kind of result, in manifest order, the same bytes and exit status
    as with one process."""
    src = tmp_path / "src"
    for i in range(60):
        (src / f"d{i // 20}").mkdir(parents=True, exist_ok=True)
        write(src / f"d{i // 20}" / f"f{i:02d}", bytes([i]) * (i * 397))
    os.symlink("d0/f01", src / "l")
    assert vf("keygen", tmp_path / "k.pem", tmp_path / "p.pem").returncode == 0
    m = tmp_path / "m.json"
    assert vf("seal", src, "--manifest", m, "--sign-key", tmp_path / "k.pem").returncode == 0
    st = os.stat(src / "d0" / "f15")
    flip(src / "d0" / "f15", 4200)                         # corrupt
    os.utime(src / "d0" / "f15", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(src / "d1" / "f21", 0o600)                    # differs
    os.unlink(src / "d1" / "f22")                          # missing
    os.unlink(src / "d2" / "f45")
    os.mkdir(src / "d2" / "f45")                           # a directory where a file was
    os.unlink(src / "l")
    os.symlink("elsewhere", src / "l")                     # another target
    write(src / "d2" / "new", b"n")                        # unlisted
    outs = {t: [vf("verify", src, "--manifest", m, "--trust-key", tmp_path / "p.pem", "--threads",
                   t, *fmt) for fmt in ([], ["--json"])] for t in ("1", "2")}
    for one, two in zip(outs["1"], outs["2"]):
        assert (two.returncode, two.stdout, two.stderr) == (one.returncode, one.stdout, one.stderr)
    status = {os.path.relpath(o["file"], src): o["status"]
              for o in map(json.loads, outs["2"][1].stdout.splitlines()) if "file" in o}
    assert {p: s for p, s in status.items() if s != "ok"} == {
        ".": "differs", "d0/f15": "corrupt", "d1": "differs", "d1/f21": "differs",
        "d1/f22": "missing", "d2": "differs", "d2/f45": "differs", "l": "differs",
        "d2/new": "unlisted"}


def test_a_directory_that_cannot_be_listed_is_reported_not_skipped(tree, monkeypatch):
    """The walk for unlisted paths reports a listed directory it cannot list (here: d,
    as if unreadable), where os.walk's silent skip hid what was under it; verify
    --manifest then says ERROR for it, and fails."""
    import errno

    from verityfuse import manifest_check
    from verityfuse.source_dir import SourceDir

    src, m, tmp = tree
    real = SourceDir.listing

    def listing(self, rel):
        if rel == "d":
            raise PermissionError(errno.EACCES, "Permission denied", self.full(rel))
        return real(self, rel)

    monkeypatch.setattr(SourceDir, "listing", listing)
    listed = {".", "a", "d", "d/b", "l"}
    failed = []
    skip = [str(src / ".verityfuse")]  # the store
    assert list(manifest_check.unlisted(str(src), listed, skip, lambda r, e: failed.append(
        (r, e.errno)))) == []
    assert failed == [("d", errno.EACCES)]
    with pytest.raises(PermissionError):
        list(manifest_check.unlisted(str(src), listed, skip))


def test_an_entry_that_cannot_be_reached_for_another_reason_is_an_error(tree, monkeypatch):
    """Only a symlink or a file on an entry's way is a difference from the manifest; a
    directory the checker may not search (EACCES) is an error, said as it is (it was
    reported as 'cannot be reached without following a symlink')."""
    import errno

    from verityfuse import fsutil, manifest_check, manifest_tree

    src, m, tmp = tree
    real = fsutil.open_beneath

    def open_beneath(dirfd, path, *a):
        if path == b"d/b":
            raise PermissionError(errno.EACCES, "Permission denied", "d/b")
        if path == b"a":
            raise OSError(errno.ELOOP, "Too many levels of symbolic links", "a")
        return real(dirfd, path, *a)

    monkeypatch.setattr(fsutil, "open_beneath", open_beneath)
    root = os.open(src, os.O_PATH | os.O_DIRECTORY)
    try:  # (directory entries: the check ends before any content is read)
        node = manifest_tree.Node(0, 0, "d/b", 0o040755, 0, 0, 0)
        res = manifest_check.check_node(root, node, None, None)
        assert (res.status, res.message) == ("error", "Permission denied")
        node = manifest_tree.Node(0, 0, "a", 0o040755, 0, 0, 0)
        res = manifest_check.check_node(root, node, None, None)
        assert res.status == "differs"
        assert res.message.startswith("cannot be reached without following a symlink")
    finally:
        os.close(root)
