"""pytest plugin: the ``verified_mount`` fixture, for integration tests that need
a real verified mount.

Installed with the package (entry point ``pytest11``), so any test suite gets::

    def test_reads(verified_mount, tmp_path):
        src = tmp_path / "src"; src.mkdir(); (src / "a").write_bytes(b"data")
        m = verified_mount(src)          # seals everything under src, mounts it
        assert (m.mountpoint / "a").read_bytes() == b"data"

Every mount made through the fixture is unmounted at teardown, even when the
test fails, and its daemon is waited for (killed if it hangs).  Needs
/dev/fuse and permission to mount (root, or fusermount3 for users).
"""

from __future__ import annotations

import os
import shutil
from typing import List

import pytest

from .testing import VerifiedMount, seal_tree


@pytest.fixture
def verified_mount(tmp_path_factory):
    """Factory fixture: ``verified_mount(source, seal=True, **kw) -> VerifiedMount``.

    ``seal=True`` seals every regular file under ``source`` first (resealing
    an already sealed file is idempotent).
    Keyword arguments go to VerifiedMount (store, policy, options, extra_args).
    """
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("FUSE is not available (/dev/fuse, fusermount3)")
    mounts: List[VerifiedMount] = []

    def make(source, seal=True, mountpoint=None, **kw):
        if seal:
            seal_tree(source, store=kw.get("store"))
        mnt = mountpoint or tmp_path_factory.mktemp("mnt")
        m = VerifiedMount(source, mnt, **kw)
        mounts.append(m)
        return m

    yield make
    for m in mounts:
        m.unmount()
