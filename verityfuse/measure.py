"""Measurement registers (TPM PCR, TDX RTMR, an emulated file) and the event log writer.

One interface, ``Register`` (extend, read), one class per backend, chosen by ``open_register``:

    tpm[:PCR]                  TPM 2.0 PCR (default 23), SHA-256 bank, through tpm2-pytss
    rtmr[:N]                   Intel TDX RTMR N (default 3), SHA-384, through the kernel's
                               measurement attributes (Linux >= 6.16, tdx_guest)
    file:[sha256:|sha384:|sha512:]PATH   an emulated register in a file (default sha256)

``Measurer.record(event)`` appends the event's line to the log and extends the register as
one step under an exclusive lock, so that the log always replays to the register
(protocol/attestation.md, "Writing the log").
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import tempfile
from typing import Protocol

from . import measure_event as me

RUN_DIR = "/run/verityfuse"
TDX_MEASUREMENTS = "/sys/devices/virtual/misc/tdx_guest/measurements"
MAX_LOG = 64 << 20  # one line per mount and per corrupt file: far below this


class MeasureError(Exception):
    """A register or log operation failed; the message says what and what to do."""


class Register(Protocol):
    alg: str
    name: str

    def extend(self, digest: bytes) -> None: ...

    def read(self) -> bytes: ...


def _check_digest(reg: Register, digest: bytes):
    if len(digest) != me.ALGS[reg.alg]:
        raise MeasureError(f"{reg.name}: a {reg.alg} extend takes {me.ALGS[reg.alg]} bytes, "
                           f"not {len(digest)}")


# -- TPM 2.0 --------------------------------------------------------------------

class TpmRegister:
    """A PCR of the SHA-256 bank.  The TCTI is TPM2TOOLS_TCTI's (tpm2-tools syntax), else the
    kernel's resource manager; a connection per call, so a daemon that forks keeps working."""

    alg = "sha256"

    def __init__(self, pcr: int = 23):
        self.pcr = pcr
        self.name = f"tpm-pcr{pcr}"
        self.tcti = os.environ.get("TPM2TOOLS_TCTI") or "device:/dev/tpmrm0"

    def _esapi(self):
        try:
            from tpm2_pytss import ESAPI  # only this backend needs the TSS
        except ImportError as e:
            raise MeasureError(f"the TPM backend needs tpm2-pytss ({e}): pip install "
                               f"verityfuse[tpm] (it builds against Debian's libtss2-dev)") from None
        kind, _, conf = self.tcti.partition(":")
        if kind == "device" and not os.path.exists(conf or "/dev/tpmrm0"):
            raise MeasureError(f"no TPM: {conf or '/dev/tpmrm0'} does not exist (attach a "
                               f"(v)TPM to this machine, or set TPM2TOOLS_TCTI)")
        try:
            return ESAPI(self.tcti)
        except Exception as e:  # TSS2_Exception; a bad TCTI string is a ValueError
            raise MeasureError(f"cannot open the TPM through TCTI {self.tcti!r}: {e}") from None

    def extend(self, digest: bytes) -> None:
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
        from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

        _check_digest(self, digest)
        with self._esapi() as esapi:
            try:
                esapi.pcr_extend(ESYS_TR.PCR0 + self.pcr, TPML_DIGEST_VALUES(
                    [TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=digest))]))
            except Exception as e:
                raise MeasureError(f"TPM2_PCR_Extend of PCR {self.pcr} (sha256) failed: {e}") from None

    def read(self) -> bytes:
        from tpm2_pytss.types import TPML_PCR_SELECTION

        with self._esapi() as esapi:
            try:
                _, sel, values = esapi.pcr_read(TPML_PCR_SELECTION.parse(f"sha256:{self.pcr}"))
            except Exception as e:
                raise MeasureError(f"TPM2_PCR_Read of PCR {self.pcr} (sha256) failed: {e}") from None
        if sel.count != 1 or len(values) != 1 or len(bytes(values[0])) != 32:
            raise MeasureError(f"the TPM did not return PCR {self.pcr} of the SHA-256 bank "
                               f"(is the bank allocated? tpm2_getcap pcrs)")
        return bytes(values[0])


# -- Intel TDX RTMR ---------------------------------------------------------------

class RtmrRegister:
    """An RTMR through the kernel's TSM measurement attribute ``rtmrN:sha384``: a read returns
    the 48-byte value, a write of exactly 48 bytes at offset 0 extends it
    (Documentation/ABI/testing/sysfs-devices-virtual-misc-tdx_guest).  VERITYFUSE_TSM_MEASUREMENTS
    replaces the directory, for tests against a fake tree only."""

    alg = "sha384"

    def __init__(self, index: int = 3):
        self.index = index
        self.name = f"rtmr{index}"
        base = os.environ.get("VERITYFUSE_TSM_MEASUREMENTS") or TDX_MEASUREMENTS
        self.path = os.path.join(base, f"rtmr{index}:sha384")

    def _open(self, flags: int) -> int:
        try:  # never O_CREAT: a missing attribute is no TDX, not a file to make
            return os.open(self.path, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MeasureError(f"no TDX RTMR interface: {self.path} does not exist (needs a TDX "
                               f"guest with Linux >= 6.16 and the tdx_guest driver)") from None
        except OSError as e:
            raise MeasureError(f"{self.path}: {e.strerror}") from None

    def extend(self, digest: bytes) -> None:
        _check_digest(self, digest)
        fd = self._open(os.O_WRONLY)
        try:
            n = os.write(fd, digest)
        except OSError as e:
            raise MeasureError(f"extending RTMR {self.index} ({self.path}) failed: {e.strerror}") from None
        finally:
            os.close(fd)
        if n != len(digest):
            raise MeasureError(f"extending RTMR {self.index}: the kernel took {n} of 48 bytes")

    def read(self) -> bytes:
        fd = self._open(os.O_RDONLY)
        try:
            data = os.read(fd, 4096)
        except OSError as e:
            raise MeasureError(f"reading RTMR {self.index} ({self.path}) failed: {e.strerror}") from None
        finally:
            os.close(fd)
        if len(data) != 48:
            raise MeasureError(f"{self.path}: read {len(data)} bytes, expected a 48-byte RTMR value")
        return data


# -- emulated ----------------------------------------------------------------------

class FileRegister:
    """An extend-only register emulated in a file holding its value in hex.  Created at zero on
    first use (O_EXCL, O_NOFOLLOW); every change is a new file renamed over it, under an flock
    on PATH.lock, so concurrent extends are never lost and a reader never sees half a value."""

    def __init__(self, path: str, alg: str = "sha256"):
        self.alg = alg
        self.path = os.path.abspath(path)
        tag = hashlib.sha256(self.path.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        self.name = f"file-{alg}-{tag}"

    def _locked(self) -> int:
        try:
            fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fd
        except OSError as e:
            raise MeasureError(f"cannot lock register file {self.path}: {e.strerror}") from None

    def _load(self) -> bytes:
        """The value; creates the register at zero if there is none.  Caller holds the lock."""
        size = me.ALGS[self.alg]
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            self._store(bytes(size), create=True)
            return bytes(size)
        except OSError as e:
            raise MeasureError(f"register file {self.path}: {e.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise MeasureError(f"register file {self.path} is not a regular file")
            text = os.read(fd, 4 * size)
        finally:
            os.close(fd)
        try:
            value = bytes.fromhex(text.decode("ascii").strip())
        except ValueError:
            value = b""
        if len(value) != size:
            raise MeasureError(f"register file {self.path} does not hold a {self.alg} value "
                               f"({size} bytes in hex); was it made with another algorithm?")
        return value

    def _store(self, value: bytes, create: bool = False):
        d = os.path.dirname(self.path)
        tmp = None
        try:
            if create:  # first use: the name must be new, never a planted symlink
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o644)
            else:
                fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(self.path) + ".")
            try:
                os.fchmod(fd, 0o644)
                os.write(fd, value.hex().encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            if tmp is not None:
                os.rename(tmp, self.path)
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            raise MeasureError(f"cannot write register file {self.path}: {e.strerror}") from None

    def extend(self, digest: bytes) -> None:
        _check_digest(self, digest)
        lock = self._locked()
        try:
            self._store(me.extend(self.alg, self._load(), digest))
        finally:
            os.close(lock)

    def read(self) -> bytes:
        lock = self._locked()
        try:
            return self._load()
        finally:
            os.close(lock)


def open_register(spec: str) -> Register:
    """A register from its --measure spec (see the module docstring)."""
    kind, _, arg = spec.partition(":")

    def index(default: int, top: int) -> int:
        if not arg:
            return default
        if not (arg.isascii() and arg.isdigit()) or int(arg) > top:
            raise MeasureError(f"measure {spec!r}: {kind} index must be 0-{top}, not {arg!r}")
        return int(arg)

    if kind == "tpm":
        return TpmRegister(index(23, 23))
    if kind == "rtmr":
        return RtmrRegister(index(3, 3))
    if kind == "file":
        alg, sep, rest = arg.partition(":")
        if sep and alg in me.ALGS:
            arg = rest
        else:
            alg = "sha256"
        if not arg:
            raise MeasureError(f"measure {spec!r}: file needs a path (file:[sha384:]PATH)")
        return FileRegister(arg, alg)
    raise MeasureError(f"measure {spec!r}: unknown backend (tpm[:PCR], rtmr[:N] or "
                       f"file:[sha256:|sha384:]PATH)")


def default_log_path(register: Register) -> str:
    """One log per register: every mount measuring into it appends to the same log."""
    return os.path.join(RUN_DIR, f"events-{register.name}.log")


class Measurer:
    """Records events: log line and register extend as one step (see ``record``)."""

    def __init__(self, register: Register, log_path: str | None = None):
        self.register = register
        self.log_path = log_path or default_log_path(register)

    def _open_locked(self) -> int:
        """The log, open for append and exclusively locked; created (dirs 0755, file 0644) if new."""
        d = os.path.dirname(os.path.abspath(self.log_path))
        try:
            if not os.path.isdir(d):
                os.makedirs(d, mode=0o755, exist_ok=True)
                os.chmod(d, 0o755)  # whatever the umask: verifiers' collectors read it
        except OSError as e:
            raise MeasureError(f"cannot create the event log's directory {d}: {e.strerror}") from None
        for _ in range(10):
            try:
                try:
                    fd = os.open(self.log_path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL
                                 | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                    os.fchmod(fd, 0o644)
                except FileExistsError:
                    fd = os.open(self.log_path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
                fcntl.flock(fd, fcntl.LOCK_EX)
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    os.close(fd)
                    raise MeasureError(f"event log {self.log_path} is not a regular file")
                try:
                    now = os.stat(self.log_path, follow_symlinks=False)
                    same = (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
                except FileNotFoundError:
                    same = False
                if same:
                    return fd
                os.close(fd)  # replaced or removed while we waited for the lock: again
            except OSError as e:
                raise MeasureError(f"cannot open event log {self.log_path}: {e.strerror}") from None
        raise MeasureError(f"event log {self.log_path} keeps being replaced; not measuring")

    def _reconcile(self, fd: int) -> bytes:
        """Start an empty log, or check that the log replays to the register; returns the
        register's value.  A trailing line that a crashed writer logged but never extended
        is extended now (the event happened; the verifier should see it)."""
        alg = self.register.alg
        size = os.fstat(fd).st_size
        if size == 0:
            value = self.register.read()
            self._append(fd, me.init_line(alg, value) + "\n", 0)
            return value
        if size > MAX_LOG:
            raise MeasureError(f"event log {self.log_path} is larger than {MAX_LOG} bytes")
        text = os.pread(fd, size, 0)
        try:
            log_alg, init, events = me.parse_log(text.decode("ascii"))
        except (UnicodeDecodeError, me.EventLogError) as e:
            raise MeasureError(f"event log {self.log_path} is malformed ({e}); not measuring "
                               f"into {self.register.name}") from None
        if log_alg != alg:
            raise MeasureError(f"event log {self.log_path} is {log_alg}, but register "
                               f"{self.register.name} is {alg}: give each register its own log")
        value = self.register.read()
        if me.replay(alg, init, events) == value:
            return value
        if events and me.replay(alg, init, events[:-1]) == value:
            self.register.extend(me.event_digest(alg, events[-1]))
            return me.replay(alg, init, events)
        raise MeasureError(
            f"event log {self.log_path} does not replay to {self.register.name} "
            f"({me.replay(alg, init, events).hex()} vs {value.hex()}): something else extends "
            f"this register. Give verityfuse a register of its own, or keep one log for it")

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
        fd = self._open_locked()
        try:
            old = self._reconcile(fd)
            size = os.fstat(fd).st_size
            self._append(fd, line + "\n", size)
            try:
                self.register.extend(digest)
            except MeasureError as e:
                try:
                    done = self.register.read() == me.extend(alg, old, digest)
                except MeasureError as r:
                    raise MeasureError(
                        f"{e}; reading the register back failed too ({r}), so the event "
                        f"stays in {self.log_path}: the next record extends it unless the "
                        f"register already holds it") from None
                if done:
                    return
                try:
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                except OSError as t:
                    raise MeasureError(f"{e}; and removing the event from {self.log_path} failed "
                                       f"({t.strerror}): the next record will extend it") from None
                raise MeasureError(f"{e}; the event was not recorded") from None
        except OSError as e:
            raise MeasureError(f"writing event log {self.log_path} failed: {e.strerror}") from None
        finally:
            os.close(fd)
