"""pyfuse3's request loop, one scheduler pass a request instead of two.

pyfuse3's worker tasks take turns at /dev/fuse under a lock: the one holding it waits
for the fd to be readable, reads one request and hands the lock on.  It makes that lock
with ``trio.Lock()``, whose uncontended acquire still yields to the scheduler
(``cancel_shielded_checkpoint``): one trio pass (an ``epoll_wait``, the run queue, a
reschedule) and a parking-lot breaker's weak dictionary, for every request, on the one
thread that answers them all.  The wait for the fd right after it is a checkpoint
already, so the lock needs none of its own.

``install`` gives pyfuse3 the same trio with ``Lock`` replaced by ``ReadLock``, through
the module attribute pyfuse3 reads trio from (``pyfuse3.trio``, the one its asyncio mode
replaces too).  Measured over a container start (5,000 random files of the bench's
100,000-file tree, open + read + close each, a fresh mount a run, 3 runs each way
interleaved, means of the runs): local mode's daemon 336-352 -> 326-344 us of CPU a
file, the plain pyfuse3 passthrough's 195-227 -> 183-199.  The bench's passthrough takes
the same lock, so that the loop stays out of verified / plain ratios.
"""

from __future__ import annotations

import types

import trio


class ReadLock:
    """A FIFO lock, as pyfuse3 uses trio.Lock (``async with``, nothing else): taken at
    once when free (no checkpoint), else parked; a release hands it to the longest
    waiter, so it is never free while one waits.  A waiter cancelled while parked
    leaves the queue (trio's ParkingLot) without taking it."""

    __slots__ = ("_held", "_waiters")

    def __init__(self) -> None:
        self._held = False
        self._waiters = trio.lowlevel.ParkingLot()

    def locked(self) -> bool:
        return self._held

    async def __aenter__(self) -> None:
        if self._held:
            await self._waiters.park()  # woken by __aexit__, owning the lock
        else:
            self._held = True

    async def __aexit__(self, *exc) -> None:
        if self._waiters:
            self._waiters.unpark(count=1)  # ownership passes: _held stays True
        else:
            self._held = False


def install(pyfuse3) -> None:
    """Make pyfuse3's request loop take ``ReadLock``s (before ``pyfuse3.main``)."""
    lean = types.ModuleType(trio.__name__, trio.__doc__)
    lean.__dict__.update(vars(trio))
    lean.Lock = ReadLock  # type: ignore[attr-defined]
    pyfuse3.trio = lean
