"""An integration test suite using verityfuse's ``verified_mount`` fixture.

The fixture comes with the package (a pytest plugin); run this file with
    pytest examples/test_with_fixture.py
as root, or as a user allowed to use fusermount3.
"""

import errno
import os

import pytest


def test_my_app_reads_a_verified_tree(verified_mount, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"answer": 42}\n')

    m = verified_mount(src)  # seals every file under src, mounts, unmounts at teardown
    assert (m.mountpoint / "config.json").read_text() == '{"answer": 42}\n'
    assert os.getxattr(m.mountpoint / "config.json", "user.fsverity.digest").startswith(b"sha256:")


def test_tampering_is_an_io_error(verified_mount, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "blob").write_bytes(b"a" * 8192)
    m = verified_mount(src)
    with open(src / "blob", "r+b") as f:  # behind the daemon's back
        f.write(b"b")
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    with pytest.raises(OSError) as e:
        (m.mountpoint / "blob").read_bytes()
    assert e.value.errno == errno.EIO
