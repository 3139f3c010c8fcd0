"""Files sealed (or verified) by a few worker processes at once, their results taken
in order by the calling process.

Why processes: sealing a small file is mostly Python around a dozen system calls
(open and read it, create, write and close its tree object and its index entry).
Threads hand the GIL to each other at every one of those calls and were slower
than one thread (5,000 files of 0-16 KiB in tmpfs: 1.21 s with two files in
flight, 0.59 s one at a time); processes run side by side (the same calls in two
processes over 20,000 files: 0.41 s against 0.79 s in one).

Each worker is a fork of the caller, made before anything is staged: it inherits
the store's open directories, the parameters and the work function, so only what
the caller ships of each item (``shipped``: a path, not its lstat) and the results
cross its pipe, in chunks of ``CHUNK``.  A worker stages
files of up to ``SMALL`` bytes; it hands a larger one back (``Here``), and the
caller stages it with its progress line and every hashing thread while the
workers go on with the next files.  Results are taken in input order, so output
and manifests are what one process would make, and at most ``AHEAD_PER_WORKER``
chunks per worker are in flight: memory does not grow with the number of files.

A worker ignores SIGINT: Ctrl-C reaches the caller, which stops the pool and
removes what was staged for nothing (``abandon``).  A worker dies with the caller,
and names the files it stages by the caller's pid: they are the caller's until it
publishes or removes them, and the next seal removes them once the caller is gone.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import mmap
import multiprocessing
import os
import pickle
import signal
import sys
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import chain, islice
from typing import Any, Callable, Deque, Iterable, Iterator, List, Optional, Tuple, TypeVar

from . import treebuild
from .errors import VerityError
from .store_tmp import name_tmp_files_for

T = TypeVar("T")
R = TypeVar("R")

SMALL = treebuild.CHUNK_SIZE  # a worker's files: hashed in one chunk, on one thread
# Items a task: the first few tasks are small, so that a few hundred files are shared
# among the workers too; then large, as each task costs the caller's executor threads
# ~0.4 ms (20,000 files in tmpfs with two workers: 1.65 s in tasks of 16, 1.39 s of
# 64, 1.27 s of 512).  Fewer items than the first task's are done here, without workers.
FIRST_CHUNK = 32
CHUNK = 512
# Chunks in flight per worker: enough for the workers to go on while the caller
# publishes a batch (4,096 renames, ~40 ms); with 2, they waited for it (100,000
# files: 3.15-3.31 s with 2, 2.86-3.00 with 8, the same with 16).
AHEAD_PER_WORKER = 8
MAX_WORKERS = 4
YOUNG = 20000  # allocations between collections of the young generation while a pool runs

_DONE, _FAILED, _HERE = 0, 1, 2


class Here(Exception):
    """Raised by ``work(shipped item, here=False)`` for an item the caller must do itself."""


def workers(threads: Optional[int]) -> int:
    """Worker processes for ``--threads``: that many, else one per CPU this process
    may run on (at most 4).  One means none: everything in the calling process."""
    if threads:
        return threads
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


_work: Optional[Callable] = None  # in a worker: the work function, inherited at fork
_work_many: Optional[Callable] = None  # and its function for many items, if any
# One byte shared with the workers (an anonymous mapping is MAP_SHARED, inherited at
# fork): set when the caller stops early, so that queued tasks end at once.  Stopping
# never cancels a future: Python 3.11's pool manager, finding the pool broken (a
# worker killed), sets an error on every queued future and dies of InvalidStateError
# at a cancelled one, leaving the rest unset (a hang in the caller; fixed in 3.12).
_stopping: Optional[mmap.mmap] = None


_PR_SET_PDEATHSIG = 1


def _start_worker(parent: int):
    """A worker's set-up: Ctrl-C and SIGTERM (sent to the whole process group, as a
    service manager's stop does) are the caller's to handle; the worker dies with the
    caller (killed, or out of memory: nothing else would tell it, as it holds both
    ends of its pipes) and names its tmp/ files by the caller's pid, so that another
    seal's cleanup keeps them while the caller lives, after this worker exits too."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0 \
            or os.getppid() != parent:  # no death signal, or the caller already gone
        os._exit(1)
    name_tmp_files_for(parent)


def _itself(item):
    return item


def _portable(e: BaseException) -> BaseException:
    """``e`` if it survives the pipe, else an error of its kind with its message (an
    exception whose constructor takes other arguments than its message does not)."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        kind = (OSError if isinstance(e, OSError) else
                VerityError if isinstance(e, VerityError) else RuntimeError)
        return kind(f"{type(e).__name__}: {e}")


# Items given to ``work_many`` at once: the caller's stop is seen between two such parts.
MANY = 64


def _run(items: list) -> bytes:
    """In a worker: (tag, result or error) for each item of a chunk, pickled here, so
    that a result that cannot cross the pipe is an error saying so (the executor would
    instead report its pool broken, as if a worker had been killed)."""
    assert _work is not None and _stopping is not None
    out: List[tuple] = []
    for start in range(0, len(items), MANY):
        part = items[start:start + MANY]
        try:
            done = [None] * len(part) if _work_many is None else _work_many(part)
        except OSError:  # (no tmp/ directory, out of fds) work() says so of each item
            done = [None] * len(part)
        except Exception as e:
            raise _portable(e) from None
        for item, value in zip(part, done):
            if value is not None:
                out.append((_DONE, value))
                continue
            if _stopping[0]:
                continue  # the caller stopped: what is made is abandoned, the rest not begun
            try:
                out.append((_DONE, _work(item, False)))
            except Here:
                out.append((_HERE, None))
            except OSError as e:  # this file could not be sealed: the caller reports it
                out.append((_FAILED, _portable(e)))
            except Exception as e:
                raise _portable(e) from None
        if _stopping[0]:
            break
    try:
        return pickle.dumps(out)
    except Exception as e:
        raise _unreadable(e) from None


def _unreadable(e: Exception) -> OSError:
    return OSError(errno.EPROTO, f"a worker process's results could not be passed back: "
                                 f"{type(e).__name__}: {e}")


def in_order(items: Iterable[T], work: Callable[[Any, bool], R], threads: Optional[int],
             abandon: Callable[[R], None], after_worker: Optional[Callable[[R], None]] = None,
             command: str = "seal", done: str = "sealed",
             shipped: Optional[Callable[[T], Any]] = None,
             work_many: Optional[Callable[[list], List[Optional[R]]]] = None,
             ) -> Iterator[Tuple[T, Optional[R], Optional[OSError]]]:
    """(item, result, None), or (item, None, the OSError it raised), for each item in
    order; any other exception is raised here.

    ``work(shipped(item), here)`` runs in ``workers(threads)`` worker processes with
    ``here`` False (it may raise ``Here``), or in this process with ``here`` True: with
    one worker, and for the items a worker handed back.  ``shipped(item)`` is what
    ``work`` needs of an item (default: the item itself): only that crosses a worker's
    pipe.  ``work_many(shipped items)``, if given, is what a worker calls first on a part
    of its chunk (``MANY`` items): a result for each item, or None for one it leaves to
    ``work(shipped, False)`` (a result of None is no result; an OSError, all of them).
    ``after_worker(result)`` is called here, in order, for each result a worker made
    (its progress).  When the caller stops early, ``abandon(result)`` is called on
    every result made for nothing (staged files to remove).  ``command`` and ``done``
    word the error of a worker that died ("seal", "sealed")."""
    if shipped is None:
        shipped = _itself
    source = iter(items)
    first = list(islice(source, FIRST_CHUNK))
    n = workers(threads)
    if n <= 1 or len(first) < FIRST_CHUNK:
        for item in chain(first, source):
            try:
                yield item, work(shipped(item), True), None
            except OSError as e:
                yield item, None, e
        return
    # The workers read these two at the first submit, which forks them all; this call's
    # own stop byte stays in a local (another call may set the globals meanwhile).
    global _work, _work_many, _stopping
    _work, _work_many = work, work_many
    _stopping = stopping = mmap.mmap(-1, 1)
    # A fork copies unwritten output, which the worker would write again at its exit.
    sys.stdout.flush()
    sys.stderr.flush()
    pending: Deque[Tuple[list, Future]] = deque()
    unread: Deque[tuple] = deque()  # results of the chunk being handed out
    pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"),
                               initializer=_start_worker, initargs=(os.getpid(),))
    size = FIRST_CHUNK

    def feed() -> bool:
        nonlocal first, size
        chunk, first = first or list(islice(source, size)), []
        size = min(CHUNK, size * 2)
        if chunk:
            pending.append((chunk, pool.submit(_run, [shipped(item) for item in chunk])))
        return bool(chunk)

    # Everything the caller holds (verify --manifest: the whole manifest tree) is left
    # out of the collector's passes until the pool ends (the workers fork at the first
    # submit): a collection in a worker writes to every object it traverses, copying
    # the caller's memory into each.
    gc.freeze()
    # And the young generation collected every YOUNG allocations, not 700, here and in the
    # workers (they fork with it): a batch's results and callbacks, thousands of objects
    # that live until it is published, were traversed again and again (100,000 files:
    # seal's CPU 3.30-3.49 -> 3.24-3.34 s, its time 1.80-1.90 -> 1.76-1.82 s).
    threshold = gc.get_threshold()
    gc.set_threshold(YOUNG, *threshold[1:])
    others = {p.pid for p in multiprocessing.active_children()}
    mine: List[multiprocessing.process.BaseProcess] = []
    try:
        feed()  # the first submit forks every worker (the fork start method)
        mine = [p for p in multiprocessing.active_children() if p.pid not in others]
        while len(pending) < AHEAD_PER_WORKER * n and feed():
            pass
        while pending:
            chunk, fut = pending[0]
            blob = fut.result()  # what a worker raised is raised here as it is
            try:
                unread.extend(pickle.loads(blob))
            except Exception as e:  # a result of a kind that cannot be rebuilt here
                raise _unreadable(e) from None
            pending.popleft()
            feed()
            for item in chunk:
                tag, value = unread.popleft()
                if tag == _DONE:
                    if after_worker is not None:
                        after_worker(value)
                    yield item, value, None
                elif tag == _FAILED:
                    yield item, None, value
                else:
                    try:
                        yield item, work(shipped(item), True), None
                    except OSError as e:
                        yield item, None, e
    except BaseException as e:
        # Stopped early (the caller's error or Ctrl-C, or closed): the rest is abandoned.
        # Another Ctrl-C meanwhile must not leave the pool half stopped (a hang at exit)
        # or print a traceback: the workers are killed and the first error goes on.
        try:
            _stop(pool, pending, unread, abandon, stopping)
        except KeyboardInterrupt:
            _kill_workers(pool, mine)
        if isinstance(e, BrokenProcessPool):
            raise OSError(errno.ECHILD, f"a {command} worker process ended abruptly (killed, "
                                        f"or out of memory?): nothing after the files reported "
                                        f"was {done}") from None
        raise
    else:
        try:
            _stop(pool, pending, unread, abandon, stopping)
        except KeyboardInterrupt:
            _kill_workers(pool, mine)
            raise
    finally:
        if _stopping is stopping:
            _work = _work_many = _stopping = None
        gc.set_threshold(*threshold)
        gc.unfreeze()


def _stop(pool: ProcessPoolExecutor, pending, unread, abandon, stopping: mmap.mmap):
    """Stop the workers (each task ends after the item it is at) and abandon every
    result not handed out."""
    stopping[0] = 1
    pool.shutdown(wait=True)
    made = [value for tag, value in unread if tag == _DONE]
    unread.clear()
    while pending:
        _, fut = pending.popleft()
        if fut.exception() is None:
            try:
                made.extend(value for tag, value in pickle.loads(fut.result()) if tag == _DONE)
            except Exception:
                pass  # not readable here: its staged files go with this process (cleanup)
    for value in made:
        abandon(value)


# Set once workers were killed: a worker killed while it sent a result leaves the pool's
# manager thread waiting for the rest of the message for ever, and the interpreter's exit
# waits for that thread.  A command that sees it set leaves with os._exit (cli.main).
workers_killed = False


def _kill_workers(pool: ProcessPoolExecutor, procs):
    """Kill the workers ``procs`` at once (this pool's: not another child of the caller's):
    their staged files carry this process's pid and go at the next seal's cleanup once it
    has exited."""
    global workers_killed
    workers_killed = True
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.join()  # reaped: none outlives seal, not even as a zombie
    pool.shutdown(wait=False)
