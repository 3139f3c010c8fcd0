"""pyfuse3's request loop, with a read lock that costs less than trio.Lock.

pyfuse3's worker tasks take turns at /dev/fuse under a lock it makes with
``trio.Lock()``: the one holding it waits for the fd to be readable, reads one request
and hands the lock on.  Two workers (one answering a request, one waiting for the next)
are the usual state, so every request hands the lock over once, and trio.Lock's
contended path does that with a ``WouldBlock`` raised and caught, a parking-lot
"breaker" registered and removed for each new owner (each asking ``inspect`` for the
task's coroutine state: it breaks the lot if an owner exits still holding it, which
pyfuse3's ``async with`` never lets happen) and its KeyboardInterrupt-protection
wrappers: a few microseconds a request, on the one thread that answers them all.

``ReadLock`` is the same FIFO hand-over on a trio ParkingLot, and nothing else.
``install`` gives it to pyfuse3 through the module attribute pyfuse3 reads trio from
(``pyfuse3.trio``, the one its asyncio mode replaces too), before ``pyfuse3.main``.
Measured over a container start (5,000 random files of the bench's 100,000-file tree,
open + read + close each, a fresh mount a run, 3 runs each way interleaved, means of
the runs): local mode's daemon 336-352 -> 326-344 us of CPU a file, the plain pyfuse3
passthrough's 195-227 -> 183-199.  The bench's passthrough takes the same lock, so that
the loop stays out of verified / plain ratios.
"""

from __future__ import annotations

import types

import trio


class ReadLock:
    """A FIFO lock, for the way pyfuse3 uses trio.Lock (``async with``, nothing else):
    taken at once when free, else parked; a release hands it to the longest waiter, so it
    is never free while one waits.  A waiter cancelled while parked leaves the queue
    (trio's ParkingLot) without taking it."""

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


def install(pyfuse3) -> bool:
    """Make pyfuse3's request loop take ``ReadLock``s (before ``pyfuse3.main``); False,
    and pyfuse3 left as it is, when it does not run on trio through ``pyfuse3.trio`` (its
    asyncio mode, or a version made otherwise)."""
    if getattr(pyfuse3, "trio", None) is not trio:
        return False
    lean = types.ModuleType(trio.__name__, trio.__doc__)
    lean.__dict__.update(vars(trio))
    lean.Lock = ReadLock  # type: ignore[attr-defined]
    pyfuse3.trio = lean
    return True
