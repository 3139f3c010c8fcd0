"""What the library's two halves share: the path and digest types, NotSealedError, and the
helper that opens a store the way the API promises (files: ``fsutil.open_regular``).

api.py (digest, seal, verify) and verified_file.py (open_verified) both import this module and
not each other, so neither has to be imported last or from inside a function.
"""

from __future__ import annotations

import errno as _errno
import os
from dataclasses import dataclass, field
from typing import Optional, Union

from . import merkle
from .errors import VerityError

#: A filesystem path: ``str``, ``bytes`` or ``os.PathLike`` (``pathlib.Path``).
PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
#: A hash algorithm: ``"sha256"``, ``"sha512"``, or its fs-verity number (1, 2).
HashAlgArg = Union[str, int]


class NotSealedError(VerityError):
    """The file has no fs-verity digest in the store.

    It was never sealed, it was replaced by another inode since (a new file
    written over the old name), or the store is not the one it was sealed
    into.  ``errno`` is ENODATA, what the mount's ``user.fsverity.*`` xattrs
    answer for a file without verity.
    """

    errno = _errno.ENODATA


@dataclass(frozen=True)
class Digest:
    """An fs-verity file digest, as ``fsverity digest`` and ``fsverity measure`` print it.

    ``str(d)`` is ``"sha256:<hex>"``, exactly that output; ``Digest.parse`` reads it back.
    Two digests are equal when their algorithm and bytes are (``descriptor`` is
    not compared: the digest is the hash of it).  Digests are hashable.
    """

    algorithm: str
    """``"sha256"`` or ``"sha512"``."""
    digest: bytes
    """The raw digest: the hash of the 256-byte fs-verity descriptor."""
    descriptor: Optional[bytes] = field(default=None, compare=False, repr=False)
    """The 256-byte ``struct fsverity_descriptor`` this digest is the hash of, when known
    (results of ``digest``, ``seal`` and ``VerifiedFile.digest``); ``None`` otherwise
    (``Digest.parse``, ``verify`` results)."""

    def __post_init__(self) -> None:
        alg = merkle.ALGORITHMS.get(self.algorithm)
        if alg is None:
            raise ValueError(f"unknown hash algorithm {self.algorithm!r} "
                             f"(available: {' '.join(merkle.ALGORITHMS)})")
        if not isinstance(self.digest, bytes) or len(self.digest) != alg.digest_size:
            raise ValueError(f"a {alg.name} digest is {alg.digest_size} bytes")
        if self.descriptor is not None and (
                len(self.descriptor) != 256 or merkle.file_digest(alg, self.descriptor) != self.digest):
            raise ValueError("the descriptor does not hash to the digest")

    @classmethod
    def parse(cls, text: str) -> "Digest":
        """Read ``"sha256:<hex>"`` (the form ``str()`` gives); ``ValueError`` if malformed."""
        # merkle.parse_digest, leniently cased (``SHA256:``) and strictly spelled: only hex
        # digits (bytes.fromhex alone would also take spaces between them).
        name, sep, hexd = text.strip().partition(":")
        try:
            alg, raw = merkle.parse_digest(f"{name.lower()}:{hexd}" if sep else name)
            if any(c not in "0123456789abcdefABCDEF" for c in hexd):
                raise merkle.BadDigest("not only hex digits", "hex", alg)
        except merkle.BadDigest as e:
            if e.alg is None:
                raise ValueError(f"not an fs-verity digest (expected sha256:<hex> or "
                                 f"sha512:<hex>): {text!r}") from None
            raise ValueError(f"{text!r}: a {e.alg.name} digest is {2 * e.alg.digest_size} "
                             f"hex digits") from None
        return cls(alg.name, raw)

    @property
    def hex(self) -> str:
        """The digest in lowercase hex, without the algorithm (``fsverity digest --compact``)."""
        return self.digest.hex()

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.digest.hex()}"

    def __repr__(self) -> str:
        return f"Digest({str(self)!r})"


def digest_of(desc: merkle.Descriptor) -> Digest:
    return Digest(desc.params.alg.name, desc.digest, desc.raw)


def as_digest(value: Union[Digest, str]) -> Digest:
    if isinstance(value, Digest):
        return value
    if isinstance(value, str):
        return Digest.parse(value)
    raise TypeError(f"digest must be a Digest or a 'sha256:<hex>' string, not {type(value).__name__}")


def fspath(p: PathArg) -> str:
    return os.fsdecode(p)


def existing_store(path: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(_errno.ENOENT, "no verityfuse store here (seal files first, or "
                                "pass store=)", path)
    return path
