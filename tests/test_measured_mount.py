"""Measured mounts on a real mount: the MountManifest event before serving, the tamper
tripwire, on_corruption, and the verifier's replay of what the guest measured.

Rules: real mounts and the real CLI; registers are recomputed independently with
hashlib from the log's exact lines; exact events, paths, offsets and exit codes.
"""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from verityfuse import manifest as mf
from conftest import drop_caches, flip, write

VF = [sys.executable, "-m", "verityfuse.cli"]


def vf(*args, **kw):
    return subprocess.run([*VF, *map(str, args)], capture_output=True, text=True, **kw)


@pytest.fixture
def share(tmp_path):
    """A signed manifest of a small tree: (src, manifest, pub, digest)."""
    mf.generate_key(str(tmp_path / "key.pem"), str(tmp_path / "pub.pem"))
    src = tmp_path / "share"
    src.mkdir()
    write(src / "app.bin", bytes(range(256)) * 1024)       # 64 blocks
    write(src / "config", b"trusted configuration\n")
    (src / "lib").mkdir()
    write(src / "lib" / "x.so", b"\x7fELF" + bytes(20000))
    m = tmp_path / "m.json"
    r = vf("seal", src, "--manifest", m, "--sign-key", tmp_path / "key.pem")
    assert r.returncode == 0, r.stderr
    digest = vf("measure-manifest", m).stdout.split()[0]
    return src, m, tmp_path / "pub.pem", digest


def mount_args(m, pub, digest, *extra):
    return ["--manifest", str(m), "--trust-key", str(pub), "--manifest-digest", digest, *extra]


def events(log_path):
    """(alg, init bytes, [(domain, operation, content dict, line)]) of an event log."""
    lines = log_path.read_text().splitlines()
    head, value = lines[0].split(" ")
    out = []
    for line in lines[1:]:
        domain, op, content = line.split(" ")
        out.append((domain, op, json.loads(content), line))
    return head.split("/")[1], bytes.fromhex(value), out


def replayed(log_path) -> bytes:
    """The register recomputed from the log's exact lines, with hashlib alone."""
    alg, value, evs = events(log_path)
    for *_, line in evs:
        d = hashlib.new(alg, line.encode()).digest()
        value = hashlib.new(alg, value + d).digest()
    return value


def register_value(path) -> bytes:
    return bytes.fromhex(path.read_text().split()[-1])


def test_mount_manifest_event_is_measured_before_serving(share, tmp_path, verified_mount):
    src, m, pub, digest = share
    reg, log = tmp_path / "reg", tmp_path / "events.log"
    mnt = verified_mount(src, seal=False, extra_args=mount_args(
        m, pub, digest, "--measure", f"file:{reg}", "--event-log", str(log)))
    alg, init, evs = events(log)
    assert (alg, init) == ("sha256", bytes(32))
    [(domain, op, content, _)] = evs
    assert op == "MountManifest" and "://" not in domain and " " not in domain
    key_id = hashlib.sha256(mf.load_public_key(str(pub)).public_bytes_raw()).hexdigest()
    assert content["manifest"] == digest
    assert content["key_id"] == key_id
    assert content["sequence"] == 1
    assert content["mountpoint"] == str(mnt.mountpoint)
    assert content["policy"] == "min_sequence=0,on_corruption=eio,trust=pinned+key"
    assert register_value(reg) == replayed(log)
    assert (mnt.mountpoint / "config").read_bytes() == b"trusted configuration\n"
    st = json.loads(os.getxattr(mnt.mountpoint, "user.verityfuse.status"))
    assert st["tripwire"]["violations_measured"] == 0
    r = vf("attest", "replay", log, "--register", register_value(reg).hex(),
           "--expect-manifest", digest, "--min-sequence", 1)
    assert r.returncode == 0, r.stdout + r.stderr
    r = vf("attest", "replay", log, "--register", register_value(reg).hex(),
           "--min-sequence", 2)
    assert r.returncode == 1


def test_a_failed_extend_fails_the_mount_and_serves_nothing(share, tmp_path):
    src, m, pub, digest = share
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    reg = tmp_path / "no-such-dir" / "reg"
    r = vf("mount", src, mnt, *mount_args(m, pub, digest, "--measure", f"file:{reg}",
                                          "--event-log", str(tmp_path / "events.log")),
           "--log-file", tmp_path / "daemon.log")
    assert r.returncode != 0
    assert "the measurement failed" in r.stderr and str(reg) in r.stderr
    assert not os.path.ismount(mnt)


def test_a_mount_that_fails_is_not_measured(share, tmp_path):
    """The MountManifest event says the manifest is served at the mount point: a FUSE
    mount that fails (here an option libfuse refuses) must leave no such event, or a
    verifier would attest a tree that the mount point does not show."""
    src, m, pub, digest = share
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    reg, log = tmp_path / "reg", tmp_path / "events.log"
    r = vf("mount", src, mnt, *mount_args(m, pub, digest, "--measure", f"file:{reg}",
                                          "--event-log", str(log)),
           "-o", "nosuchoption", "--log-file", tmp_path / "daemon.log", "-f")
    assert r.returncode != 0
    assert not os.path.ismount(mnt)
    assert not log.exists() and not reg.exists()


def test_relative_paths_name_files_under_the_callers_directory(share, tmp_path):
    """The daemon moves to / before it opens the register and the event log: relative
    paths (and a relative --log-file) are the caller's, as for every other command,
    not files under /."""
    src, m, pub, digest = share
    (tmp_path / "mnt").mkdir()
    (tmp_path / "out").mkdir()
    r = vf("mount", "share", "mnt", "--manifest", "m.json", "--trust-key", "pub.pem",
           "--manifest-digest", digest, "--measure", "file:sha384:out/reg",
           "--event-log", "out/events.log", "--log-file", "out/daemon.log", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    try:
        assert (tmp_path / "mnt" / "config").read_bytes() == b"trusted configuration\n"
        assert sorted(os.listdir(tmp_path / "out")) == [
            "daemon.log", "events.log", "events.log.boot", "events.log.lock", "reg", "reg.lock"]
        alg, _, [(_, op, content, _)] = events(tmp_path / "out" / "events.log")
        assert (alg, op, content["mountpoint"]) == ("sha384", "MountManifest",
                                                    str(tmp_path / "mnt"))
        assert register_value(tmp_path / "out" / "reg") == replayed(tmp_path / "out" / "events.log")
    finally:
        assert vf("umount", tmp_path / "mnt").returncode == 0


@pytest.mark.parametrize("inside", ["event log", "register file", "log file"])
def test_files_the_daemon_writes_under_its_own_mount_point_are_refused(share, tmp_path, inside):
    """The daemon writes its log, the event log and a file: register while it mounts and
    serves: under its own mount point each write would be a request to itself, which it
    cannot answer (the measurement, after the mount exists, waited for ever)."""
    src, m, pub, digest = share
    mnt = tmp_path / "mnt"
    (mnt / "sub").mkdir(parents=True)
    where = {k: tmp_path / k.replace(" ", "-") for k in ("event log", "register file", "log file")}
    where[inside] = mnt / "sub" / "x"
    try:
        r = vf("mount", src, mnt, *mount_args(m, pub, digest, "--measure",
                                              f"file:{where['register file']}",
                                              "--event-log", where["event log"]),
               "--log-file", where["log file"], timeout=60)
        assert r.returncode != 0
        assert f"{inside} '{where[inside]}' is under the mount point '{mnt}'" in r.stderr
        assert not (tmp_path / "event-log").exists()
    finally:
        _abort_mount(mnt)  # a regression: a daemon waiting on itself, whose mount hangs


def _abort_mount(mnt):
    """End a daemon serving ``mnt``, if any, and unmount it, without touching the mount
    itself (a stat would wait on a daemon that cannot answer): kill -9 ends a daemon
    even while it waits on its own mount, and its closed /dev/fuse aborts the mount."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"mount" in argv and os.fsencode(mnt) in argv and int(pid) != os.getpid():
            os.kill(int(pid), 9)
    if any(l.split()[4] == str(mnt) for l in open("/proc/self/mountinfo").read().splitlines()):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    assert not any(l.split()[4] == str(mnt)
                   for l in open("/proc/self/mountinfo").read().splitlines()), "left mounted"


def test_measure_needs_a_manifest(share, tmp_path):
    src, *_ = share
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = vf("mount", src, mnt, "--measure", f"file:{tmp_path}/reg", "--log-file",
           tmp_path / "daemon.log")
    assert r.returncode != 0 and "measure needs a manifest" in r.stderr
    assert not os.path.ismount(mnt) and not (tmp_path / "reg").exists()


def read_errno(path):
    try:
        path.read_bytes()
    except OSError as e:
        return e.errno
    return 0


def test_each_tampered_file_is_measured_once(share, tmp_path, verified_mount):
    src, m, pub, digest = share
    reg, log = tmp_path / "reg", tmp_path / "events.log"
    mnt = verified_mount(src, seal=False, extra_args=mount_args(
        m, pub, digest, "--measure", f"file:{reg}", "--event-log", str(log)))
    flip(src / "app.bin", 5 * 4096 + 7)
    flip(src / "lib" / "x.so", 3)
    for _ in range(3):  # a flood of failing reads costs one event per file
        drop_caches()
        assert read_errno(mnt.mountpoint / "app.bin") == errno.EIO
        assert read_errno(mnt.mountpoint / "lib" / "x.so") == errno.EIO
    assert (mnt.mountpoint / "config").read_bytes() == b"trusted configuration\n"
    _, _, evs = events(log)
    violations = sorted((c["path"], c["offset"]) for _, op, c, _ in evs
                        if op == "IntegrityViolation")
    assert violations == [("app.bin", 5 * 4096), ("lib/x.so", 0)]
    assert all(c["manifest"] == digest for _, op, c, _ in evs)
    assert register_value(reg) == replayed(log)
    st = json.loads(os.getxattr(mnt.mountpoint, "user.verityfuse.status"))["tripwire"]
    assert (st["violations_measured"], st["tripped"], st["refusing_opens"]) == (2, True, False)
    r = vf("attest", "replay", log, "--register", register_value(reg).hex(),
           "--expect-manifest", digest)
    assert r.returncode == 1 and "IntegrityViolation" in r.stdout + r.stderr
    r = vf("attest", "replay", log, "--register", register_value(reg).hex(),
           "--expect-manifest", digest, "--allow-violations", "--json")
    assert r.returncode == 0, r.stdout + r.stderr


def test_on_corruption_refuse_stops_every_open(share, tmp_path, verified_mount):
    src, m, pub, digest = share
    mnt = verified_mount(src, seal=False, extra_args=mount_args(
        m, pub, digest, "--on-corruption", "refuse"))
    assert (mnt.mountpoint / "config").read_bytes() == b"trusted configuration\n"
    flip(src / "app.bin", 0)
    drop_caches()
    assert read_errno(mnt.mountpoint / "app.bin") == errno.EIO
    drop_caches()
    assert read_errno(mnt.mountpoint / "config") == errno.EIO  # untouched, refused all the same
    assert "on_corruption=refuse" in mnt.log()


def test_on_corruption_eio_keeps_serving_untouched_files(share, tmp_path, verified_mount):
    src, m, pub, digest = share
    mnt = verified_mount(src, seal=False, extra_args=mount_args(m, pub, digest))
    flip(src / "app.bin", 0)
    drop_caches()
    assert read_errno(mnt.mountpoint / "app.bin") == errno.EIO
    drop_caches()
    assert (mnt.mountpoint / "config").read_bytes() == b"trusted configuration\n"


def test_measure_options_through_dash_o(share, tmp_path, verified_mount):
    src, m, pub, digest = share
    reg, log = tmp_path / "reg", tmp_path / "events.log"
    verified_mount(src, seal=False, options=[
        f"manifest={m},trust_key={pub},measure=file:sha384:{reg},event_log={log},"
        f"on_corruption=refuse"])
    alg, init, [(_, op, content, _)] = events(log)
    assert (alg, init, op) == ("sha384", bytes(48), "MountManifest")
    assert content["policy"] == "min_sequence=0,on_corruption=refuse,trust=key"
    assert register_value(reg) == replayed(log)


def test_a_remount_cannot_change_what_is_served_or_measured(share, tmp_path, verified_mount):
    """mount(8) merges fstab's options into a remount: given again unchanged they pass.
    A remount naming another manifest, register, event log or on_corruption exited 0
    and changed nothing, so an operator could believe a new manifest was mounted and
    measured: it is refused, naming what it cannot change, and nothing is measured."""
    src, m, pub, digest = share
    reg, log = tmp_path / "reg", tmp_path / "events.log"
    opts = (f"manifest={m},trust_key={pub},measure=file:sha384:{reg},event_log={log},"
            f"on_corruption=refuse")
    mnt = verified_mount(src, seal=False, options=[opts])

    def remount(o):
        return subprocess.run([sys.executable, "-m", "verityfuse", str(src), str(mnt.mountpoint),
                               "-o", "remount," + o], capture_output=True, text=True)
    r = remount("ro," + opts)
    assert r.returncode == 0, r.stderr
    r = remount("rw," + opts)  # a manifest mount stays read-only (it showed rw, and wrote nothing)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in open("/proc/self/mountinfo") if f" {mnt.mountpoint} " in ln)
    assert "ro" in line.split()[5].split(","), line
    other = tmp_path / "other.json"
    write(src / "config", b"another configuration\n")
    assert vf("seal", src, "--manifest", other, "--sign-key", tmp_path / "key.pem").returncode == 0
    for old, new, what in [(f"manifest={m}", f"manifest={other}", "manifest"),
                           (f"{reg}", f"{tmp_path}/reg2", "measure"),
                           (f"event_log={log}", f"event_log={tmp_path}/other.log", "event_log"),
                           ("on_corruption=refuse", "on_corruption=eio", "on_corruption")]:
        r = remount(opts.replace(old, new))
        assert r.returncode != 0 and f"remount cannot change {what} of a running mount" \
            in r.stderr, (what, r.stderr)
    assert [op for _, op, _, _ in events(log)[2]] == ["MountManifest"]


# -- the confidential-container flow against a software TPM (e2e's, without a guest) ------

def test_tpm_measured_mount_quote_and_replay(share, tmp_path, verified_mount, monkeypatch):
    """Guest: mount with --measure tpm, read, the host tampers; then a quote over PCR 23 with
    the verifier's nonce.  Verifier: `attest replay` matches the quote, names the manifest,
    and lists exactly the tampered files that were read."""
    import tpmsim

    src, m, pub, digest = share
    log = tmp_path / "events.log"
    with tpmsim.swtpm(tmp_path / "tpm") as tpm:
        for k, v in tpm.env.items():
            monkeypatch.setenv(k, v)  # the daemon reaches the TPM through TPM2TOOLS_TCTI
        mnt = verified_mount(src, seal=False, extra_args=mount_args(
            m, pub, digest, "--measure", "tpm", "--event-log", str(log)))
        flip(src / "lib" / "x.so", 9000)
        flip(src / "app.bin", 70000)
        drop_caches()
        assert read_errno(mnt.mountpoint / "lib" / "x.so") == errno.EIO
        assert read_errno(mnt.mountpoint / "app.bin") == errno.EIO
        assert read_errno(mnt.mountpoint / "app.bin") == errno.EIO
        assert (mnt.mountpoint / "config").read_bytes() == b"trusted configuration\n"
        assert tpm.pcr_read(23) == replayed(log)
        ak = tpm.make_ak(tmp_path)
        nonce = os.urandom(16).hex()
        msg, sig = tpm.quote(tmp_path, nonce)
        quote = ["--quote", msg, "--signature", sig, "--ak-public", ak]
        r = vf("attest", "replay", log, *quote, "--nonce", nonce, "--expect-manifest", digest,
               "--min-sequence", 1, "--allow-violations", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        out = json.loads(r.stdout)
        assert out["schema"] == 1
        r = vf("attest", "replay", log, *quote, "--nonce", nonce, "--expect-manifest", digest)
        assert r.returncode == 1  # the violations fail an appraisal that does not allow them
        r = vf("attest", "replay", log, *quote, "--nonce", os.urandom(16).hex(),
               "--allow-violations")
        assert r.returncode == 1  # an old quote cannot be replayed with a new nonce
        r = vf("attest", "replay", log, *quote, "--nonce", nonce, "--allow-violations",
               "--expect-mounted", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["mounted"] == [
            {"index": 1, "manifest": digest, "mountpoint": str(mnt.mountpoint)}]
        # Unmounted: the register says so too, and a later quote shows it.
        assert mnt.unmount() == 0
        assert tpm.pcr_read(23) == replayed(log)
        nonce = os.urandom(16).hex()
        msg, sig = tpm.quote(tmp_path, nonce)
        quote = ["--quote", msg, "--signature", sig, "--ak-public", ak]
        r = vf("attest", "replay", log, *quote, "--nonce", nonce, "--allow-violations",
               "--expect-mounted", "--json")
        assert r.returncode == 1
        out = json.loads(r.stdout)
        assert out["mounted"] == [] and out["match"]["ok"]
        assert out["appraisal"]["failures"] == [
            "no measured mount is live at the end of the log: every MountManifest is "
            "followed by its UnmountManifest"]
        r = vf("attest", "replay", log, *quote, "--nonce", nonce, "--allow-violations",
               "--expect-manifest", digest)
        assert r.returncode == 0, r.stdout + r.stderr
    _, _, evs = events(log)
    assert [(op, c["manifest"]) for _, op, c, _ in evs][0] == ("MountManifest", digest)
    assert sorted((c["path"], c["offset"]) for _, op, c, _ in evs if op == "IntegrityViolation") \
        == [("app.bin", 70000 // 4096 * 4096), ("lib/x.so", 8192)]
    assert evs[-1][1:3] == ("UnmountManifest", {"version": 1, "manifest": digest,
                                                "mountpoint": str(mnt.mountpoint)})
    assert len(evs) == 4


def test_tpm_unreachable_fails_the_mount(share, tmp_path, monkeypatch):
    src, m, pub, digest = share
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    monkeypatch.setenv("TPM2TOOLS_TCTI", "swtpm:host=127.0.0.1,port=1")  # nothing listens
    r = vf("mount", src, mnt, *mount_args(m, pub, digest, "--measure", "tpm",
                                          "--event-log", str(tmp_path / "events.log")),
           "--log-file", tmp_path / "daemon.log")
    assert r.returncode != 0 and "the measurement failed" in r.stderr, r.stderr
    assert not os.path.ismount(mnt)


def test_rollback_to_an_older_signed_manifest_is_refused(share, tmp_path, verified_mount):
    """The host puts back an older manifest signed by the same key: --min-sequence refuses it,
    and the measured event of the newer one carries its sequence for a remote verifier."""
    src, m, pub, digest = share
    old = tmp_path / "old.json"
    old.write_bytes(m.read_bytes())
    write(src / "config", b"updated configuration\n")
    r = vf("seal", src, "--manifest", m, "--sign-key", tmp_path / "key.pem")
    assert r.returncode == 0, r.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = vf("mount", src, mnt, "--manifest", old, "--trust-key", pub, "--min-sequence", 2,
           "--log-file", tmp_path / "daemon.log")
    assert r.returncode != 0 and "manifest sequence 1 is older than the minimum 2" in r.stderr
    assert not os.path.ismount(mnt)
    reg, log = tmp_path / "reg", tmp_path / "events.log"
    mnt = verified_mount(src, seal=False, extra_args=[
        "--manifest", str(m), "--trust-key", str(pub), "--min-sequence", "2",
        "--measure", f"file:{reg}", "--event-log", str(log)])
    assert (mnt.mountpoint / "config").read_bytes() == b"updated configuration\n"
    [(_, op, content, _)] = events(log)[2]
    assert (op, content["sequence"]) == ("MountManifest", 2)
    assert content["policy"] == "min_sequence=2,on_corruption=eio,trust=key"


@pytest.mark.parametrize("how", ["fusermount", "sigterm"])
def test_an_unmount_is_measured_after_the_mount_is_gone(share, tmp_path, verified_mount, how):
    """The register and log say when the manifest stops being served there: a quote
    taken after the unmount replays to UnmountManifest (attest replay --expect-mounted
    then fails), whether it was unmounted or its daemon asked to stop."""
    src, m, pub, digest = share
    reg, log = tmp_path / "reg", tmp_path / "events.log"
    mnt = verified_mount(src, seal=False, extra_args=mount_args(
        m, pub, digest, "--measure", f"file:{reg}", "--event-log", str(log)))
    r = vf("attest", "replay", log, "--register", register_value(reg).hex(), "--expect-mounted")
    assert r.returncode == 0, r.stdout + r.stderr
    if how == "sigterm":
        mnt.process.send_signal(signal.SIGTERM)
        assert mnt.process.wait(10) == 0
        assert not os.path.ismount(mnt.mountpoint)
    assert mnt.unmount() == 0
    _, _, evs = events(log)
    assert [(op, c) for _, op, c, _ in evs][1:] == [("UnmountManifest", {
        "version": 1, "manifest": digest, "mountpoint": str(mnt.mountpoint)})]
    assert register_value(reg) == replayed(log)
    r = vf("attest", "replay", log, "--register", register_value(reg).hex(), "--expect-mounted")
    assert r.returncode == 1 and "FAIL: no measured mount is live at the end of the log" in r.stdout
    assert "measured the unmount of manifest" in mnt.log()


def test_a_daemon_killed_outright_records_no_unmount(share, tmp_path, verified_mount):
    """What the log can say: SIGKILL leaves the last MountManifest live (the kernel's mount
    then answers ENOTCONN, serving nothing the manifest does not vouch for)."""
    src, m, pub, digest = share
    reg, log = tmp_path / "reg", tmp_path / "events.log"
    mnt = verified_mount(src, seal=False, extra_args=mount_args(
        m, pub, digest, "--measure", f"file:{reg}", "--event-log", str(log)))
    mnt.process.kill()
    mnt.process.wait()
    mnt.unmount()
    assert [op for _, op, _, _ in events(log)[2]] == ["MountManifest"]
    assert register_value(reg) == replayed(log)


@pytest.mark.daemon_errors(r"cannot measure the unmount of manifest sha256:[0-9a-f]{64} from "
                           r".* into file-sha256-[0-9a-f]+: register file .* is not a regular "
                           r"file \(a verifier replaying the log takes it for still mounted\)")
def test_an_unmount_that_cannot_be_measured_is_logged_and_the_daemon_ends(share, tmp_path,
                                                                         verified_mount):
    src, m, pub, digest = share
    reg, log = tmp_path / "reg", tmp_path / "events.log"
    mnt = verified_mount(src, seal=False, extra_args=mount_args(
        m, pub, digest, "--measure", f"file:{reg}", "--event-log", str(log)))
    before = register_value(reg)
    reg.unlink()
    reg.mkdir()  # the register cannot be extended any more
    assert mnt.unmount() == 0
    assert not os.path.ismount(mnt.mountpoint)
    assert [op for _, op, _, _ in events(log)[2]] == ["MountManifest"]  # log and register agree
    assert replayed(log) == before
    assert "ERROR: cannot measure the unmount of manifest" in mnt.log()


def test_umount_returns_once_the_daemon_has_measured_the_unmount(share, tmp_path):
    """`verityfuse umount` waits for the daemon: what it records after the unmount is in the
    log and the register when the command returns, so a quote taken next shows it.  The
    test holds the event log's writers' lock, which the daemon's record takes, so it ends
    only once the test lets it."""
    import fcntl

    src, m, pub, digest = share
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    reg, log = tmp_path / "reg", tmp_path / "events.log"
    r = vf("mount", src, mnt, *mount_args(m, pub, digest, "--measure", f"file:{reg}",
                                          "--event-log", str(log)),
           "--log-file", tmp_path / "daemon.log", timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        with open(f"{log}.lock", "rb") as held:  # the writers' lock
            fcntl.flock(held, fcntl.LOCK_EX)
            p = subprocess.Popen([*VF, "umount", str(mnt)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            for _ in range(500):
                if not os.path.ismount(mnt):
                    break
                time.sleep(0.02)
            assert not os.path.ismount(mnt)
            with pytest.raises(subprocess.TimeoutExpired):
                p.wait(1)  # unmounted, and waiting for the daemon, which waits for the lock
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and (out, err) == ("", "")
        assert [op for _, op, _, _ in events(log)[2]] == ["MountManifest", "UnmountManifest"]
        assert register_value(reg) == replayed(log)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt])
