"""`verityfuse doctor`: what it says about mounting on this machine, checked against the
machine itself (a private overlay of /usr/sbin stands in for an installed helper)."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

import privns

VF = [sys.executable, "-m", "verityfuse.cli"]
OWN_HELPER = os.path.join(os.path.dirname(sys.executable), "mount.fuse.verityfuse")


def doctor():
    r = subprocess.run([*VF, "doctor", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["mounting"]


def test_doctor_reports_the_fuse_device_fusermount_and_allow_other():
    m = doctor()
    assert m["dev_fuse"] == {"ok": True}  # root, /dev/fuse present: the tests mount
    st = os.stat("/usr/bin/fusermount3")
    assert m["fusermount3"]["setuid_root"] == bool(st.st_mode & stat.S_ISUID and st.st_uid == 0)
    try:
        conf = open("/etc/fuse.conf").read().splitlines()
    except OSError:
        conf = []
    assert m["allow_other"]["user_allow_other"] == any(
        line.split("#")[0].strip() == "user_allow_other" for line in conf)


def test_doctor_tells_whose_helper_mount_runs(tmp_path):
    with privns.writable_system_dir(str(tmp_path)) as sbin:
        link = os.path.join(sbin, "mount.fuse.verityfuse")
        if os.path.lexists(link):
            os.unlink(link)  # the overlay's copy only
        assert doctor()["helper"] == {"installed": False, "own_helper": OWN_HELPER}
        os.symlink("/opt/other/bin/mount.fuse.verityfuse", link)
        assert doctor()["helper"] == {"installed": True, "ours": False, "own_helper": OWN_HELPER,
                                      "target": "/opt/other/bin/mount.fuse.verityfuse"}
        r = subprocess.run([*VF, "doctor"], capture_output=True, text=True)
        assert "NOT this installation's" in r.stdout
        os.unlink(link)
        with open(link, "w") as f:  # another package's helper, a file: said, and how to replace it
            f.write("#!/bin/sh\n")
        r = subprocess.run([*VF, "doctor"], capture_output=True, text=True)
        assert ("/sbin/mount.fuse.verityfuse is a file, not a link (another package's helper?); "
                "verityfuse install-helper --force replaces it") in r.stdout, r.stdout
        assert subprocess.run([*VF, "install-helper", "--dir", sbin, "--force"]).returncode == 0
        assert doctor()["helper"] == {"installed": True, "ours": True, "own_helper": OWN_HELPER,
                                      "target": OWN_HELPER}
    assert not os.path.lexists("/usr/sbin/mount.fuse.verityfuse") or \
        os.readlink("/usr/sbin/mount.fuse.verityfuse") != "/opt/other/bin/mount.fuse.verityfuse"


def test_doctor_reports_the_measurement_registers():
    r = subprocess.run([*VF, "doctor", "--json"], capture_output=True, text=True)
    m = json.loads(r.stdout)["measurement"]
    has_tpm = os.path.exists("/dev/tpmrm0")
    assert m["tpm"]["device"] == ("/dev/tpmrm0" if has_tpm else None)
    assert m["tpm"]["tpm2_pytss"] is True  # the test extra installs it
    assert m["rtmr"]["usable"] == os.path.exists(
        "/sys/devices/virtual/misc/tdx_guest/measurements/rtmr3:sha384")
    text = subprocess.run([*VF, "doctor"], capture_output=True, text=True).stdout
    assert "measure: TPM" in text and "measure: TDX RTMR" in text


def test_doctor_says_whether_the_open_path_is_native():
    from verityfuse import fsutil

    out = {}
    for env in ({}, {"VERITYFUSE_PURE_PYTHON": "1"}):
        r = subprocess.run([*VF, "doctor", "--json"], capture_output=True, text=True,
                           env={**os.environ, **env})
        out[bool(env)] = json.loads(r.stdout)["native_open"]
    assert out == {False: fsutil._load_native() is not None, True: False}


def _probe_mounts():
    return [line for line in open("/proc/self/mountinfo") if "verityfuse-doctor-" in line]


@pytest.mark.mount
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_probe_leaves_no_mount_and_no_directory(sig, tmp_path):
    """doctor mounts a probe in a temporary directory: SIGTERM then left the daemon, its
    mount and the directory; SIGINT removed files through the live mount and said
    'Device or resource busy' (found by review, s43).  Its mount is its child's now, which
    goes with it, and a signal unmounts before the directory goes."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    for attempt in range(5):  # the probe is mounted for a few milliseconds: catch it
        p = subprocess.Popen([*VF, "doctor"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        while not _probe_mounts() and p.poll() is None:
            pass
        if p.poll() is None:
            break
        p.stderr.close()
    try:
        assert p.poll() is None and attempt < 4, "the probe mount was never caught"
        p.send_signal(sig)
        p.wait(30)
        for _ in range(200):  # the daemon's own unmount, after its parent's end
            if not _probe_mounts():
                break
            time.sleep(0.05)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for line in _probe_mounts():
            subprocess.run(["umount", "-l", line.split()[4]])
    assert _probe_mounts() == []
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)
    assert "Traceback" not in p.stderr.read()
