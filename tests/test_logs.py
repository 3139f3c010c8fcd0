"""The daemon's log: integrity failures cannot be hidden by a flood of other lines,
and a file name cannot forge a line (issue 16 items 4 and 5).

In-process against the rate limiter (a clock the test turns), then through real
mounts: a flood of refused creates, a hostile file name read corrupt and enabled.
"""

import errno
import json
import logging
import os
import subprocess
import stat
import sys
import time

import pytest

from verityfuse import logs
import privns
from conftest import FSVERITY, flip, write


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.INFO, logger="verityfuse")
    return lambda: [r.getMessage() for r in caplog.records]


def test_a_flood_of_other_lines_cannot_hide_an_integrity_failure(lines):
    clock = Clock()
    rl = logs.RateLimitedLog(clock=clock)
    for i in range(740):
        rl.warning(None, f"policy require: refusing to create f{i}")
    for _ in range(7):  # the same block read 7 times: one line
        rl.integrity(("IntegrityError", "m"), "integrity failure: m")
    assert lines() == [f"policy require: refusing to create f{i}" for i in range(20)] + \
        ["integrity failure: m"]
    clock.t += 1
    rl.integrity(("IntegrityError", "m"), "integrity failure: m")  # logged before
    assert lines()[21:] == [
        "rate limit: 720 request-triggered log lines suppressed in one second (at most 20 a "
        "second), the first: policy require: refusing to create f20"]
    rl.warning(None, "policy require: refusing to create g")
    assert lines()[22:] == ["policy require: refusing to create g"]


def test_a_line_over_budget_is_written_when_it_recurs(lines):
    clock = Clock()
    rl = logs.RateLimitedLog(integrity_per_sec=2, clock=clock)
    for k in "abcc":
        rl.integrity(k, f"integrity failure: {k}")
    assert lines() == ["integrity failure: a", "integrity failure: b"]
    clock.t += 1
    for k in "abc":
        rl.integrity(k, f"integrity failure: {k}")
    assert lines()[2:] == [
        "rate limit: 2 integrity-failure log lines suppressed in one second (at most 2 a "
        "second), the first: integrity failure: c",
        "integrity failure: c"]


HOSTILE = "x\n2026-12-05 01:00:00,000 verityfuse[1] WARNING: integrity failure: forged"
HOSTILE_ESCAPED = "x\\n2026-12-05 01:00:00,000 verityfuse[1] WARNING: integrity failure: forged"


@pytest.mark.parametrize("name, escaped", [
    ("plain name.txt", "plain name.txt"),
    (HOSTILE, HOSTILE_ESCAPED),
    ("a\\nb", "a\\\\nb"),  # a literal backslash sequence stays distinguishable
    ("cr\r\ttab\x1b[31m\x7f\x85", "cr\\r\\ttab\\x1b[31m\\x7f\\x85"),
    ("sep\u2028\u2029", "sep\\u2028\\u2029"),
    (b"bytes\xff\n", "bytes\\xff\\n"),   # not UTF-8: the byte itself
    ("Ünïcode ok", "Ünïcode ok"),
])
def test_escape(name, escaped):
    assert logs.escape(name) == escaped
    assert logs.one_line(escaped) == escaped


def test_every_record_is_one_line(tmp_path):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup(False, str(tmp_path / "log"))
        logging.getLogger("verityfuse").warning("unescaped %s here", HOSTILE)
        for h in root.handlers:
            h.close()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    text = (tmp_path / "log").read_text()
    assert text.count("\n") == 1 and text.endswith(f"WARNING: unescaped {HOSTILE_ESCAPED} here\n")


def test_a_reply_no_one_waits_for_is_no_error(tmp_path):
    """pyfuse3 logged "fuse_release(): fuse_reply_* failed with No such file or directory"
    as an ERROR when a release came as the mount went away (the kernel no longer waits:
    ENOENT), which failed a test's log check now and then.  Kept with --debug; any other
    failed reply stays an error."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("pyfuse3").level
    pyfuse3_log = logging.getLogger("pyfuse3")
    try:
        for debug in (False, True):
            pyfuse3_log.setLevel(logging.NOTSET)  # as in a new daemon
            logs.setup(debug, str(tmp_path / f"log{debug}"))
            for err in (errno.ENOENT, errno.ENOSPC):
                pyfuse3_log.error("fuse_release(): fuse_reply_* failed with %s", os.strerror(err))
            for h in root.handlers:
                h.close()
    finally:
        root.handlers[:], level, pyfuse3_level = saved
        root.setLevel(level)
        pyfuse3_log.setLevel(pyfuse3_level)
    lines = {d: [ln.split("] ", 1)[1] for ln in (tmp_path / f"log{d}").read_text().splitlines()]
             for d in (False, True)}
    assert lines[False] == ["ERROR: fuse_release(): fuse_reply_* failed with No space left on device"]
    assert lines[True] == ["DEBUG: fuse_release(): fuse_reply_* failed with No such file or directory",
                           "ERROR: fuse_release(): fuse_reply_* failed with No space left on device"]


# -- through a mount --------------------------------------------------------------


def _integrity_lines(log):
    return [ln for ln in log.splitlines() if "integrity failure" in ln]


@pytest.mark.mount
def test_integrity_failure_is_logged_during_a_flood_of_refused_creates(tmp_path, verified_mount):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "bad.bin", b"b" * 8192)
    m = verified_mount(src, policy="require")
    flip(src / "bad.bin", 5000)
    mnt = m.mountpoint
    for round_ in range(3):
        for i in range(300):  # refused creates: one log line each, far over 20 a second
            with pytest.raises(PermissionError):
                os.close(os.open(mnt / f"n{round_}-{i}", os.O_CREAT | os.O_WRONLY, 0o644))
        with open(mnt / "bad.bin", "rb") as f:
            with pytest.raises(OSError) as e:
                f.read()
        assert e.value.errno == errno.EIO
    (line,) = _integrity_lines(m.log())  # once, however many reads ran into it
    assert "WARNING: integrity failure: bad.bin: data block at offset 4096: expected hash " in line
    time.sleep(1.1)  # a new second: the next line says what the last one suppressed
    with pytest.raises(PermissionError):
        os.close(os.open(mnt / "last", os.O_CREAT | os.O_WRONLY, 0o644))
    summaries = [ln for ln in m.log().splitlines() if "rate limit:" in ln]
    assert summaries and all(
        "request-triggered log lines suppressed in one second (at most 20 a second), the "
        "first: policy require: refusing to create n" in ln for ln in summaries), summaries


@pytest.mark.mount
def test_a_hostile_file_name_cannot_forge_a_log_line(tmp_path, verified_mount):
    if FSVERITY is None:
        pytest.skip("fsverity-utils is not installed")
    src = tmp_path / "src"
    src.mkdir()
    write(src / HOSTILE, b"h" * 8192)
    m = verified_mount(src)
    flip(src / HOSTILE, 100)
    mnt = m.mountpoint
    with open(mnt / HOSTILE, "rb") as f:
        with pytest.raises(OSError) as e:
            f.read()
    assert e.value.errno == errno.EIO
    enabled = "y\r\nverity enabled on z"
    write(mnt / enabled, b"e" * 100)
    r = subprocess.run([FSVERITY, "enable", str(mnt / enabled)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    log = m.log()
    assert [ln for ln in log.splitlines() if "2026-12-05 01:00:00,000" in ln] == \
        _integrity_lines(log)
    (line,) = _integrity_lines(log)
    assert f"WARNING: integrity failure: {HOSTILE_ESCAPED}: data block at offset 0: " \
           f"expected hash " in line
    (line,) = [ln for ln in log.splitlines() if "verity enabled on" in ln]
    assert "INFO: verity enabled on y\\r\\nverity enabled on z: sha256:" in line
    # The status JSON keeps the name exact (JSON escapes control characters itself;
    # `verityfuse status` escapes names for a terminal, as test_operability checks).
    raw = os.getxattr(mnt, "user.verityfuse.status")
    assert b"\n" not in raw and b"\x1b" not in raw
    (failure,) = json.loads(raw)["failures"]  # one failing block
    assert (failure["file"], failure["offset"]) == (HOSTILE, 0)
    assert failure["message"].startswith(f"{HOSTILE}: data block at offset 0: ")


# -- a mount never fails for want of a log file (issue 17 item 5) -------------------

VF = [sys.executable, "-m", "verityfuse.cli"]


@pytest.mark.mount
@pytest.mark.parametrize("run_writable", [True, False], ids=["run-writable", "run-read-only"])
def test_a_read_only_var_log_never_refuses_a_mount(tmp_path, run_writable):
    """No /dev/log, no journal, /var/log read-only (a private mount namespace: the
    machine's /var/log and /run are never touched): the mount works and logs to
    /run/verityfuse, else to its stderr, says where and why, and an integrity failure
    is in that log."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    write(src / "sealed", b"s" * 8192)
    assert subprocess.run([*VF, "seal", src, src / "sealed"], capture_output=True).returncode == 0
    name = f"{str(mnt).strip('/').replace('/', '-')}.log"
    with privns.private_mounts() as mount, open(tmp_path / "stderr", "w+") as err:
        mount("-t", "tmpfs", "-o", "ro,mode=755", "tmpfs", "/var/log")
        mount("-t", "tmpfs", "-o", f"{'rw' if run_writable else 'ro'},mode=755", "tmpfs", "/run")
        if os.path.lexists("/dev/log"):
            mount("--bind", "/dev/null", "/dev/log")  # not a socket: no syslog
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        try:
            r = subprocess.run([*VF, "mount", src, mnt], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=err, env=env)
            assert r.returncode == 0, (tmp_path / "stderr").read_text()
            flip(src / "sealed", 5)
            with pytest.raises(OSError) as e:
                (mnt / "sealed").read_bytes()
            assert e.value.errno == errno.EIO
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        ro = f"cannot write /var/log/verityfuse/{name}: Read-only file system"
        text = (tmp_path / "stderr").read_text()
        if run_writable:
            assert text == (f"verityfuse: logs go to file /run/verityfuse/{name} (no /dev/log, "
                            f"no journal; {ro})\n")
            log = open(f"/run/verityfuse/{name}").read()
        else:
            said = (f"verityfuse: logs go to stderr (no /dev/log, no journal; {ro}; "
                    f"cannot write /run/verityfuse/{name}: Read-only file system)")
            # The mount says it once; the daemon's lines (one before it) are the log.
            assert [ln for ln in text.splitlines() if ln.startswith("verityfuse:")] == [said]
            log = text
    assert "WARNING: integrity failure: sealed: data block at offset 0: expected hash" in log
    assert f"INFO: serving {src} on {mnt}" in log


def test_syslog_lines_name_the_mount(tmp_path):
    """Every syslog line carries the mount point (escaped): one syslog serves every mount."""
    import socket

    sock_path = tmp_path / "log"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(sock_path))
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        with privns.private_mounts() as mount:
            # This process's own /dev, with /dev/log our socket (a symlink to it).
            mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", "/dev")
            os.symlink(sock_path, "/dev/log")
            where = logs.setup(False, background=True, mountpoint="/srv/a\nb%s")
            logging.getLogger("verityfuse").warning("integrity failure: x")
            for h in root.handlers:
                h.close()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert where == "syslog (/dev/log)"
    server.settimeout(5)
    line = server.recv(4096).decode()
    server.close()
    assert line.endswith("verityfuse[%d]: /srv/a\\nb%%s: WARNING: integrity failure: x\x00"
                         % os.getpid())
    assert line.startswith("<28>")  # LOG_DAEMON (3) * 8 + LOG_WARNING (4): it was LOG_USER's <12>


def test_a_log_file_is_never_written_through_a_symlink_and_is_0640(tmp_path):
    """--log-file was opened as logging.FileHandler opens: through a symlink planted in its
    place (root's daemon then appended wherever it pointed) and with the umask's mode (0666
    under umask 000).  Now O_NOFOLLOW, and 0640 whatever the umask (found by review, s43)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, tmp_path / "planted")
    old = os.umask(0)
    try:
        with pytest.raises(OSError, match=f"cannot write the log file {tmp_path}/planted: "):
            logs.setup(False, str(tmp_path / "planted"))
        logs.setup(False, str(tmp_path / "log"))
        logging.getLogger("verityfuse").warning("a line")
        for h in root.handlers:
            h.flush()
    finally:
        os.umask(old)
        root.handlers[:], level = saved
        root.setLevel(level)
    assert victim.read_text() == "precious\n"
    assert stat.S_IMODE(os.stat(tmp_path / "log").st_mode) == 0o640
    assert (tmp_path / "log").read_text().endswith("WARNING: a line\n")


def test_a_log_file_that_is_a_fifo_is_refused_without_waiting(tmp_path):
    """A FIFO planted at --log-file: an open for writing would wait for a reader (the
    daemon hung before it mounted), and with one it would feed the reader every line.
    Refused both ways, at once, naming the file."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, for the second try
    os.close(reader)
    try:
        with pytest.raises(OSError, match=f"cannot write the log file {fifo}: "):
            logs.setup(False, str(fifo))  # no reader: ENXIO, not a wait
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            with pytest.raises(OSError, match=f"cannot write the log file {fifo}: "
                                              f"not a regular file"):
                logs.setup(False, str(fifo))
            logging.getLogger("verityfuse").warning("a line")
            assert os.read(reader, 1) == b""  # nothing reached it (its writer is gone)
        finally:
            os.close(reader)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_a_fallback_log_is_named_within_name_max_and_in_one_printable_line():
    """The mount point flattened whole: past 255 bytes (a kubelet volume path) both the
    /var/log and the /run file failed (ENAMETOOLONG) and the daemon logged to the mount
    command's stderr, lost with its terminal; a newline or ESC went into the file name
    raw (found by review, s43)."""
    deep = "/var/lib/kubelet/pods/" + "0123456789abcdef" * 12 + "/volumes/verity~x/vol"
    a, b = logs.fallback_log_file(deep + "1"), logs.fallback_log_file(deep + "2")
    assert a != b and len(os.path.basename(a).encode()) <= 255
    assert os.path.basename(a).startswith("var-lib-kubelet-pods-0123456789abcdef")
    assert os.path.basename(logs.fallback_log_file("/srv/app")) == "srv-app.log"
    assert os.path.basename(logs.runtime_log_file("/m\nnl/\x1b[31m")) == "m\\nnl-\\x1b[31m.log"
