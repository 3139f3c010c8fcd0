"""A SOURCE or option value with commas, '=', backslashes, spaces or newlines reaches
libfuse and the kernel as one literal value: it never injects a mount option.

The oracle is /proc/self/mountinfo: the source field must be SOURCE exactly, and the
super options must be those the daemon chose (no allow_other, nosuid and nodev kept).
"""

import os
import subprocess
import sys

import pytest

from verityfuse import mountopts

VF = [sys.executable, "-m", "verityfuse.cli"]
HOSTILE = ["proj,allow_other,suid,dev", "a=b,default_permissions=0", "back\\slash\\,x",
           "sp ace,allow_other", "new\nline,allow_other", "tr\\"]


def mountinfo_line(mnt):
    for line in open("/proc/self/mountinfo"):
        fields = line.split(" ")
        if fields[4] == str(mnt):
            return fields
    return None


def unescape(field: str) -> str:
    """mountinfo's octal escapes (\\040 space, \\011 tab, \\012 newline, \\134 backslash)."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mount_source_named(tmp_path, name):
    """SOURCE tmp_path/name (holding f) mounted on tmp_path/mnt: (src, mnt)."""
    src, mnt = tmp_path / name, tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "f").write_bytes(b"data")
    r = subprocess.run([*VF, "mount", str(src), str(mnt), "--log-file", str(tmp_path / "log")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return src, mnt


@pytest.mark.mount
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_source_names_inject_nothing(tmp_path, name):
    src, mnt = mount_source_named(tmp_path, name)
    try:
        fields = mountinfo_line(mnt)
        sep = fields.index("-")
        mount_opts, source, super_opts = fields[5], fields[sep + 2], fields[sep + 3].strip()
        assert unescape(source) == str(src)
        assert "nosuid" in mount_opts.split(",") and "nodev" in mount_opts.split(",")
        assert "allow_other" not in super_opts.split(",")
        assert (mnt / "f").read_bytes() == b"data"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)


@pytest.mark.parametrize("value,escaped", [("a,b", "a\\,b"), ("a\\b", "a\\\\b"),
                                           ("a\\,b", "a\\\\\\,b"), ("plain=x y", "plain=x y")])
def test_escape_value(value, escaped):
    assert mountopts.escape_value(value) == escaped
    assert mountopts.fuse_options(mountopts.Settings(), value)[-1] == f"fsname={escaped}"


@pytest.mark.mount
@pytest.mark.parametrize("name", ["café", os.fsdecode(b"bin\xff")])
def test_a_source_named_beyond_ascii_mounts(tmp_path, name):
    """pyfuse3 hands libfuse its options as ASCII: a SOURCE such as /srv/café failed to
    mount ('ascii' codec can't encode).  Its fsname carries the other bytes as \\xNN."""
    src, mnt = mount_source_named(tmp_path, name)
    try:
        fields = mountinfo_line(mnt)
        source = fields[fields.index("-") + 2]
        assert unescape(source) == mountopts.ascii_name(str(src))
        assert unescape(source).endswith({"café": "caf\\xc3\\xa9"}.get(name, "bin\\xff"))
        assert (mnt / "f").read_bytes() == b"data"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)


@pytest.mark.mount
def test_a_mount_point_not_utf8_mounts_in_the_background(tmp_path):
    """A mount point (so its log's name) not UTF-8: the background daemon's 'ready'
    message failed to encode ('utf-8' codec can't encode '\\udcff'), exit 1, and the mount
    was left behind without a daemon (ENOTCONN; found by review, s43)."""
    src, mnt = tmp_path / "src", tmp_path / os.fsdecode(b"mnt\xff")
    src.mkdir()
    mnt.mkdir()
    (src / "f").write_bytes(b"data")
    log = tmp_path / os.fsdecode(b"log\xff")
    r = subprocess.run([*VF, "mount", str(src), str(mnt), "--log-file", str(log), "--verbose"],
                       capture_output=True, text=True, errors="surrogateescape")
    try:
        assert r.returncode == 0, r.stderr
        assert (mnt / "f").read_bytes() == b"data"
        assert r.stderr == f"verityfuse: logs go to file {str(log)[:-1]}\\xff\n"  # escaped
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        if mountinfo_line(mnt) is not None:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    assert mountinfo_line(mnt) is None
