"""`seal` and `verify` at their edges, as a review attacked them (s38): warnings that name
files are escaped, a store named as SOURCE or inside what is sealed is never sealed into
itself, seals sharing a store after a crash, a manifest inside SOURCE, what a killed
`seal --manifest` leaves, names that are not UTF-8, and --json's error objects."""

import json
import os
import subprocess
import sys

VF = [sys.executable, "-m", "verityfuse"]


def vf(*args, timeout=120):
    return subprocess.run(VF + [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args],
                          capture_output=True, timeout=timeout)


def test_a_skipped_names_warning_is_escaped(tmp_path):
    """A FIFO named with a terminal escape and a newline: its WARNING line printed the
    name raw, driving the terminal and forging a second line."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok").write_bytes(b"hi")
    os.mkfifo(src / "\x1b]0;PWNED\x07fifo\nWARNING: forged line")
    r = vf("seal", src, "--store", tmp_path / "store", "--manifest", tmp_path / "M")
    assert r.returncode == 0, r.stderr
    assert r.stderr.decode().splitlines()[0] == (
        f"WARNING: skipping {src}/\\x1b]0;PWNED\\x07fifo\\nWARNING: forged line: not a "
        f"directory, regular file or symlink")
    assert b"\x1b" not in r.stderr and b"\nWARNING: forged" not in r.stderr


def test_an_upgrade_warning_is_escaped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    idx = tmp_path / "store" / "index" / "aa"
    idx.mkdir(parents=True)
    (tmp_path / "store" / "VERSION").write_text("verityfuse-store 1\n")
    (idx / "aa01").write_text(json.dumps({"path": "gone\x1b]0;PWNED\x07\nWARNING: forged",
                                          "digest": "sha256:" + "00" * 32}))
    r = vf("upgrade-store", src, "--store", tmp_path / "store")
    assert r.returncode == 0, r.stderr
    assert b"\x1b" not in r.stderr and b"\nWARNING: forged" not in r.stderr, r.stderr
    assert b"gone\\x1b]0;PWNED\\x07\\nWARNING: forged" in r.stderr, r.stderr


def test_two_seals_cleaning_up_after_a_crash_both_seal(tmp_path, monkeypatch):
    """Two seals of one store after a crash both remove the dead process's tmp/ files:
    the one that lost a race for one aborted with 'ERROR: <tmp name>: No such file or
    directory' and sealed nothing.  Here the race is made certain: the file is gone
    between the listing and the unlink."""
    from verityfuse import store as store_mod
    from verityfuse.store import Store

    st = Store(str(tmp_path / "store"), create=True)
    try:
        for i in range(3):
            (tmp_path / "store" / "tmp" / f"4194303.{i:x}").touch()  # a dead pid's
        (tmp_path / "store" / "tmp" / "4194303.sub").mkdir()
        real = store_mod.os.unlink

        def raced(name, dir_fd=None):
            real(name, dir_fd=dir_fd)  # the other seal's unlink
            if name == "4194303.1":
                real(name, dir_fd=dir_fd)  # ours: FileNotFoundError
        monkeypatch.setattr(store_mod.os, "unlink", raced)
        assert st.cleanup_tmp() == 2
        assert os.listdir(tmp_path / "store" / "tmp") == ["4194303.sub"]
    finally:
        st.close()


def test_the_store_is_never_sealed_into_itself(tmp_path):
    """`seal SOURCE SOURCE/.verityfuse` walked the store named as a PATH (it was skipped
    only below one), and `--store SOURCE` was accepted: the store's own files were
    sealed into it, more stale entries each run."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    assert vf("seal", src).returncode == 0
    for named in (src / ".verityfuse", src / ".verityfuse" / "inodes"):
        r = vf("seal", src, named)
        assert (r.returncode, r.stdout, r.stderr) == (0, b"", b""), r
    r = vf("seal", src, "--store", src)
    assert r.returncode == 2 and r.stderr.decode() == (
        f"ERROR: the store cannot be SOURCE itself ({src}): give another directory, or none "
        f"(SOURCE/.verityfuse)\n")
    assert sorted(os.listdir(src)) == [".verityfuse", "f"]


def test_a_manifest_inside_source_verifies_right_after_its_seal(tmp_path):
    """M in a directory of SOURCE (the README's recipe): writing M changed that
    directory's mtime after the walk had recorded it, so `verify --manifest` straight
    after the seal reported the directory as differing, every time."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_bytes(b"a")
    m = src / "sub" / "M"
    for run in range(2):  # the second replaces M
        r = vf("seal", src, "--store", tmp_path / "store", "--manifest", m, "--json")
        assert r.returncode == 0, r.stderr
        digest = json.loads(r.stdout.splitlines()[-1])["digest"]
        v = vf("verify", src, "--store", tmp_path / "store", "--manifest", m,
               "--manifest-digest", digest)
        assert v.returncode == 0, (v.stdout, v.stderr)


def test_what_a_killed_manifest_seal_left_is_removed_not_recorded(tmp_path):
    """A `seal --manifest` killed mid-run leaves its temporary payload beside M; with M in
    SOURCE the next seal recorded that partial file in the manifest (and signed it).
    A dead writer's files are removed when the next one starts; a live one's stay."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    dead = src / ".M.4194303.0123456789abcdef.tmp"  # pid_max: no process has it
    dead.write_bytes(b"a partial payload")
    live = src / f".M.{os.getpid()}.fedcba9876543210.tmp"
    live.write_bytes(b"this test's own")
    r = vf("seal", src, "--store", tmp_path / "store", "--manifest", src / "M", "--json")
    assert r.returncode == 0, r.stderr
    files = [json.loads(line).get("file", "") for line in r.stdout.splitlines()]
    assert not dead.exists() and not any(".M.4194303." in f for f in files), files
    assert live.read_bytes() == b"this test's own"


def test_a_path_not_utf8_updating_a_manifest_is_a_warning_not_a_traceback(tmp_path):
    """`seal SOURCE PATH --manifest M` with a PATH whose name is not UTF-8 ended in a
    UnicodeEncodeError traceback; the walk of a whole tree skips such a name, saying so."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok").write_bytes(b"a")
    bad = os.path.join(os.fsencode(src), b"bad\xff")
    with open(bad, "wb") as f:
        f.write(b"b")
    m = tmp_path / "M"
    assert vf("seal", src, "--store", tmp_path / "store", "--manifest", m).returncode == 0
    r = subprocess.run(VF + ["seal", os.fsencode(src), bad, b"--store",
                             os.fsencode(tmp_path / "store"), b"--manifest", os.fsencode(m)],
                       capture_output=True, timeout=120)
    assert b"Traceback" not in r.stderr, r.stderr
    assert r.returncode == 0 and r.stderr.decode().splitlines()[0] == (
        f"WARNING: skipping '{src}/bad\\xff': its name is not UTF-8"), r.stderr


def test_manifest_json_has_an_error_object_for_a_file_not_sealed(tmp_path):
    """protocol/cli-json.md: {"file", "error"} for a file that could not be sealed; with
    --manifest --json there was none, only a WARNING line on stderr.  The file here reads
    a byte short of the size its (FUSE) file system gives."""
    from conftest import fuse_helper

    mnt = tmp_path / "src"
    mnt.mkdir()
    with fuse_helper("short_read_fs.py", mnt, "short=3000:2999", "whole=3000:3000"):
        r = vf("seal", mnt, "--store", tmp_path / "store", "--manifest", tmp_path / "M", "--json")
    objs = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 1, r
    assert {"file": f"{mnt}/short", "error": "file shrank while hashing: expected 3000 bytes, "
            "got 2999", "schema": 1} in objs, objs


def test_digest_refuses_what_is_not_a_regular_file_without_waiting(tmp_path):
    """`digest FIFO` waited for a writer for ever (seal refuses one without opening it);
    and --json printed no {"file", "error"} object for a file it could open but not
    read (a directory)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path):
        r = vf("digest", path, "--json", timeout=60)
        assert r.returncode == 1 and r.stderr.decode() == (
            f"ERROR: error reading '{path}': not a regular file\n")
        assert json.loads(r.stdout) == {"file": str(path), "error": "error reading: not a "
                                        "regular file", "schema": 1}


def test_what_seal_skips_verify_does_not_call_unlisted(tmp_path):
    """A FIFO, socket or device under SOURCE: `seal --manifest` skips it with a warning and
    exits 0, and `verify --manifest` reported it unlisted (exit 1) right after, every time.
    No manifest can list it and a mount hides it: verify warns of it as seal does, the
    name escaped.  An unlisted regular file is still a failure."""
    import socket

    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"listed\n")
    os.mkfifo(src / "d" / "fifo\nWARNING: forged")
    os.mknod(src / "null", 0o600 | 0o020000, os.makedev(1, 3))
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(src / "sock"))
        m = tmp_path / "M"
        r = vf("seal", src, "--store", tmp_path / "store", "--manifest", m, "--json")
        assert r.returncode == 0, r.stderr
        digest = json.loads(r.stdout.splitlines()[-1])["digest"]
        warned = sorted(r.stderr.decode().splitlines())
        assert warned == [f"WARNING: skipping {src}/{name}: not a directory, regular file or "
                          f"symlink" for name in ("d/fifo\\nWARNING: forged", "null", "sock")]

        def verify():
            return vf("verify", src, "--store", tmp_path / "store", "--manifest", m,
                      "--manifest-digest", digest, "--json")

        v = verify()
        assert v.returncode == 0, (v.stdout, v.stderr)
        assert sorted(v.stderr.decode().splitlines()) == warned
        summary = json.loads(v.stdout.splitlines()[-1])["summary"]
        assert (summary["ok"], summary["unlisted"]) == (True, 0)

        (src / "d" / "new").write_bytes(b"not in M\n")
        v = verify()
        assert v.returncode == 1
        unlisted = [json.loads(line) for line in v.stdout.splitlines()[:-1]
                    if b'"unlisted"' in line]
        assert unlisted == [{"schema": 1, "file": f"{src}/d/new", "status": "unlisted",
                             "error": "in SOURCE, not in the manifest (a mount hides it)"}]
    finally:
        sock.close()


def test_verify_of_a_source_that_is_no_directory_says_so(tmp_path):
    """`verify /nonexistent` said the store /nonexistent/.verityfuse did not exist."""
    (tmp_path / "file").write_bytes(b"x")
    pin = ["--manifest", tmp_path / "M", "--manifest-digest", "sha256:" + "0" * 64]
    for source in (tmp_path / "gone", tmp_path / "file"):
        for extra in ([], pin):
            r = vf("verify", source, *extra)
            assert (r.returncode, r.stdout, r.stderr.decode()) == (
                1, b"", f"ERROR: '{source}' is not a directory\n")


def test_a_default_store_planted_as_a_symlink_is_refused(tmp_path):
    """SOURCE/.verityfuse planted as a symlink by whoever can write in SOURCE: seal and
    verify used to follow it out of SOURCE (root's seal wrote VERSION, objects/ and
    inodes/ there, and its tmp/ cleanup unlinked the target's tmp/<digits>.* files).
    The mount refuses it; so do they, and nothing in the target changes."""
    src, victim = tmp_path / "src", tmp_path / "victim"
    src.mkdir()
    (victim / "tmp").mkdir(parents=True)
    (src / "file").write_bytes(b"data")
    (victim / "tmp" / "4000000.backup").write_bytes(b"precious")
    os.symlink(victim, src / ".verityfuse")
    runs = [vf("seal", src), vf("seal", src, "--manifest", tmp_path / "M", "--unsigned"),
            vf("verify", src)]
    for r in runs:
        assert r.returncode == 1, r
        assert (f"store {src}/.verityfuse: a symlink or not a directory (refused as SOURCE's "
                f"own store; name the store's own path with --store)").encode() in r.stderr, r
        assert b"Traceback" not in r.stderr
    assert sorted(os.listdir(victim)) == ["tmp"]
    assert os.listdir(victim / "tmp") == ["4000000.backup"]
    # The same directory named with --store is the user's choice, followed as named.
    r = vf("seal", src, "--store", src / ".verityfuse")
    assert r.returncode == 0, r.stderr
    assert (victim / "VERSION").exists()


def test_a_file_that_cannot_be_placed_in_the_store_is_named_there(tmp_path):
    """A directory where a tree object goes (planted, or left by a bad tool): publishing
    failed with 'ERROR: 5232.38bd5a9ae2670-1: Is a directory', the staged file's tmp/ name,
    which says nothing of where.  The error names the object's place in the store, with
    the native renames and without."""
    src, store = tmp_path / "src", tmp_path / "store"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 5000)  # two blocks: a tree object
    r = vf("digest", src / "f")
    hexd = r.stdout.decode().split()[0].split(":")[1]
    assert vf("seal", src, "--store", store, "--manifest", tmp_path / "M0").returncode == 0
    obj = store / "objects" / "sha256" / hexd[:2] / hexd
    obj.unlink()
    obj.mkdir()
    (obj / "x").touch()  # not empty: a rename over it fails
    for pure in ("", "1"):
        os.environ["VERITYFUSE_PURE_PYTHON"] = pure
        try:
            r = vf("seal", src, "--store", store, "--manifest", tmp_path / "M")
        finally:
            del os.environ["VERITYFUSE_PURE_PYTHON"]
        assert r.returncode == 1, r
        assert r.stderr.decode().splitlines()[-1] == f"ERROR: {obj}: Is a directory", r.stderr
