"""Files sealed by a few threads at once, their results taken in order.

Small files cost mostly waits (a cold read, creating the object's and the
index entry's files) and a little Python; with a few files in flight the waits
overlap each other and the other thread's Python (syscalls and the native
hasher release the GIL).  Results come back in the order of the input, so
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
    """How many files are sealed at once: ``--threads``, default treebuild's default."""
    return threads or treebuild.default_threads()


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
