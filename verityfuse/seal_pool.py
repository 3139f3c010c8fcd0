"""Files sealed one at a time, or by a few threads at once (``--threads``), their
results taken in order.

With a few files in flight, waits (a cold read from a slow disk) can overlap
each other and the other threads' Python (syscalls and the native hasher release
the GIL); where files wait little, the threads cost more than they save (see
``file_threads``).  Results come back in the order of the input, so
output and manifests are what one thread would produce, and at most ``ahead``
files are in flight: memory does not grow with the number of files.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Deque, Iterable, Iterator, Optional, Tuple, TypeVar

from . import treebuild

T = TypeVar("T")
R = TypeVar("R")

AHEAD_PER_THREAD = 8


def file_threads(threads: Optional[int]) -> int:
    """How many files are sealed at once: ``--threads``, else one.

    One by default because the pool did not pay where it was measured (this
    project's 2-core machine, 5,000 files of 0-16 KiB): 1.21 s with two files in
    flight against 0.59 s one at a time in tmpfs, 1.78-1.83 s against 1.53-1.76 s
    from a cold ext4.  The threads handed the GIL back and forth at every system
    call (30 futex calls a file).  A large file still hashes on every core
    (``build_threads``); ``--threads N`` keeps N files in flight, for a disk whose
    waits are long enough to overlap."""
    return threads or 1


def build_threads(size: int, threads: Optional[int]) -> int:
    """Hashing threads for one file of ``size`` bytes: one for a file of one chunk (the
    other files in flight use the other cores), the caller's choice for a large one."""
    return 1 if size <= treebuild.CHUNK_SIZE else (threads or 0)


def _outcome(f: Future):
    try:
        return f.result(), None
    except OSError as e:  # this file could not be sealed: the caller reports it
        return None, e


def in_order(items: Iterable[T], work: Callable[[T], R], threads: int,
             abandon: Callable[[R], None]) -> Iterator[Tuple[T, Optional[R], Optional[OSError]]]:
    """(item, work(item), None), or (item, None, the OSError it raised), for each item in
    order; any other exception is raised here.  ``work`` runs in ``threads`` threads
    (inline with one).  When the caller stops early, ``abandon(result)`` is called on
    every result made for nothing (staged files to remove)."""
    if threads <= 1:
        for item in items:
            try:
                yield item, work(item), None
            except OSError as e:
                yield item, None, e
        return
    pending: Deque[Tuple[T, Future]] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="verity-seal") as pool:
        try:
            for item in items:
                pending.append((item, pool.submit(work, item)))
                if len(pending) >= AHEAD_PER_THREAD * threads:
                    item, f = pending.popleft()
                    yield (item, *_outcome(f))
            while pending:
                item, f = pending.popleft()
                yield (item, *_outcome(f))
        finally:
            for _, f in pending:
                f.cancel()
            for _, f in pending:
                if not f.cancelled() and f.exception() is None and f.result() is not None:
                    abandon(f.result())
