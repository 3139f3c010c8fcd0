"""The lock pyfuse3's request loop takes turns with (fuse_loop.ReadLock): free, it is taken
without a scheduler pass; held, waiters get it in the order they came; a waiter cancelled
while it waits, or an owner whose block raised, never leaves it taken.  Every mount in the
suite serves through it (daemon._serve installs it)."""

from types import SimpleNamespace

import pytest
import trio
import trio.testing

from verityfuse.fuse_loop import ReadLock, install


def test_free_lock_is_taken_without_a_scheduler_pass():
    async def main():
        lock = ReadLock()
        with trio.testing.assert_no_checkpoints():  # trio.Lock fails this
            async with lock:
                assert lock.locked()
        assert not lock.locked()
    trio.run(main)


def test_waiters_get_the_lock_in_order():
    order = []

    async def main():
        lock = ReadLock()

        async def worker(name, hold: trio.Event):
            async with lock:
                order.append(name)
                await hold.wait()

        holds = {n: trio.Event() for n in "abc"}
        async with trio.open_nursery() as nursery:
            for n in "abc":  # a takes it; b, then c, wait
                nursery.start_soon(worker, n, holds[n])
                await trio.testing.wait_all_tasks_blocked()
            assert order == ["a"]
            holds["a"].set()
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["a", "b"] and lock.locked()
            holds["b"].set()
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["a", "b", "c"]
            holds["c"].set()
        assert not lock.locked()
    trio.run(main)


def test_cancelled_waiter_and_raising_owner_leave_it_free():
    got = []

    async def main():
        lock = ReadLock()
        release, scope = trio.Event(), trio.CancelScope()

        async def owner():
            with pytest.raises(ValueError):
                async with lock:
                    await release.wait()
                    raise ValueError("the owner's block failed")

        async def waiter():
            with scope:
                async with lock:
                    got.append("waiter")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()  # parked behind the owner
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        assert got == [] and not lock.locked()
        async with lock:  # and it is taken again at once
            assert lock.locked()
    trio.run(main)


def test_install_replaces_only_the_lock():
    fake = SimpleNamespace(trio=trio)
    assert install(fake)
    assert fake.trio is not trio and fake.trio.Lock is ReadLock
    for name in ("lowlevel", "open_nursery", "ClosedResourceError", "from_thread"):
        assert getattr(fake.trio, name) is getattr(trio, name)
    assert trio.Lock is not ReadLock  # trio itself is left alone
    # pyfuse3 on asyncio (pyfuse3.asyncio.enable()), or a pyfuse3 without the attribute:
    # left as it is
    other = SimpleNamespace(trio=SimpleNamespace(Lock=object))
    assert not install(other) and other.trio.Lock is object
    assert not install(SimpleNamespace())


def test_the_installed_pyfuse3_reads_trio_from_the_attribute_install_replaces():
    """install works only while pyfuse3 takes its Lock from ``pyfuse3.trio``: this pyfuse3
    does (its asyncio mode swaps the same attribute)."""
    import pyfuse3
    assert pyfuse3.trio is trio
