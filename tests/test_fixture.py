"""The ``verified_mount`` pytest fixture, run inside pytester sessions: a failing test
gets the daemon's log in its report, a passing one leaves no log file, and where
FUSE cannot be used the test is skipped with the reason instead of erroring."""

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from verityfuse import mountinfo, testing
from verityfuse.testing import VerifiedMount, fuse_unavailable_reason, mount_denied, seal_tree

pytest_plugins = ["pytester"]

REASON = fuse_unavailable_reason()
needs_fuse = pytest.mark.skipif(REASON is not None, reason=f"FUSE is not usable here: {REASON}")

# An inner test suite: it records its mounts' log files in logs.txt (cwd is pytester's dir).
INNER = '''
import os

def record(m):
    with open("logs.txt", "a") as f:
        f.write(str(m.log_path) + "\\n")

def test_reads(verified_mount, tmp_path):
    src = tmp_path / "src"; src.mkdir()
    (src / "config").write_text("{}")
    m = verified_mount(src)
    record(m)
    assert (m.mountpoint / "config").read_text() == "{}"

def test_app_fails_on_tampered_data(verified_mount, tmp_path):
    src = tmp_path / "src"; src.mkdir()
    (src / "blob").write_bytes(b"a" * 8192)
    m = verified_mount(src)
    record(m)
    with open(src / "blob", "r+b") as f:   # behind the daemon's back, never read before
        f.write(b"b")
    try:
        (m.mountpoint / "blob").read_bytes()
    except OSError:
        pass
    assert False, "the application failed"
'''


def logs_recorded(pytester):
    return [line for line in (pytester.path / "logs.txt").read_text().splitlines() if line]


@pytest.mark.mount
@needs_fuse
def test_failure_report_has_the_daemon_log_and_no_log_file_remains(pytester):
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    # exactly the failed test's mount gets a section, with its integrity failure
    assert out.count("verityfuse daemon log (") == 1
    result.stdout.fnmatch_lines([
        "*_ test_app_fails_on_tampered_data _*",
        "*- verityfuse daemon log (*/mnt*) -*",
        "*integrity failure: blob: data block at offset 0: expected hash *",
    ])
    logs = logs_recorded(pytester)
    assert len(logs) == 2
    for log in logs:
        assert not os.path.exists(log), log


@pytest.mark.mount
@needs_fuse
def test_passing_run_shows_no_log_and_leaves_no_file(pytester):
    pytester.makepyfile(test_inner=INNER.split("def test_app_fails")[0])
    result = pytester.runpytest("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=1)
    assert "verityfuse daemon log" not in result.stdout.str()
    log, = logs_recorded(pytester)
    assert not os.path.exists(log)


def test_no_fuse_device_skips_with_the_reason(pytester):
    # The seam: the device the detection checks (a module attribute).
    pytester.makeconftest('''
import pytest
from verityfuse import testing

@pytest.fixture(autouse=True)
def no_fuse(monkeypatch):
    monkeypatch.setattr(testing, "FUSE_DEVICE", "/nonexistent/fuse")
''')
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["SKIPPED *FUSE is not usable here: /nonexistent/fuse does not exist*"])
    assert not (pytester.path / "logs.txt").exists()


@pytest.mark.mount
def test_mount_refused_for_lack_of_permission_skips(pytester):
    """A real mount refused by the kernel: in a user namespace, root there may open
    /dev/fuse, but fusermount3 may not mount (no mount namespace of its own).  The
    detection cannot tell beforehand; the failed mount becomes a skip."""
    if REASON is not None:
        pytest.skip(f"FUSE is not usable here: {REASON}")
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--user", "--map-root-user", "true"],
                                         capture_output=True).returncode != 0:
        pytest.skip("user namespaces are not available (unshare --user)")
    pytester.makepyfile(test_inner=INNER.split("def test_app_fails")[0])
    result = pytester.run(unshare, "--user", "--map-root-user", sys.executable, "-m", "pytest",
                          "-p", "no:cacheprovider", "-rs", f"--basetemp={pytester.path / 'tmp'}",
                          str(pytester.path / "test_inner.py"), timeout=120)
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED *mounting FUSE is not permitted here: fusermount3: "
                                 "mount failed: Operation not permitted*"])


# -- the detection and the helpers, directly --------------------------------------------


def test_detection(monkeypatch, tmp_path):
    monkeypatch.setattr(testing, "FUSE_DEVICE", str(tmp_path / "none"))
    assert "does not exist" in fuse_unavailable_reason()
    monkeypatch.setattr(testing, "FUSE_DEVICE", str(tmp_path))  # a directory: EISDIR
    assert fuse_unavailable_reason().startswith(f"cannot open {tmp_path} as uid")
    (tmp_path / "dev").write_bytes(b"")
    monkeypatch.setattr(testing, "FUSE_DEVICE", str(tmp_path / "dev"))
    monkeypatch.setattr(testing, "FUSERMOUNT", "no-such-fusermount")
    assert fuse_unavailable_reason() == "no-such-fusermount is not installed (Debian package fuse3)"
    helper = tmp_path / "fusermount-plain"
    helper.write_text("#!/bin/sh\n")
    helper.chmod(0o755)
    monkeypatch.setattr(testing, "FUSERMOUNT", str(helper))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert fuse_unavailable_reason() == (f"{helper} is not setuid root, and this process "
                                         f"(uid 1000) is not root")
    if os.getuid() == 0:
        helper.chmod(0o755 | stat.S_ISUID)
        assert fuse_unavailable_reason() is None


@pytest.mark.parametrize("stderr,denied", [
    ("fusermount3: mount failed: Operation not permitted\nERROR: cannot mount 'a' on 'b': "
     "fuse_session_mount failed\n", "fusermount3: mount failed: Operation not permitted"),
    ("fuse: failed to open /dev/fuse: Permission denied\n",
     "fuse: failed to open /dev/fuse: Permission denied"),
    ("fuse: device not found, try 'modprobe fuse' first\n",
     "fuse: device not found, try 'modprobe fuse' first"),
    ("fusermount3: option allow_other only allowed if 'user_allow_other' is set in "
     "/etc/fuse.conf\n", "fusermount3: option allow_other only allowed if 'user_allow_other' is "
     "set in /etc/fuse.conf"),
    # not about FUSE permissions: a real failure, not a skip
    ("ERROR: refusing to mount: Permission denied: src/.verityfuse\n", None),
    ("ERROR: mount point 'm' is inside the source 's'\n", None),
])
def test_mount_denied(stderr, denied):
    assert mount_denied(stderr) == denied


def test_failed_mount_is_a_runtime_error_and_removes_its_log(tmp_path, monkeypatch):
    src, mnt, tmp = tmp_path / "src", tmp_path / "src" / "mnt", tmp_path / "tmp"
    mnt.mkdir(parents=True)
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # where VerifiedMount's log goes
    with pytest.raises(RuntimeError) as e:
        VerifiedMount(src, mnt)
    assert not isinstance(e.value, testing.FuseUnavailable)
    assert "is inside the source" in str(e.value)
    assert os.listdir(tmp) == []


@pytest.mark.mount
@needs_fuse
def test_verified_mount_keeps_its_log_text_and_removes_the_file(tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "a").write_bytes(b"data")
    seal_tree(src)
    with VerifiedMount(src, mnt, extra_args=["--debug"]) as m:
        assert (mnt / "a").read_bytes() == b"data"
        assert m.log_path.exists()
    assert not m.log_path.exists()
    assert m.log() != "" and m.unmount() == 0  # idempotent; the text stays


def _tree(path, data):
    path.mkdir()
    (path / "a").write_bytes(data)
    seal_tree(path)
    return path


@pytest.mark.mount
@needs_fuse
def test_a_mount_whose_daemon_died_is_removed_all_the_same(tmp_path):
    """A daemon killed mid-test left its mount behind: os.path.ismount says False for a
    FUSE mount whose daemon is gone (its stat fails, ENOTCONN), so no unmount ran."""
    src, mnt = _tree(tmp_path / "src", b"data"), tmp_path / "mnt"
    mnt.mkdir()
    m = VerifiedMount(src, mnt)
    m.process.kill()
    m.process.wait(10)
    assert mountinfo.devices(str(mnt))  # still listed, daemon gone
    assert m.unmount() == -9
    assert mountinfo.devices(str(mnt)) == []


@pytest.mark.mount
@needs_fuse
def test_a_mount_of_a_mount_is_ready_when_it_is_there_and_goes_first(tmp_path):
    """A mount point that is one already: the second mount was 'ready' at once, and its
    test read the first one's files.  Torn down in reverse, both go, the lower last."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lower = VerifiedMount(_tree(tmp_path / "a", b"A"), mnt)
    try:
        upper = VerifiedMount(_tree(tmp_path / "b", b"B"), mnt)
        try:
            assert (mnt / "a").read_bytes() == b"B"
            assert len(mountinfo.devices(str(mnt))) == 2
        finally:
            assert upper.unmount() == 0
        assert (mnt / "a").read_bytes() == b"A"
    finally:
        assert lower.unmount() == 0
    assert mountinfo.devices(str(mnt)) == []


@pytest.mark.mount
@needs_fuse
def test_a_forked_child_leaves_the_parents_mount_alone(tmp_path):
    """A child forked by a test that runs the teardown too (it returns into pytest)
    unmounted the parent's mount and removed its log."""
    src, mnt = _tree(tmp_path / "src", b"data"), tmp_path / "mnt"
    mnt.mkdir()
    with VerifiedMount(src, mnt) as m:
        pid = os.fork()
        if pid == 0:
            try:
                m.unmount()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert (mnt / "a").read_bytes() == b"data" and m.log_path.exists()
    assert mountinfo.devices(str(mnt)) == []


@pytest.mark.mount
@needs_fuse
def test_a_mount_goes_with_the_process_that_made_it_even_killed(tmp_path):
    """The test process killed outright (SIGKILL: a CI job cancelled, the OOM killer) ran
    no teardown, and its daemon and mount stayed for good.  The daemon's stdin is a pipe
    only that process held: at its EOF the daemon unmounts and exits."""
    src, mnt = _tree(tmp_path / "src", b"data"), tmp_path / "mnt"
    mnt.mkdir()
    script = (f"import os, sys; from verityfuse.testing import VerifiedMount\n"
              f"m = VerifiedMount({str(src)!r}, {str(mnt)!r}, log_file={str(tmp_path / 'log')!r})\n"
              f"print(m.pid, flush=True); os.kill(os.getpid(), 9)\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.returncode == -9, p.stderr
    daemon = int(p.stdout)
    for _ in range(200):  # the daemon's own unmount: a few tens of milliseconds
        if not mountinfo.devices(str(mnt)) and not os.path.exists(f"/proc/{daemon}"):
            break
        time.sleep(0.05)
    gone = not mountinfo.devices(str(mnt))
    if not gone:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
    assert gone, (tmp_path / "log").read_text()
    assert "stdin closed (the process that started this mount is gone): unmounting" in \
        (tmp_path / "log").read_text()


def _inner_session(pytester, source: str, **outcomes) -> str:
    """Run the tests of ``source`` in a pytest session of their own; check its
    ``outcomes`` (assert_outcomes' counts) and give its output."""
    pytester.makepyfile(test_inner=source)
    result = pytester.runpytest("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(**outcomes)
    return result.stdout.str()


ERRORS = '''
import pytest

def mount_and_log(verified_mount, tmp_path, line):
    src = tmp_path / "src"; src.mkdir()
    (src / "a").write_bytes(b"a")
    m = verified_mount(src)
    with open(m.log_path, "a") as f:  # as the daemon would write it
        f.write(line + "\\n")

def test_error_line(verified_mount, tmp_path):
    mount_and_log(verified_mount, tmp_path, "2026-12-05 verityfuse[7] ERROR: cannot measure x")

def test_traceback(verified_mount, tmp_path):
    mount_and_log(verified_mount, tmp_path, "Traceback (most recent call last):")

@pytest.mark.daemon_errors(r"cannot measure")
def test_expected_error_line(verified_mount, tmp_path):
    mount_and_log(verified_mount, tmp_path, "2026-12-05 verityfuse[7] ERROR: cannot measure x")

def test_warning_is_fine(verified_mount, tmp_path):
    mount_and_log(verified_mount, tmp_path, "2026-12-05 verityfuse[7] WARNING: integrity failure")
'''


@pytest.mark.mount
@needs_fuse
def test_unexpected_error_lines_in_a_daemon_log_fail_the_test(pytester):
    out = _inner_session(pytester, ERRORS, passed=4, errors=2)
    assert "ERROR at teardown of test_error_line" in out
    assert "ERROR at teardown of test_traceback" in out
    assert "logged what this test did not expect" in out and "ERROR: cannot measure x" in out


EXITS = '''
import os, signal
import pytest

def mounted(verified_mount, tmp_path):
    src = tmp_path / "src"; src.mkdir()
    (src / "a").write_bytes(b"a")
    return verified_mount(src)

def test_daemon_killed(verified_mount, tmp_path):
    m = mounted(verified_mount, tmp_path)
    m.process.send_signal(signal.SIGKILL)
    m.process.wait(10)

def test_daemon_exits_3_after_its_unmount(verified_mount, tmp_path, monkeypatch):
    import sys
    from verityfuse.testing import VerifiedMount
    # A daemon that serves, and fails as it stops (exit status 3).
    monkeypatch.setattr(VerifiedMount, "command", (sys.executable, "-c",
        "import sys; from verityfuse.cli import main; main(sys.argv[1:]); sys.exit(3)"))
    assert (mounted(verified_mount, tmp_path).mountpoint / "a").read_bytes() == b"a"

@pytest.mark.daemon_exit
def test_expected_kill(verified_mount, tmp_path):
    m = mounted(verified_mount, tmp_path)
    m.process.kill()
    m.process.wait(10)

def test_unmounted_by_the_test(verified_mount, tmp_path):
    m = mounted(verified_mount, tmp_path)
    assert m.unmount() == 0

def test_left_running(verified_mount, tmp_path):
    assert (mounted(verified_mount, tmp_path).mountpoint / "a").read_bytes() == b"a"
'''


@pytest.mark.mount
@needs_fuse
def test_a_daemon_that_exits_during_the_test_fails_it(pytester):
    """A daemon that died during a test (a crash, a kill the test did not announce) failed
    nothing: the fixture unmounted the remains and the test passed."""
    out = _inner_session(pytester, EXITS, passed=5, errors=2)
    assert "ERROR at teardown of test_daemon_killed" in out
    assert "ERROR at teardown of test_daemon_exits_3_after_its_unmount" in out
    assert "exited during the test with status -9" in out and "exited after its unmount with status 3" in out
    assert "mark the test @pytest.mark.daemon_exit" in out
