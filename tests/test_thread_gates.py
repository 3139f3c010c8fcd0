"""ops_read.ThreadGates: at most PER_BLOB_THREADS requests of one blob in worker threads;
the requests queued behind a stall fail with it, at once (in-process, with trio)."""

import errno
import threading

import pytest
import trio
import trio.testing

from verityfuse.errors import IntegrityError
from verityfuse.ops_read import PER_BLOB_THREADS, ThreadGates
from verityfuse.oci_http import RegistryError, TooSlow


async def _run(fn, *args):
    return await trio.to_thread.run_sync(fn, *args)


def _scenario(error, cached=None):
    """2 * PER_BLOB_THREADS requests of blob "a" block until released and then fail with
    ``error`` (or return); meanwhile one request of blob "b" runs.  Returns (results in
    order of completion, most requests of "a" ever running at once, gates left);
    ``_scenario.ran``: the requests that ran (trio picks which)."""
    gates = ThreadGates()
    release, lock = threading.Event(), threading.Lock()
    running, most, results = [0], [0], []
    _scenario.ran = set()

    def blob_a(i):
        with lock:
            _scenario.ran.add(i)
            running[0] += 1
            most[0] = max(most[0], running[0])
        release.wait(30)
        with lock:
            running[0] -= 1
        if error is not None:
            raise error
        return i

    async def request(i):
        try:
            results.append((i, await gates.run("a", _run, blob_a, i, cached=cached)))
        except Exception as e:
            results.append((i, e))

    async def main():
        async with trio.open_nursery() as n:
            for i in range(2 * PER_BLOB_THREADS):
                n.start_soon(request, i)
            while running[0] < PER_BLOB_THREADS:  # the threads have begun
                await trio.sleep(0.001)
            await trio.testing.wait_all_tasks_blocked()
            # Blob "a" holds its places: another blob still runs, at once.
            results.append(("b", await gates.run("b", _run, lambda: "b")))
            release.set()
    trio.run(main)
    return results, most[0], len(gates)


def test_a_blob_holds_at_most_its_places_and_others_run_meanwhile():
    results, most, left = _scenario(None)
    assert most == PER_BLOB_THREADS
    assert results[0] == ("b", "b")
    assert sorted(results[1:]) == [(i, i) for i in range(2 * PER_BLOB_THREADS)]
    assert left == 0  # no entry outlives its requests


def test_the_requests_queued_behind_a_stall_fail_with_it_without_running():
    stall = TooSlow("bytes 0-4095 of blob sha256:ab: no answer within 1 s")
    results, most, left = _scenario(stall)
    assert most == PER_BLOB_THREADS  # the queued ones never ran
    assert len(results) == 2 * PER_BLOB_THREADS + 1
    assert len(_scenario.ran) == PER_BLOB_THREADS
    ran = [e for i, e in results[1:] if i in _scenario.ran]
    queued = [e for i, e in results[1:] if i not in _scenario.ran]
    assert all(e is stall for e in ran)
    # Each queued one raises a copy of its own (one object raised by many grows its
    # traceback with each), which is no new stall.
    assert all(type(e) is TooSlow and str(e) == str(stall) and e is not stall and not e.stall
               for e in queued) and len({id(e) for e in queued}) == len(queued)
    assert left == 0


def test_the_requests_queued_behind_a_stall_answer_from_the_cache_if_they_can():
    stall = TooSlow("bytes 0-4095 of blob sha256:ab: no answer within 1 s")
    asked: set = set()

    def cached(i):
        """Nothing cached when first asked; the odd ones' blocks once others fetched them."""
        first = i not in asked
        asked.add(i)
        return None if first or not i % 2 else f"cached {i}"
    results, most, left = _scenario(stall, cached=cached)
    queued = dict(r for r in results if r[0] != "b" and r[0] not in _scenario.ran)
    assert len(queued) == PER_BLOB_THREADS
    assert all(v == f"cached {i}" if i % 2 else type(v) is TooSlow for i, v in queued.items())


@pytest.mark.parametrize("error", [
    RegistryError("bytes 0-4095 of blob sha256:ab: 500"),
    # A block that failed its check: another request's block may be intact, and a
    # waiter must never report a mismatch it did not see (nor its offset).
    IntegrityError("big", 4096, b"\x01" * 32, b"\x02" * 32),
    OSError(errno.EMFILE, "Too many open files"),  # the daemon's own want, not the blob's
], ids=["500", "integrity", "emfile"])
def test_another_failure_is_not_handed_to_the_queued_requests(error):
    results, most, left = _scenario(error)
    # Each queued request ran in its turn and failed on its own.
    assert most == PER_BLOB_THREADS
    assert len(results) == 2 * PER_BLOB_THREADS + 1 and all(e is error for _, e in results[1:])


def test_no_key_is_not_gated():
    gates = ThreadGates()

    async def main():
        async with gates.held(None) as stalled:
            assert stalled is None
            assert len(gates) == 0
    trio.run(main)


@pytest.mark.parametrize("n", [1, 3])
def test_a_cancelled_waiter_leaves_no_entry(n):
    gates = ThreadGates()

    async def main():
        with trio.move_on_after(0.05):
            async with trio.open_nursery() as nursery:
                for _ in range(PER_BLOB_THREADS + n):
                    nursery.start_soon(gates.run, "a", _run, threading.Event().wait, 0.5)
        assert len(gates) == 0
    trio.run(main)
