"""Operating verityfuse like a filesystem (issue 11): mount(8), fstab, options,
daemon manners, logs that are never lost, status, JSON, progress, aliases.

Rules: real mounts, real mount(8); every mount is unmounted in a finally or by
the fixture; exact values are asserted, never durations.
"""

import errno
import json
import os
import pty
import subprocess
import sys

import pytest

from verityfuse import mountinfo, mountopts
import privns
from conftest import drop_caches, flip, write

VF = [sys.executable, "-m", "verityfuse.cli"]
HELPER = "/usr/sbin/mount.fuse.verityfuse"
# This installation's helper: the console script next to the interpreter running the tests.
OWN_HELPER = os.path.join(os.path.dirname(sys.executable), "mount.fuse.verityfuse")


def vf(*args, **kw):
    return subprocess.run([*VF, *map(str, args)], capture_output=True, text=True, **kw)


def unmount(mnt):
    """As root through umount(8): fusermount3 leaves libmount's utab record of a mount made
    with _netdev or x-systemd.* options behind, one stale line a run."""
    cmd = ["umount", str(mnt)] if os.geteuid() == 0 else ["fusermount3", "-u", str(mnt)]
    subprocess.run(cmd, capture_output=True)


@pytest.fixture
def tree(tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    write(src / "sealed", b"s" * 8 * 4096)
    write(src / "plain", b"p")
    assert vf("seal", src, src / "sealed").returncode == 0
    yield src, mnt
    unmount(mnt)


@pytest.fixture(scope="module")
def helper(tmp_path_factory):
    """mount(8) finds this installation's helper, in a private overlay of /usr/sbin."""
    with privns.writable_system_dir(str(tmp_path_factory.mktemp("sbin"))) as sbin:
        r = vf("install-helper", "--dir", sbin)
        assert r.returncode == 0, r.stderr
        assert os.readlink(HELPER) == OWN_HELPER
        yield HELPER
        assert vf("uninstall-helper", "--dir", sbin).returncode == 0


@pytest.mark.parametrize("how", [VF, [sys.executable, "-m", "verityfuse"],
                                 [os.path.join(os.path.dirname(sys.executable), "verityfuse")]])
def test_install_helper_links_its_own_installation_never_a_path_search(tmp_path, how):
    """A foreign helper first on PATH and one already installed: the link is this
    installation's, the output names what it replaced, uninstall takes it away."""
    foreign = tmp_path / "other-install"
    foreign.mkdir()
    write(foreign / "mount.fuse.verityfuse", b"#!/bin/sh\nexit 99\n")
    os.chmod(foreign / "mount.fuse.verityfuse", 0o755)
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    os.symlink(foreign / "mount.fuse.verityfuse", sbin / "mount.fuse.verityfuse")
    env = dict(os.environ, PATH=f"{foreign}:{os.environ['PATH']}")
    run = lambda *a: subprocess.run([*how, *a], capture_output=True, text=True, env=env)
    r = run("uninstall-helper", "--dir", sbin)  # not ours: left alone
    assert r.returncode == 1 and "another installation's helper" in r.stderr
    r = run("install-helper", "--dir", sbin)
    assert r.returncode == 0, r.stderr
    assert os.readlink(sbin / "mount.fuse.verityfuse") == OWN_HELPER
    assert r.stdout.splitlines() == [f"{sbin}/mount.fuse.verityfuse -> {OWN_HELPER}",
                                     f"replaced {sbin}/mount.fuse.verityfuse -> "
                                     f"{foreign}/mount.fuse.verityfuse"]
    assert sorted(os.listdir(sbin)) == ["mount.fuse.verityfuse"]  # no temporary left
    r = run("uninstall-helper", "--dir", sbin)
    assert r.returncode == 0 and r.stdout == f"removed {sbin}/mount.fuse.verityfuse -> {OWN_HELPER}\n"
    assert os.listdir(sbin) == []


def test_install_helper_never_replaces_a_file_that_is_not_a_link(tmp_path):
    write(tmp_path / "mount.fuse.verityfuse", b"#!/bin/sh\n")
    r = vf("install-helper", "--dir", tmp_path)
    assert r.returncode == 1 and "is not a link" in r.stderr
    assert (tmp_path / "mount.fuse.verityfuse").read_bytes() == b"#!/bin/sh\n"
    r = vf("uninstall-helper", "--dir", tmp_path)
    assert r.returncode == 1 and "not removing a file" in r.stderr
    r = vf("install-helper", "--dir", tmp_path, "--force")
    assert r.returncode == 0 and os.readlink(tmp_path / "mount.fuse.verityfuse") == OWN_HELPER


# -- mount(8), fstab, systemd ------------------------------------------------------------

@pytest.mark.mount
def test_mount_t_fuse_verityfuse_with_every_option_kind(tree, helper, tmp_path):
    src, mnt = tree
    log = tmp_path / "daemon.log"
    opts = (f"ro,allow_other,policy=require,store={src}/.verityfuse,log_file={log},cache_size=8,"
            f"readahead_kb=512,_netdev,nofail,noauto,x-systemd.requires=network.target")
    r = subprocess.run(["mount", "-t", "fuse.verityfuse", str(src), str(mnt), "-o", opts],
                       capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")  # as a kernel filesystem: silent
    line = next(l for l in open("/proc/self/mountinfo") if f" {mnt} " in l)
    assert " ro," in line and "fuse.verityfuse" in line and "allow_other" in line
    assert (mnt / "sealed").read_bytes() == b"s" * 8 * 4096
    with pytest.raises(PermissionError):  # policy=require reached the daemon
        (mnt / "plain").read_bytes()
    st = json.loads(vf("status", mnt, "--json").stdout)
    assert (st["policy"], st["tree_cache"]["max_bytes"]) == ("require", 8 << 20)
    # remount flips the kernel's flags; the daemon's settings stay
    r = subprocess.run(["mount", "-o", "remount,rw", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    line = next(l for l in open("/proc/self/mountinfo") if f" {mnt} " in l)
    assert " rw," in line
    r = subprocess.run(["mount", "-o", "remount,policy=enforce", str(mnt)], capture_output=True,
                       text=True)
    assert r.returncode != 0 and "remount cannot change policy" in r.stderr
    assert subprocess.run(["umount", str(mnt)]).returncode == 0


def test_mount_helper_exit_status_is_mount8s(tree, helper, tmp_path):
    """mount(8) documents 1 for incorrect invocation and 32 for a mount failure; the
    helper's status is what mount(8) returns."""
    src, mnt = tree

    def mount(*args):
        return subprocess.run(["mount", "-t", "fuse.verityfuse", *map(str, args)],
                              capture_output=True, text=True)

    r = mount(src, mnt, "-o", "cache_size=0")
    assert r.returncode == 1 and "mount option cache_size: must be a positive integer" in r.stderr
    # An option only libfuse could know, and does not: incorrect invocation too (it was 32).
    r = mount(src, mnt, "-o", f"bogus_opt,log_file={tmp_path}/log")
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "fuse: unknown option(s): `-o bogus_opt'",
        f"ERROR: cannot mount '{src}' on '{mnt}': an option neither verityfuse nor libfuse "
        f"knows (libfuse names it above)"], r.stderr
    assert vf("mount", src, mnt, "-o", f"bogus_opt,log_file={tmp_path}/log").returncode == 2
    # Without log_file: the fallback log it made (nothing written to it) is not left behind.
    # (In a private overlay of /var/log: tests running beside this one watch the real one.)
    from verityfuse import logs
    fallback = logs.fallback_log_file(str(mnt))
    with privns.writable_system_dir(str(tmp_path / "var-log"), target="/var/log"):
        assert not os.path.exists(fallback)
        assert vf("mount", src, mnt, "-o", "bogus_opt").returncode == 2
        assert not os.path.exists(fallback)
    r = mount(tmp_path / "missing", mnt)
    assert r.returncode == 32 and f"'{tmp_path}/missing'" in r.stderr
    (src / "inner").mkdir()
    r = mount(src, src / "inner")
    assert r.returncode == 32 and "is inside the source" in r.stderr
    for args, msg in ((["-N", "1"], "mount namespaces (-N) are not supported"),
                      (["--bogus"], "unrecognized arguments: --bogus")):
        r = subprocess.run([HELPER, str(src), str(mnt), *args], capture_output=True, text=True)
        assert r.returncode == 1 and msg in r.stderr, r.stderr
    r = subprocess.run([HELPER, str(src)], capture_output=True, text=True)
    assert r.returncode == 1 and "the following arguments are required: MOUNTPOINT" in r.stderr
    # mount.fuse3's form, `verityfuse SOURCE MOUNTPOINT -o OPTIONS`, is the same helper
    r = vf(tmp_path / "missing", mnt, "-o", "ro")
    assert r.returncode == 32 and f"'{tmp_path}/missing'" in r.stderr
    r = vf(src, mnt, "-o", "cache_size=x")
    assert r.returncode == 1 and "mount option cache_size" in r.stderr
    assert not os.path.ismount(mnt)


@pytest.mark.mount
def test_fstab_line_and_systemd_unit(tree, helper, tmp_path):
    """The README's fstab line, mounted by `mount MNT` from a temporary fstab, and the
    README's unit file checked by systemd-analyze with the same options."""
    src, mnt = tree
    key, pub = tmp_path / "key.pem", tmp_path / "pub.pem"
    assert vf("keygen", key, pub).returncode == 0
    m = tmp_path / "manifest.json"
    assert vf("seal", src, "--manifest", m, "--sign-key", key).returncode == 0
    digest = vf("measure-manifest", m).stdout.strip()
    opts = (f"ro,allow_other,manifest={m},trust_key={pub},manifest_digest={digest},"
            f"log_file={tmp_path}/log,_netdev,nofail")
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# verityfuse\n{src}  {mnt}  fuse.verityfuse  {opts}  0  0\n")
    r = subprocess.run(["mount", "-T", str(fstab), str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (mnt / "plain").read_bytes() == b"p"  # listed in the manifest, verified
    assert json.loads(vf("status", mnt, "--json").stdout)["manifest_digest"] == digest
    unmount(mnt)
    unit = tmp_path / (subprocess.run(["systemd-escape", "--path", "--suffix=mount", str(mnt)],
                                      capture_output=True, text=True).stdout.strip())
    unit.write_text(f"[Unit]\nDescription=verified share\n\n[Mount]\nWhat={src}\nWhere={mnt}\n"
                    f"Type=fuse.verityfuse\nOptions={opts}\n\n[Install]\nWantedBy=multi-user.target\n")
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert "Options" not in r.stderr and "Type" not in r.stderr, r.stderr
    # what systemd runs for that unit
    r = subprocess.run(["mount", str(src), str(mnt), "-t", "fuse.verityfuse", "-o", opts],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (mnt / "plain").read_bytes() == b"p"


@pytest.mark.mount
def test_a_remount_keeps_nosuid_nodev_and_refuses_what_it_cannot_change(tree, helper, tmp_path):
    """mount(8) builds a remount's flags from the fstab line and the new options, not from
    the mount: for a mount listed in /etc/fstab, `mount -o remount,ro` dropped the nosuid
    and nodev libfuse had set, and a setuid-root file of SOURCE then ran as root for
    anyone.  And remount accepted daemon settings it never applied (require_signatures:
    unsigned files still read), exiting 0."""
    src, mnt = tree
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{src} {mnt} fuse.verityfuse noauto,allow_other,log_file={tmp_path}/log 0 0\n")

    def flags():
        line = next(ln for ln in open("/proc/self/mountinfo") if f" {mnt} " in ln)
        return set(line.split()[5].split(","))

    def mount(*args):
        return subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)

    with privns.private_mounts() as private:
        private("--bind", str(fstab), "/etc/fstab")  # this process's /etc/fstab only
        try:
            assert mount(mnt).returncode == 0
            assert {"rw", "nosuid", "nodev"} <= flags()
            for o in ("ro", "rw"):
                r = mount("-o", f"remount,{o}", mnt)
                assert r.returncode == 0, r.stderr
                assert {o, "nosuid", "nodev"} <= flags(), flags()
            for opt in ("require_signatures", f"trust_cert={tmp_path}/cert.pem", "debug",
                        f"log_file={tmp_path}/other.log", "max_handles_per_uid=3"):
                r = mount("-o", f"remount,{opt}", mnt)
                name = opt.split("=")[0]
                assert r.returncode != 0 and f"remount cannot change {name} of a running " \
                    f"mount" in r.stderr, (opt, r.stderr)
            r = mount("-o", f"remount,ro,log_file={tmp_path}/log", mnt)  # unchanged: passes
            assert r.returncode == 0, r.stderr
        finally:
            unmount(mnt)


@pytest.mark.mount
def test_a_remount_refuses_daemon_settings_given_as_command_line_flags(tree, tmp_path):
    """`mount SRC MNT -o remount --require-signatures` exited 0 and changed nothing: only
    settings given with -o were compared with the running mount's, so an operator could
    believe signatures were now required (found by review, s43)."""
    src, mnt = tree
    r = vf("mount", src, mnt, "--log-file", tmp_path / "log")
    assert r.returncode == 0, r.stderr
    try:
        for flags, name in ((["--require-signatures"], "require_signatures"),
                            (["--policy", "require"], "policy"), (["--cache-size", "7"], "cache_size")):
            r = vf("mount", src, mnt, "-o", "remount", *flags)
            assert r.returncode != 0 and f"remount cannot change {name} of a running mount" \
                in r.stderr, (flags, r.stderr)
        r = vf("mount", src, mnt, "-o", "remount", "--policy", "enforce")  # as it runs
        assert r.returncode == 0, r.stderr
        # Another SOURCE: exited 0, and the operator believed the mount now served it.
        other = tmp_path / "other"
        other.mkdir()
        r = vf("mount", other, mnt, "-o", "remount,ro")
        assert r.returncode == 1 and r.stderr == (
            f"ERROR: '{mnt}' serves '{src}', not '{other}': a remount cannot change SOURCE; "
            f"unmount and mount again\n"), r.stderr
        assert "rw" in mountinfo.options(str(mnt))  # and nothing was remounted
        os.symlink(src, tmp_path / "link")  # the same SOURCE by another name passes
        r = vf("mount", tmp_path / "link", mnt, "-o", "remount,ro")
        assert r.returncode == 0 and "ro" in mountinfo.options(str(mnt)), r.stderr
    finally:
        unmount(mnt)


@pytest.mark.mount
def test_mount_fuse3_convention(tree, tmp_path):
    src, mnt = tree
    r = vf(src, mnt, "-o", f"ro,log_file={tmp_path}/log")
    assert r.returncode == 0, r.stderr
    assert (mnt / "sealed").read_bytes() == b"s" * 8 * 4096


def test_options_are_deterministic_and_user_values_win():
    s = mountopts.parse(["allow_other,fsname=mine,ro", "max_read=65536,rw"])
    first = mountopts.fuse_options(s, "/src")
    for _ in range(20):
        assert mountopts.fuse_options(mountopts.parse(["allow_other,fsname=mine,ro",
                                                        "max_read=65536,rw"]), "/src") == first
    assert first == ["default_permissions", "subtype=verityfuse", "allow_other", "fsname=mine",
                     "max_read=65536", "rw"]
    s = mountopts.parse(["subtype=other,policy=require,trust_key=a,trust_key=b,debug"])
    assert mountopts.fuse_options(s, "/src") == ["default_permissions", "fsname=/src", "subtype=other"]
    assert (s.policy, s.trust_key, s.debug) == ("require", ["a", "b"], True)
    for bad, msg in (("cache_size=-5", "cache_size: must be a positive integer, not -5"),
                     ("policy=lax", "policy: 'lax' is not enforce or require"),
                     ("manifest_digest=md5:00", "unknown algorithm"), ("store", "needs a value"),
                     ("debug=1", "takes no value")):
        with pytest.raises(mountopts.OptionError, match=msg):
            mountopts.parse([bad])


# -- the daemon's manners ------------------------------------------------------------------

def test_nonsense_values_are_refused(tree):
    src, mnt = tree
    r = vf("mount", src, mnt, "--cache-size", "-5")
    assert r.returncode == 2 and "cache-size: must be a positive integer, not -5" in r.stderr
    r = vf("mount", src, mnt, "-o", "cache_size=0")
    assert r.returncode == 2 and "mount option cache_size: must be a positive integer" in r.stderr


@pytest.mark.mount
def test_daemon_leaves_its_start_directory_free(tree, tmp_path):
    src, mnt = tree
    work = tmp_path / "work"
    work.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(work)], check=True)
    try:
        r = vf("mount", src, mnt, "--log-file", tmp_path / "log", cwd=work)
        assert r.returncode == 0, r.stderr
    finally:
        umounted = subprocess.run(["umount", str(work)], capture_output=True, text=True)
    assert umounted.returncode == 0, umounted.stderr  # not "target is busy"


@pytest.mark.mount
def test_warns_over_a_mount_point_and_finds_odd_names(tmp_path, tree):
    src, _ = tree
    mnt = tmp_path / "mnt ü\tx"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    try:
        r = vf("mount", src, mnt, "--log-file", tmp_path / "log", "--readahead-kb", "512")
        assert r.returncode == 0, r.stderr
        shown = str(mnt).replace("\t", "\\t")  # escaped, as every warning's names are
        assert f"WARNING: '{shown}' is already a mount point (tmpfs); mounting over it" \
            in r.stderr, r.stderr
        assert "\t" not in r.stderr
        dev = os.major(os.stat(mnt).st_dev), os.minor(os.stat(mnt).st_dev)
        with open(f"/sys/class/bdi/{dev[0]}:{dev[1]}/read_ahead_kb") as f:
            assert f.read().strip() == "512"  # its escaped name was found in mountinfo
    finally:
        unmount(mnt)
        subprocess.run(["umount", str(mnt)])


@pytest.mark.mount
def test_debug_logs_every_request(tree, tmp_path):
    src, mnt = tree
    log = tmp_path / "log"
    assert vf("mount", src, mnt, "--debug", "--log-file", log).returncode == 0
    (mnt / "sealed").read_bytes()
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "missing")
    unmount(mnt)
    text = log.read_text()
    for needle in ("lookup(1, b'sealed', 'RequestContext'): ok", "open(", "read(",
                   "lookup(1, b'missing', 'RequestContext'): ENOENT", "release("):
        assert needle in text, needle


# -- never silent -----------------------------------------------------------------------

@pytest.mark.mount
def test_logs_fall_back_to_a_file_without_dev_log(tree, helper):
    """This machine has no /dev/log: a background daemon logs to the documented file
    (the place --log-file's help names, so a mount says nothing; with -v it says where),
    and an integrity failure is in that file.  /var/log is a tmpfs of a private mount
    namespace: the machine's is never written."""
    if os.path.exists("/dev/log"):
        pytest.skip("this test needs a machine without /dev/log (minimal guests, CI)")
    src, mnt = tree
    path = f"/var/log/verityfuse/{str(mnt).strip('/').replace('/', '-')}.log"
    with privns.private_mounts() as mount:
        mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", "/var/log")
        try:
            r = subprocess.run(["mount", "-t", "fuse.verityfuse", str(src), str(mnt)],
                               capture_output=True, text=True)
            assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
            unmount(mnt)
            for how in (["mount", "-v", "-t", "fuse.verityfuse", str(src), str(mnt)],
                        [*VF, "mount", "-v", str(src), str(mnt)]):
                r = subprocess.run(how, capture_output=True, text=True)
                assert r.returncode == 0 and \
                    f"verityfuse: logs go to file {path} (no /dev/log" in r.stderr, r.stderr
                unmount(mnt)
            r = vf("mount", src, mnt)
            assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
            flip(src / "sealed", 5)
            drop_caches()
            with pytest.raises(OSError) as e:
                (mnt / "sealed").read_bytes()
            assert e.value.errno == errno.EIO
        finally:
            unmount(mnt)  # in this namespace, where the mount is
        with open(path) as f:
            assert "integrity failure: sealed: data block at offset 0" in f.read()


@pytest.mark.mount
def test_explicit_store_typo_is_an_error_and_failed_mounts_leave_nothing(tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    write(src / "f", b"f")
    r = vf("mount", src, mnt, "--store", tmp_path / "stroe")
    assert r.returncode == 1 and f"store '{tmp_path}/stroe' does not exist" in r.stderr
    assert not (tmp_path / "stroe").exists()
    write(tmp_path / "file", b"")  # a store that is a file is not "missing"
    r = vf("mount", src, mnt, "--store", tmp_path / "file")
    assert r.returncode == 1 and r.stderr == f"ERROR: store '{tmp_path}/file' is not a directory\n"
    r = vf("mount", src, mnt, "--manifest", tmp_path / "missing.json", "--manifest-digest",
           "sha256:" + "00" * 32)
    assert r.returncode == 1 and "refusing to mount" in r.stderr
    r = vf("mount", src, src / "sub")
    assert r.returncode == 1
    # a mount that never enabled anything leaves SOURCE as it was, too
    assert vf("mount", src, mnt, "--log-file", tmp_path / "log").returncode == 0
    assert (mnt / "f").read_bytes() == b"f"
    unmount(mnt)
    assert sorted(os.listdir(src)) == ["f"]


def test_verify_that_checked_nothing_fails_and_strict(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "a", b"a")
    assert vf("seal", src, src / "a").returncode == 0
    write(src / "b", b"b")
    r = vf("verify", src)
    assert r.returncode == 0 and "1 of 1 sealed files intact, 1 unsealed" in r.stderr
    r = vf("verify", src, "--strict")
    assert r.returncode == 1 and f"UNSEALED {src}/b" in r.stdout
    os.unlink(src / "a")
    r = vf("verify", src)
    assert r.returncode == 1 and f"nothing was verified: no sealed file under '{src}'" in r.stderr


# -- observability and automation -------------------------------------------------------------

@pytest.mark.mount
def test_status_counts_verified_and_failed_blocks(tree, tmp_path):
    """Two failing reads of one block are one failure line with a count; a name with
    control characters is escaped in the human output and exact in the JSON."""
    src, mnt = tree
    evil = "bad\x1b[2J\nname"
    write(src / evil, b"e" * 4096)
    assert vf("seal", src, src / evil).returncode == 0
    assert vf("mount", src, mnt, "--log-file", tmp_path / "log").returncode == 0
    flip(src / "sealed", 6 * 4096 + 1)
    flip(src / evil, 7)
    fd = os.open(mnt / "sealed", os.O_RDONLY | os.O_DIRECT)  # each pread is one FUSE_READ
    try:
        import mmap
        buf = mmap.mmap(-1, 4096)
        for blk in range(5):
            assert os.preadv(fd, [buf], blk * 4096) == 4096
        for _ in range(2):
            with pytest.raises(OSError):
                os.preadv(fd, [buf], 6 * 4096)
        efd = os.open(mnt / evil, os.O_RDONLY | os.O_DIRECT)
        try:
            with pytest.raises(OSError):
                os.preadv(efd, [buf], 0)
        finally:
            os.close(efd)
        st = json.loads(vf("status", mnt, "--json").stdout)
        r = vf("status", mnt)
    finally:
        os.close(fd)
    assert st["schema"] == 1
    assert (st["blocks_verified"], st["verified_reads"], st["bytes_served"]) == (5, 5, 5 * 4096)
    assert st["integrity_failures"] == 3 and st["failure_groups_dropped"] == 0
    groups = [(f["file"], f["offset"], f["count"]) for f in st["failures"]]
    assert groups == [("sealed", 6 * 4096, 2), (evil, 0, 1)]
    first = st["failures"][0]
    assert first["first"] <= first["last"]
    assert (st["mode"], st["policy"], st["ioctl_shim"], st["open_files"]) == ("local", "enforce", True, 1)
    assert st["tree_cache"]["misses"] >= 1 and st["tree_cache"]["blocks"] >= 1
    assert st["gc_frozen"] > 10_000  # start-up's objects: out of the collector's full passes
    assert r.returncode == 0 and "integrity failures  3 (2 distinct blocks)" in r.stdout
    assert "verified            5 blocks in 5 reads, 20.0 KiB served" in r.stdout
    assert "of 32.0 MiB" in r.stdout
    lines = [l for l in r.stdout.splitlines() if l.startswith("  failure: ")]
    assert len(lines) == 2
    assert lines[0].startswith("  failure: sealed: data block at offset 24576")
    assert "(2 times, first 20" in lines[0] and ", last 20" in lines[0]
    assert lines[1].startswith("  failure: bad\\x1b[2J\\nname: data block at offset 0")
    assert "\x1b" not in r.stdout and r.stdout.count("\n") == len(r.stdout.splitlines())


@pytest.mark.mount
def test_status_names_the_file_of_every_kind_of_failure(tree, tmp_path):
    """Not only hash mismatches: a size changed behind the tree's back and a damaged
    store object are grouped under their own file in the status, not one nameless
    group (which kept only the latest message)."""
    from verityfuse import merkle

    src, mnt = tree
    write(src / "grown", b"g" * 9000)
    write(src / "damaged", b"d" * 9000)
    assert vf("seal", src, src / "grown", src / "damaged").returncode == 0
    digest = vf("digest", src / "damaged").stdout.split()[0]
    alg, raw = merkle.parse_digest(digest)
    obj = src / ".verityfuse" / "objects" / alg.name / raw.hex()[:2] / raw.hex()
    assert obj.is_file()
    obj.unlink()
    os.mkfifo(obj)
    with open(src / "grown", "ab") as f:
        f.write(b"x")
    assert vf("mount", src, mnt, "--log-file", tmp_path / "log").returncode == 0
    for name in ("grown", "damaged", "grown"):
        with pytest.raises(OSError) as e:
            open(mnt / name, "rb").close()
        assert e.value.errno == errno.EIO
    st = json.loads(vf("status", mnt, "--json").stdout)
    files = sorted((f["file"], f["count"]) for f in st["failures"])
    assert files == [("damaged", 1), ("grown", 2)]
    messages = {f["file"]: f["message"] for f in st["failures"]}
    assert messages["grown"] == "grown: backing file is 9001 bytes, sealed size 9000"
    assert messages["damaged"].startswith("damaged: ") and "a FIFO" in messages["damaged"]


def test_json_outputs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "a", b"a" * 5000)
    d = subprocess.run(["fsverity", "digest", src / "a"], capture_output=True, text=True).stdout.split()[0]
    r = vf("digest", src / "a", "--json")
    assert json.loads(r.stdout) == {"file": f"{src}/a", "digest": d, "hash_algorithm": "sha256",
                                    "block_size": 4096, "salt": "", "size": 5000, "schema": 1}
    r = vf("seal", src, "--json")
    assert [json.loads(l) for l in r.stdout.splitlines()] == [{"file": f"{src}/a", "digest": d,
                                                               "schema": 1}]
    write(src / "b", b"b")
    r = vf("verify", src, "--json")
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert rows[:2] == [{"file": f"{src}/a", "status": "ok", "digest": d, "schema": 1},
                        {"file": f"{src}/b", "status": "unsealed", "schema": 1}]
    assert rows[2] == {"summary": {"sealed": 1, "intact": 1, "corrupt": 0, "unsealed": 1,
                                   "unreadable": 0, "stale_entries": 0, "strict": False, "ok": True},
                       "schema": 1}
    flip(src / "a", 1)
    rows = [json.loads(l) for l in vf("verify", src, "--json").stdout.splitlines()]
    assert rows[0]["status"] == "corrupt" and rows[0]["offset"] == 0 and len(rows[0]["actual"]) == 64
    assert vf("keygen", tmp_path / "k", tmp_path / "p").returncode == 0
    r = vf("seal", src, "--manifest", tmp_path / "m", "--sign-key", tmp_path / "k", "--json")
    last = json.loads(r.stdout.splitlines()[-1])
    assert (last["entries"], last["files"], last["signed"]) == (3, 2, True)
    m = json.loads(vf("measure-manifest", tmp_path / "m", "--json").stdout)
    assert m["digest"] == last["digest"] and (m["entries"], m["files"]) == (3, 2)
    assert m["signatures"][0]["algorithm"] == "ed25519" and len(m["signatures"][0]["key_id"]) == 64
    assert last["schema"] == m["schema"] == rows[0]["schema"] == 1


def test_seal_progress_on_a_terminal_only(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        with open(src / f"f{i}", "wb") as f:
            f.truncate(12 << 20)
    r = vf("seal", src)
    assert r.returncode == 0 and "ETA" not in r.stderr and "\r" not in r.stderr
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [*VF, "seal", str(src), "--threads", "1"])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    text = out.decode()
    assert "/36 MiB" in text and "/3 files" in text and "ETA " in text


@pytest.mark.mount
def test_version_aliases_and_doctor(tree, tmp_path):
    from verityfuse import __version__
    src, mnt = tree
    assert vf("--version").stdout == f"verityfuse {__version__}\n"
    assert vf("mount", src, mnt, "--log-file", tmp_path / "log").returncode == 0
    digest = os.getxattr(mnt / "sealed", "user.fsverity.digest").decode()
    assert vf("measure", mnt / "sealed").stdout == f"{digest} {mnt}/sealed\n"
    r = vf("measure", mnt / "plain")
    assert r.returncode == 1 and "No data available" in r.stderr
    desc = subprocess.run([*VF, "dump_metadata", "descriptor", mnt / "sealed"], capture_output=True)
    assert desc.returncode == 0 and len(desc.stdout) == 256
    write(src / "new", b"n" * 9000)
    assert vf("enable", mnt / "new", "--hash-alg=sha512").returncode == 0
    want = subprocess.run(["fsverity", "digest", "--hash-alg=sha512", src / "new"],
                          capture_output=True, text=True).stdout.split()[0]
    assert vf("measure", mnt / "new").stdout.split()[0] == want
    rep = json.loads(vf("doctor", "--json").stdout)
    assert rep["schema"] == 1 and rep["version"] == __version__ and rep["libfuse"].startswith("3.")
    assert rep["ioctl_shim"]["loads"] and rep["hashing"]["native"] is True
    assert rep["kernel_fsverity_ioctls"] == {"forwards": True,
                                             "how": "probed: FS_IOC_MEASURE_VERITY on a test mount"}
    r = vf("--version", "-v")
    assert r.stdout.startswith(f"verityfuse {__version__}\n") and "fs-verity ioctls via FUSE" in r.stdout
