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
- A daemon log holding a traceback or an ERROR line fails the test at teardown,
  unless the test expects it: ``@pytest.mark.daemon_errors(r"regex", ...)`` names
  the lines it expects (``re.search`` on each line).
- A daemon whose exit status is not 0 (it crashed or was killed during the test,
  or failed as the fixture unmounted it) fails the test at teardown with its
  status and the end of its log, unless the test unmounted it itself (and saw the
  status) or is marked ``@pytest.mark.daemon_exit`` (it stops a daemon itself).
- The daemons' log files are removed at teardown.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Generator, List, Optional

import pytest

from .testing import FuseUnavailable, StrPath, VerifiedMount, fuse_unavailable_reason, seal_tree

_MOUNTS = pytest.StashKey[List[VerifiedMount]]()

#: The title of the report section holding a daemon's log.
SECTION = "verityfuse daemon log ({})"

MountFactory = Callable[..., VerifiedMount]

#: What a daemon log must not hold unless a test expects it.
_BAD_LINE = re.compile(r"Traceback \(most recent call last\)| ERROR: ")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "daemon_errors(*patterns): the ERROR lines a test expects "
                            "in its daemons' logs (re.search); any other one fails the test")
    config.addinivalue_line("markers", "daemon_exit: the test stops a daemon itself (a kill, a "
                            "crash it causes): its exit status does not fail the test")


def unexpected_lines(log: str, expected: List[str]) -> List[str]:
    """The lines of ``log`` that are a traceback or an ERROR and match no expected pattern."""
    allowed = [re.compile(p) for p in expected]
    return [line for line in log.splitlines()
            if _BAD_LINE.search(line) and not any(a.search(line) for a in allowed)]


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
    # Exited before teardown: a crash, or a kill the test did not announce.
    gone = {id(m) for m in mounts if not m.unmount_asked and m.process.poll() is not None}
    exits = []
    for m in reversed(mounts):  # a mount of a mount before the one under it
        try:
            asked = m.unmount_asked  # by the test, which saw the status
            status = m.unmount()  # also keeps its log's text and removes the file
            if not asked and status != 0:
                exits.append((m, status, id(m) in gone))
        except BaseException as e:  # unmount the others all the same
            failure = failure or e
    if failure is not None:
        raise failure
    if exits and request.node.get_closest_marker("daemon_exit") is None:
        m, status, early = exits[-1]  # the first made
        when = "during the test" if early else "after its unmount"
        if status == -9 and not early:
            when += " (killed: it did not stop)"
        tail = "\n".join(m.log().splitlines()[-20:]) or "(empty)"
        pytest.fail(f"the daemon of {m.mountpoint} exited {when} with status {status} (mark "
                    f"the test @pytest.mark.daemon_exit if it stops it itself); the end of its "
                    f"log:\n{tail}", pytrace=False)
    expected = [p for mark in request.node.iter_markers("daemon_errors") for p in mark.args]
    for m in mounts:
        bad = unexpected_lines(m.log(), expected)
        if bad:
            pytest.fail(f"the daemon of {m.mountpoint} logged what this test did not expect "
                        f"(mark it @pytest.mark.daemon_errors(...) if it should):\n"
                        + "\n".join(bad[:20]), pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """Add each daemon's log to the report of a failed test (any phase)."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed:
        for m in item.stash.get(_MOUNTS, []):
            report.sections.append((SECTION.format(m.mountpoint), m.log() or "(empty)\n"))
