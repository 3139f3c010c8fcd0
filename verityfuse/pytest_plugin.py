"""pytest plugin: the ``verified_mount`` fixture, for integration tests that need
a real verified mount.

Installed with the package (entry point ``pytest11``), so any test suite gets::

    def test_reads(verified_mount, tmp_path):
        src = tmp_path / "src"; src.mkdir(); (src / "a").write_bytes(b"data")
        m = verified_mount(src)          # seals everything under src, mounts it
        assert (m.mountpoint / "a").read_bytes() == b"data"

- Every mount made through the fixture is unmounted at teardown, even when the
  test fails, and its daemon is waited for (killed if it hangs).
- Where this process cannot use FUSE (no /dev/fuse, not allowed to open it,
  no setuid fusermount3 for a user, or a mount refused for lack of permission)
  the test is skipped, with the reason, instead of erroring.
- When a test fails, each of its daemons' logs is added to its report, as a
  section "verityfuse daemon log (MOUNTPOINT)" shown with the failure.
- The daemons' log files are removed at teardown.
"""

from __future__ import annotations

from typing import Any, Callable, Generator, List, Optional

import pytest

from .testing import FuseUnavailable, StrPath, VerifiedMount, fuse_unavailable_reason, seal_tree

_MOUNTS = pytest.StashKey[List[VerifiedMount]]()

#: The title of the report section holding a daemon's log.
SECTION = "verityfuse daemon log ({})"

MountFactory = Callable[..., VerifiedMount]


@pytest.fixture
def verified_mount(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Generator[MountFactory, None, None]:
    """Factory fixture: ``verified_mount(source, seal=True, mountpoint=None, **kw) -> VerifiedMount``.

    ``seal=True`` seals every regular file under ``source`` first (resealing
    an already sealed file is idempotent).  ``mountpoint`` defaults to a new
    temporary directory.  Keyword arguments go to VerifiedMount (store, policy,
    options, extra_args, timeout).  Skips the test where FUSE cannot be used.
    """
    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(f"FUSE is not usable here: {reason}")
    mounts: List[VerifiedMount] = []
    request.node.stash[_MOUNTS] = mounts

    def make(source: StrPath, seal: bool = True, mountpoint: Optional[StrPath] = None,
             **kw: Any) -> VerifiedMount:
        if seal:
            seal_tree(source, store=kw.get("store"))
        mnt = mountpoint if mountpoint is not None else tmp_path_factory.mktemp("mnt")
        try:
            m = VerifiedMount(source, mnt, **kw)
        except FuseUnavailable as e:
            pytest.skip(str(e))
        mounts.append(m)
        return m

    yield make
    failure: Optional[BaseException] = None
    for m in mounts:
        try:
            m.unmount()  # also keeps its log's text and removes the file
        except BaseException as e:  # unmount the others all the same
            failure = failure or e
    if failure is not None:
        raise failure


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """Add each daemon's log to the report of a failed test (any phase)."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed:
        for m in item.stash.get(_MOUNTS, []):
            report.sections.append((SECTION.format(m.mountpoint), m.log() or "(empty)\n"))
