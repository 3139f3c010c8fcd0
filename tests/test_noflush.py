"""A close sends FLUSH only for a handle something could be written through.

The ioctl shim marks read-only opens FOPEN_NOFLUSH (the daemon's flush has nothing to do
for them): one request less per open+read+close.  A writable handle still gets its FLUSH
(the backing filesystem's close-time errors are reported), which answering FLUSH with
ENOSYS, remembered by the kernel for the whole connection, would lose.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from verityfuse.testing import VerifiedMount


@pytest.mark.mount
def test_read_only_close_sends_no_flush_a_writable_one_does(tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "sealed").write_bytes(b"s" * 3 * 4096)
    (src / "plain").write_bytes(b"p" * 100)
    r = subprocess.run([sys.executable, "-m", "verityfuse.cli", "seal", str(src),
                        str(src / "sealed")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with VerifiedMount(src, mnt, extra_args=["--debug"]) as m:
        assert (mnt / "sealed").read_bytes() == b"s" * 3 * 4096
        assert (mnt / "plain").read_bytes() == b"p" * 100
        fd = os.open(mnt / "plain", os.O_WRONLY | os.O_APPEND)
        try:
            assert os.write(fd, b"q") == 1
        finally:
            os.close(fd)
        m.unmount()
        log = m.log()
    assert (src / "plain").read_bytes() == b"p" * 100 + b"q"
    # Three opens (two read-only, one for writing), each released; one FLUSH.
    assert len(re.findall(r"\brelease\(\d+,?\): ok", log)) == 3, log
    assert len(re.findall(r"\bflush\(", log)) == 1, log
