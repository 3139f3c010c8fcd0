"""The event log writer: ``Measurer.record(event)`` appends the event's line to the log and
extends the register (measure_registers) as one step under an exclusive lock, so that the
log always replays to the register (protocol/attestation.md, "Writing the log").
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
from typing import List, Optional, Tuple

from . import measure_event as me
from .measure_registers import MeasureError, Register

RUN_DIR = "/run/verityfuse"
MAX_LOG = 64 << 20  # one line per mount and per corrupt file: far below this
BOOT_ID = "/proc/sys/kernel/random/boot_id"
_BOOT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def boot_id() -> str | None:
    """This boot's id (None if the kernel does not say)."""
    try:
        with open(BOOT_ID, encoding="ascii") as f:
            return f.read().strip() or None
    except (OSError, ValueError):
        return None


class _PreviousBoot(Exception):
    """The log was moved aside (another boot's): open the new one."""


def default_log_path(register: Register) -> str:
    """One log per register: every mount measuring into it appends to the same log."""
    return os.path.join(RUN_DIR, f"events-{register.name}.log")


def _only_ours(st: os.stat_result, path: str, register: Register):
    """Refuse a log (or its LOG.boot) that another user owns or that group or others may
    write: whoever can write the log can put events into the register, as a logged line
    one ahead of the register is extended by the next record (a crashed writer's)."""
    euid = os.geteuid()
    if st.st_uid != euid:
        why = f"belongs to uid {st.st_uid}, not to this process's uid {euid}"
    elif st.st_mode & 0o022:
        why = f"may be written by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    else:
        return
    raise MeasureError(f"{path}: {why}: whoever can write it can put events into "
                       f"{register.name}; not measuring")


class Measurer:
    """Records events: log line and register extend as one step (see ``record``)."""

    def __init__(self, register: Register, log_path: str | None = None):
        self.register = register
        self.log_path = log_path or default_log_path(register)
        # The log as this Measurer last left it, checked: (st_dev, st_ino, size, the value
        # its lines replay to).  The next record parses only what was appended since (one
        # line per violated file: reparsing it all made each record cost the whole log).
        self._seen: Optional[Tuple[int, int, int, bytes]] = None

    def _lock(self) -> int:
        """LOG.lock, exclusively locked: the writers' lock (created 0600; dirs 0755).  Not
        the log itself, which verifiers' collectors read: any user who can open a file can
        flock it, and one holding the log's lock stalled every record (a violation's, the
        unmount's, and with it the daemon's exit)."""
        d = os.path.dirname(os.path.abspath(self.log_path))
        path = self.log_path + ".lock"
        try:
            if not os.path.isdir(d):
                os.makedirs(d, mode=0o755, exist_ok=True)
                os.chmod(d, 0o755)  # whatever the umask: verifiers' collectors read it
        except OSError as e:
            raise MeasureError(f"cannot create the event log's directory {d}: {e.strerror}") from None
        try:  # O_NONBLOCK: a FIFO planted there is refused below, never waited on
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise MeasureError(f"cannot open {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise MeasureError(f"{path} is not a regular file")
            _only_ours(st, path, self.register)
            if st.st_mode & 0o077:
                os.fchmod(fd, 0o600)  # (ours: no one else may open it to lock it)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_log(self) -> int:
        """The log, open for append (under ``_lock``); created (file 0644) if new."""
        for _ in range(10):
            try:
                try:
                    fd = os.open(self.log_path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL
                                 | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                    os.fchmod(fd, 0o644)
                except FileExistsError:
                    fd = os.open(self.log_path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    os.close(fd)
                    raise MeasureError(f"event log {self.log_path} is not a regular file")
                try:
                    _only_ours(st, self.log_path, self.register)
                except MeasureError:
                    os.close(fd)
                    raise
                try:
                    now = os.stat(self.log_path, follow_symlinks=False)
                    same = (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
                except FileNotFoundError:
                    same = False
                if same:
                    return fd
                os.close(fd)  # replaced or removed between the open and the check: again
            except OSError as e:
                raise MeasureError(f"cannot open event log {self.log_path}: {e.strerror}") from None
        raise MeasureError(f"event log {self.log_path} keeps being replaced; not measuring")

    def _reconcile(self, fd: int) -> bytes:
        """Start an empty log, or check that the log replays to the register; returns the
        register's value.  A trailing line that a crashed writer logged but never extended
        is extended now (the event happened; the verifier should see it)."""
        alg = self.register.alg
        st = os.fstat(fd)
        boot = boot_id()
        if st.st_size == 0:
            try:
                value = self.register.read()
            except MeasureError:
                self._remove_if_empty(fd)  # this record began it: not left behind, empty
                raise
            self._write_boot(boot)
            self._clear_pending()
            self._append(fd, me.init_line(alg, value) + "\n", 0)
            return value
        if boot is not None:
            written = self._read_boot()
            if written is not None and not _BOOT_ID.fullmatch(written):
                raise MeasureError(f"{self.log_path}.boot does not hold a boot id "
                                   f"({written[:40]!r}); not measuring into {self.log_path}")
            if written not in (None, boot):
                self._move_aside()
        if st.st_size > MAX_LOG:
            raise MeasureError(f"event log {self.log_path} is larger than {MAX_LOG} bytes")
        init, events = self._parse(fd, st)
        value = self.register.read()
        if me.replay(alg, init, events) == value:
            self._clear_pending()  # (one whose extend took effect before its writer died)
            return value
        if events and me.replay(alg, init, events[:-1]) == value and \
                self._pending() == self._marker(me.event_digest(alg, events[-1])):
            self.register.extend(me.event_digest(alg, events[-1]))
            self._clear_pending()
            return me.replay(alg, init, events)
        raise MeasureError(
            f"event log {self.log_path} does not replay to {self.register.name} "
            f"({me.replay(alg, init, events).hex()} vs {value.hex()}): something else extends "
            f"this register. Give verityfuse a register of its own, or keep one log for it")

    # A log replays to its register in the boot it was written in only: after a reboot the
    # register starts again, and the one-event-ahead recovery would extend an event of the
    # previous boot as if it had happened in this one (a log kept on persistent storage).
    # The boot id is kept beside the log (LOG.boot); a log another boot wrote is moved to
    # LOG.previous-boot and a new one begun.  A log without LOG.boot (an older verityfuse's)
    # is not checked.

    def _read_boot(self) -> str | None:
        return self._read_beside(".boot")

    def _write_boot(self, boot: str | None):
        if boot is None:
            self._remove_beside(".boot")
        else:
            self._write_beside(".boot", boot)

    def _read_beside(self, suffix: str) -> str | None:
        """What LOG.boot or LOG.pending holds (None if absent): a regular file of ours."""
        path = self.log_path + suffix
        try:  # O_NONBLOCK: a FIFO planted there is refused below, never waited on
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise MeasureError(f"{path} is not a regular file")
            _only_ours(st, path, self.register)
            return os.read(fd, 256).decode("ascii", "replace").strip()
        finally:
            os.close(fd)

    def _write_beside(self, suffix: str, text: str, sync: bool = True):
        path = self.log_path + suffix
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o644)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise MeasureError(f"{path} is not a regular file")
            _only_ours(st, path, self.register)  # before truncating what may be another's
            os.ftruncate(fd, 0)
            os.write(fd, text.encode("ascii") + b"\n")
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _remove_beside(self, suffix: str):
        try:
            os.unlink(self.log_path + suffix)
        except FileNotFoundError:
            pass

    def _move_aside(self):
        os.replace(self.log_path, self.log_path + ".previous-boot")
        os.unlink(self.log_path + ".boot")
        self._clear_pending()
        self._seen = None
        raise _PreviousBoot()

    # A line one ahead of the register is extended only if LOG.pending says a record of
    # this register began it (written before the line, removed once the register agrees).
    # Without it, a log one ahead is not a crash: another register's log (two registers
    # given one --event-log), or a register reset under its log, and extending its last
    # line would put into this register an event never measured into it.

    def _marker(self, digest: bytes) -> str:
        return f"{self.register.name} {digest.hex()}"

    def _mark_pending(self, digest: bytes):
        # Not synced: it matters within this boot only (a log of another boot is moved aside).
        self._write_beside(".pending", self._marker(digest), sync=False)

    def _pending(self) -> str | None:
        return self._read_beside(".pending")

    def _clear_pending(self):
        self._remove_beside(".pending")

    def _parse(self, fd: int, st: os.stat_result) -> Tuple[bytes, List[me.Event]]:
        """(the value to replay from, the events after it) of the log open as ``fd``: the
        lines appended since this Measurer last left it (the same file, not shorter:
        appended to, by it or other writers), from the value they started at; else, or if
        those lines do not parse, all of it (whose error then names the right line)."""
        alg, seen = self.register.alg, self._seen
        if seen is not None and seen[:2] == (st.st_dev, st.st_ino) and seen[2] <= st.st_size:
            tail = os.pread(fd, st.st_size - seen[2], seen[2])
            try:
                _, _, events = me.parse_log(me.init_line(alg, seen[3]) + "\n" + tail.decode("ascii"))
                return seen[3], events
            except (UnicodeDecodeError, me.EventLogError):
                pass
        text = os.pread(fd, st.st_size, 0)
        try:
            log_alg, init, events = me.parse_log(text.decode("ascii"))
        except (UnicodeDecodeError, me.EventLogError) as e:
            raise MeasureError(f"event log {self.log_path} is malformed ({e}); not measuring "
                               f"into {self.register.name}") from None
        if log_alg != alg:
            raise MeasureError(f"event log {self.log_path} is {log_alg}, but register "
                               f"{self.register.name} is {alg}: give each register its own log")
        return init, events

    def _append(self, fd: int, text: str, size: int):
        """Append and fsync; on failure, cut the log back to ``size`` (never leave half a line)."""
        data = text.encode("ascii")
        try:
            n = os.write(fd, data)
            if n != len(data):
                raise OSError(errno.EIO, f"short write ({n} of {len(data)} bytes)")
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass  # the next record reports the torn line and refuses to measure
            raise

    def record(self, event: me.Event) -> None:
        """Append the event to the log, then extend the register, under the log's lock.

        The order keeps log and register in agreement: the line is written and fsynced first;
        if the extend then fails, the register is read back, and unless it shows the extend
        the line is truncated away and MeasureError raised (the event did not happen).  A crash
        between the two leaves a logged, unextended line that the next record extends; so does
        a register that cannot be read back (the extend may have taken effect: a line cut
        away then would leave log and register disagreeing for good)."""
        alg = self.register.alg
        try:
            line = event.line()
        except ValueError as e:
            raise MeasureError(f"not a measurable event: {e}") from None
        digest = me.event_digest(alg, event)
        lock = self._lock()
        try:
            self._record_locked(line, digest)
        finally:
            os.close(lock)

    def _record_locked(self, line: str, digest: bytes) -> None:
        alg = self.register.alg
        fd = self._open_log()
        try:
            try:
                old = self._reconcile(fd)
            except _PreviousBoot:
                os.close(fd)
                fd = -1
                fd = self._open_log()  # a new log, begun by this record
                old = self._reconcile(fd)
            self._seen = None  # set again once this record leaves log and register agreeing
            new = me.extend(alg, old, digest)  # the register's value once the event is in
            size = os.fstat(fd).st_size
            self._mark_pending(digest)
            self._append(fd, line + "\n", size)
            try:
                self.register.extend(digest)
                self._left(fd, new)
                self._clear_pending()
            except MeasureError as e:
                try:
                    done = self.register.read() == new
                except MeasureError as r:
                    raise MeasureError(  # the marker stays: the next record extends it
                        f"{e}; reading the register back failed too ({r}), so the event "
                        f"stays in {self.log_path}: the next record extends it unless the "
                        f"register already holds it") from None
                if done:
                    self._left(fd, new)
                    self._clear_pending()
                    return
                try:
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                    self._clear_pending()
                except OSError as t:
                    raise MeasureError(f"{e}; and removing the event from {self.log_path} failed "
                                       f"({t.strerror}): the next record will extend it") from None
                raise MeasureError(f"{e}; the event was not recorded") from None
        except OSError as e:
            raise MeasureError(f"writing event log {self.log_path} failed: {e.strerror}") from None
        finally:
            if fd >= 0:
                os.close(fd)

    def _remove_if_empty(self, fd: int):
        """Remove the log open (and locked) as ``fd`` if it is still empty and still at its
        path: a first record that failed (a register that cannot be read) left it so."""
        try:
            st, now = os.fstat(fd), os.stat(self.log_path, follow_symlinks=False)
            if st.st_size == 0 and (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                os.unlink(self.log_path)
        except OSError:
            pass  # gone already, or not ours to remove: as it was

    def _left(self, fd: int, value: bytes):
        st = os.fstat(fd)
        self._seen = (st.st_dev, st.st_ino, st.st_size, value)
