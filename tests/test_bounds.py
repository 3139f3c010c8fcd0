"""Bounded resources per user (issue 16 items 6 and 7).

One unprivileged user (``-o allow_other``) opening one file until refused must
not take the daemon's file descriptors from everyone else: the refusal is
EMFILE (never EIO), root's open of another file still works, and nothing is
logged or counted as an integrity failure.  The daemon runs under a small
RLIMIT_NOFILE (prlimit) so that the limit is reached in a few hundred opens.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from verityfuse.testing import VerifiedMount, fuse_unavailable_reason

from conftest import write

pytestmark = pytest.mark.mount
NOBODY = 65534
PRLIMIT = shutil.which("prlimit")


class LimitedMount(VerifiedMount):
    """A daemon started with 256 file descriptors (soft and hard)."""

    command = (PRLIMIT or "prlimit", "--nofile=256", sys.executable, "-m", "verityfuse.cli")


def vf(*args):
    r = subprocess.run([sys.executable, "-m", "verityfuse.cli", *map(str, args)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture
def share():
    """SOURCE and MOUNTPOINT under a directory every user can traverse."""
    if fuse_unavailable_reason() or PRLIMIT is None or os.geteuid() != 0:
        pytest.skip("needs FUSE, prlimit and root (a second uid)")
    d = Path(tempfile.mkdtemp(prefix="verityfuse-bounds-", dir="/tmp"))
    os.chmod(d, 0o755)
    (d / "src").mkdir()
    (d / "mnt").mkdir()
    write(d / "src" / "a", b"a" * 10000)
    write(d / "src" / "b", b"b" * 10000)
    for f in ("a", "b"):
        os.chmod(d / "src" / f, 0o644)
    mounts = []
    yield d, mounts
    for m in mounts:
        m.unmount()
    shutil.rmtree(d, ignore_errors=True)


def mount(d, mounts, mode, options=(), cls=LimitedMount):
    src = d / "src"
    if mode == "manifest":
        vf("seal", src, "--manifest", d / "m.json")
        digest = vf("measure-manifest", d / "m.json").split()[0]
        extra = ["--manifest", str(d / "m.json"), "--manifest-digest", digest]
    else:
        vf("seal", src, src / "a", src / "b")
        extra = []
    m = cls(src, d / "mnt", options=["allow_other", *options], extra_args=extra,
            log_file=d / "log")
    mounts.append(m)
    return m


def open_until_refused(path, uid=NOBODY):
    """A child as ``uid`` opens ``path`` until refused and keeps every fd open;
    returns (how many opens worked, the errno of the refusal, a function that ends it)."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only os calls, then _exit
        code = 1
        try:
            os.close(r)
            os.close(go_w)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            fds = []
            err = 0
            try:
                while len(fds) < 5000:
                    fds.append(os.open(path, os.O_RDONLY))
            except OSError as e:
                err = e.errno
            os.write(w, f"{len(fds)} {err}\n".encode())
            os.read(go_r, 1)  # hold every fd until the parent is done
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    os.close(go_r)
    with os.fdopen(r) as f:
        line = f.readline()

    def end():
        os.close(go_w)
        os.waitpid(pid, 0)

    try:
        n, err = map(int, line.split())
    except ValueError:
        end()
        raise AssertionError(f"the child reported {line!r}")
    return n, err, end


def status(mnt):
    return json.loads(os.getxattr(mnt, "user.verityfuse.status"))


@pytest.mark.parametrize("mode", ["manifest", "local"])
def test_one_user_cannot_take_every_file_descriptor(share, mode):
    d, mounts = share
    m = mount(d, mounts, mode)
    n, err, end = open_until_refused(str(d / "mnt" / "a"))
    try:
        assert (err, errno.errorcode.get(err)) == (errno.EMFILE, "EMFILE"), n
        # Everyone else still opens and reads (root here), and the daemon's own work
        # (its status, a lookup of a new name) still has descriptors.
        assert (d / "mnt" / "b").read_bytes() == b"b" * 10000
        assert (d / "mnt" / "a").read_bytes() == b"a" * 10000
        st = status(d / "mnt")
    finally:
        end()
    assert (st["integrity_failures"], st["failures"]) == (0, [])
    assert "integrity failure" not in m.log()
    assert "ERROR" not in m.log()
    assert (d / "mnt" / "a").read_bytes() == b"a" * 10000  # the handles were all released


def test_max_handles_per_uid_counts_files_and_directories(share):
    d, mounts = share
    mount(d, mounts, "local", options=["max_handles_per_uid=7"], cls=VerifiedMount)
    mnt = d / "mnt"
    dirs = [os.open(mnt, os.O_RDONLY | os.O_DIRECTORY) for _ in range(3)]
    try:
        # root holds 3 directories: its share, not nobody's
        n, err, end = open_until_refused(str(mnt / "a"))
        end()
        assert (n, err) == (7, errno.EMFILE)
        files = [os.open(mnt / "b", os.O_RDONLY) for _ in range(4)]
        with pytest.raises(OSError) as e:
            os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        assert e.value.errno == errno.EMFILE
        for fd in files:
            os.close(fd)
    finally:
        for fd in dirs:
            os.close(fd)
    assert "uid 65534 holds 7 open handles (max_handles_per_uid): refusing more with EMFILE" \
        in mounts[0].log()


# -- resource errors are never corruption (in-process, a low fd limit) -------------


def _views(tmp_path, mode):
    from verityfuse import manifest
    from verityfuse.store import Store
    from verityfuse.verifier import TreeBlockCache

    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b"):
        write(src / name, name.encode() * 10000)
    if mode == "manifest":
        from verityfuse.view_manifest import ManifestView

        vf("seal", src, "--manifest", tmp_path / "m.json")
        digest = vf("measure-manifest", tmp_path / "m.json").split()[0]
        m = manifest.load(str(tmp_path / "m.json"), (), digest)
        store = Store(str(src / ".verityfuse"), objects_only=True, in_share=True)
        view = ManifestView(str(src), m.tree, store, TreeBlockCache(), m.digest)
    else:
        from verityfuse.view_local import LocalView

        vf("seal", src, src / "a", src / "b")
        store = Store(str(src / ".verityfuse"))
        view = LocalView(str(src), store, TreeBlockCache())
    return view, store


@pytest.mark.parametrize("mode", ["manifest", "local"])
def test_running_out_of_fds_is_emfile_never_corruption(tmp_path, mode):
    """An open that runs out of fds (the share's file, the store's directories, the
    tree object: wherever it happens) fails with EMFILE, and the file opens again
    once fds are free: nothing is taken for, or remembered as, corruption."""
    import resource

    from verityfuse.errors import VerityError

    view, store = _views(tmp_path, mode)
    ino = view.lookup(1, b"a").ino
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    handles, errs = [], set()
    try:
        # Every limit from "the first fd an open needs" to "the last": each of the
        # open's steps is the one that fails once.
        base = len(os.listdir("/proc/self/fd"))
        for limit in range(base, base + 12):
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
            try:
                handles.append(view.open(ino, os.O_RDONLY))
            except VerityError as e:
                raise AssertionError(f"limit {limit}: {type(e).__name__}: {e}") from None
            except OSError as e:
                errs.add(e.errno)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for h in handles:
                view.release(h)
            handles.clear()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for h in handles:
            view.release(h)
    assert errs == {errno.EMFILE}
    h = view.open(ino, os.O_RDONLY)
    try:
        assert h.reader.read(0, 10000) == b"a" * 10000
    finally:
        view.release(h)
        view.close()
        store.close()


@pytest.mark.parametrize("mode", ["manifest", "local"])
def test_handles_of_one_file_share_one_tree_fd(tmp_path, mode):
    view, store = _views(tmp_path, mode)
    ino = view.lookup(1, b"a").ino
    before = len(os.listdir("/proc/self/fd"))
    handles = [view.open(ino, os.O_RDONLY) for _ in range(50)]
    try:
        assert len(os.listdir("/proc/self/fd")) - before == 50 + 1  # one backing fd each, one tree
        trees = {h.closers[0].fd for h in handles}
        assert len(trees) == 1
    finally:
        for h in handles[:-1]:
            view.release(h)
    assert handles[-1].reader.read(0, 10000) == b"a" * 10000  # the last one still reads
    view.release(handles[-1])
    assert len(os.listdir("/proc/self/fd")) == before
    view.close()
    store.close()
