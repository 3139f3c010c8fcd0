"""Measurement registers (TPM PCR, TDX RTMR, an emulated file); measure.py writes the log.

One interface, ``Register`` (extend, read), one class per backend, chosen by ``open_register``:

    tpm[:PCR]                  TPM 2.0 PCR (default 23), SHA-256 bank, through tpm2-pytss
    rtmr[:N]                   Intel TDX RTMR N (default 3), SHA-384, through the kernel's
                               measurement attributes (Linux >= 6.16, tdx_guest)
    file:[sha256:|sha384:|sha512:]PATH   an emulated register in a file (default sha256)
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import tempfile
from typing import Protocol

from . import measure_event as me

TDX_MEASUREMENTS = "/sys/devices/virtual/misc/tdx_guest/measurements"


class MeasureError(Exception):
    """A register or log operation failed; the message says what and what to do."""


def failure_text(e: Exception) -> str:
    """A failed record as a log line says it: a MeasureError's message; any other error
    with its type (a bug's)."""
    return str(e) if isinstance(e, MeasureError) else f"{type(e).__name__}: {e}"


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
        _check_digest(self, digest)
        with self._esapi() as esapi:  # first: without tpm2-pytss, its message says so
            from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
            from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA
            try:
                esapi.pcr_extend(ESYS_TR.PCR0 + self.pcr, TPML_DIGEST_VALUES(
                    [TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=digest))]))
            except Exception as e:
                raise MeasureError(f"TPM2_PCR_Extend of PCR {self.pcr} (sha256) failed: {e}") from None

    def read(self) -> bytes:
        with self._esapi() as esapi:  # first: without tpm2-pytss, its message says so
            from tpm2_pytss.types import TPML_PCR_SELECTION
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
                         0o600)  # (one another user could open, it could lock)
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
