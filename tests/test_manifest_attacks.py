"""The attacks of manifest_attacks.py as ordinary mount tests on this machine.

The same attacks run in a Linux guest over virtio-fs in ``make e2e``
(e2e/run.py); here the "guest" is a manifest-mode mount on the host, so a
failure shows up without QEMU.  Every test gets a fresh share, mounts it with
the pinned manifest digest and trusted key (``--policy require``), reads
everything, lets the attack's host side act, runs its check, and checks that
every file the attack did not touch reads back identical.  The fixture
unmounts even when a check fails.
"""

import os
import shutil

import pytest

import manifest_attacks as ma

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def sealed_share(tmp_path_factory):
    """One sealed share, copied for each test (sealing 10 MiB costs a second)."""
    base = tmp_path_factory.mktemp("sealed")
    src = base / "share"
    src.mkdir()
    ma.make_corpus(src)
    trust = ma.seal_share(src, base / "keys")
    return src, trust, ma.expected(src)


@pytest.fixture
def guest(sealed_share, tmp_path, verified_mount):
    """A fresh copy of the share mounted in manifest mode; yields a manifest_attacks.Ctx."""
    base_src, trust, exp = sealed_share
    src = tmp_path / "share"
    shutil.copytree(base_src, src, symlinks=True)  # keeps modes and mtimes; we own both
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = verified_mount(src, seal=False, mountpoint=mnt, policy="require",
                       extra_args=ma.mount_args(src, trust))
    ctx = ma.Ctx(mnt=mnt, source=src, exp=exp, log=m.log)
    yield ctx
    for fd in list(ctx.state.get("fds", {}).values()) + ([ctx.state["fd"]] if "fd" in ctx.state else []):
        os.close(fd)  # a check that failed before closing what its prepare opened


@pytest.mark.parametrize("check", ma.BASELINE, ids=lambda c: c.name)
def test_baseline(guest, check):
    check.run(guest)


@pytest.mark.parametrize("attack", ma.ATTACKS, ids=lambda a: a.name)
def test_attack(guest, attack):
    ma.check_read_all(guest)  # everything read once, as the guest does
    guest.mark_log()
    if attack.prepare:
        attack.prepare(guest)
    attack.host(guest.source, guest.exp)
    attack.check(guest)
    ma.check_read_all(guest, exclude=attack.touches)
