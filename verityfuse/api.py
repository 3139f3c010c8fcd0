"""The public API: fs-verity digests, sealing, verifying and verified reads, without FUSE.

Everything here is re-exported by the package (``import verityfuse``); see
docs/api.md for examples.  The functions wrap the same code the command line
and the mount use, so a digest is byte for byte what ``fsverity digest``
prints and ``open_verified`` checks reads exactly as a mount does.

This module imports neither pyfuse3 nor trio nor cryptography, and the store,
seal and verify machinery only when a function needs it.
"""

from __future__ import annotations

import errno as _errno
import os
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Iterable, Iterator, List, Literal, Optional, Tuple, cast

from . import fsutil, merkle, treebuild
from .api_core import (Digest, HashAlgArg, NotSealedError, PathArg, digest_of, existing_store,
                       fspath)
from .verified_file import VerifiedFile, open_verified

if TYPE_CHECKING:
    from .source_dir import SourceDir
    from .store import Store

__all__ = [
    "Digest",
    "FileResult",
    "NotSealedError",
    "Status",
    "VerifiedFile",
    "VerifyReport",
    "digest",
    "open_verified",
    "seal",
    "verify",
]

#: What ``verify`` found for one file.
Status = Literal["ok", "corrupt", "unsealed", "error"]


# -- digests --------------------------------------------------------------------------


def _params(hash_alg: HashAlgArg, block_size: int, salt: bytes) -> merkle.Params:
    if not isinstance(salt, (bytes, bytearray, memoryview)):
        raise TypeError(f"salt must be bytes (bytes.fromhex for a hex string), not {type(salt).__name__}")
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, not {type(block_size).__name__}")
    return merkle.Params(merkle.hash_alg(hash_alg), block_size, bytes(salt))


def _threads(threads: Optional[int]) -> Optional[int]:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or not 1 <= threads <= treebuild.MAX_THREADS):
        raise ValueError(f"threads must be an int from 1 to {treebuild.MAX_THREADS} or None, "
                         f"not {threads!r}")
    return threads


def digest(path: PathArg, *, hash_alg: HashAlgArg = "sha256", block_size: int = 4096,
           salt: bytes = b"", threads: Optional[int] = None) -> Digest:
    """The fs-verity digest of the regular file at ``path``, as ``fsverity digest`` computes it.

    Nothing is written anywhere: this only reads the file (symlinks are followed).

    :param path: the file.
    :param hash_alg: ``"sha256"`` (default) or ``"sha512"``, or an fs-verity
        algorithm number (1, 2), as ``fsverity digest --hash-alg``.
    :param block_size: the Merkle tree block size: a power of two, at least twice
        the hash size (4096 by default; ``--block-size``).
    :param salt: at most 32 bytes prepended (padded) to every hashed block (``--salt``,
        which takes it in hex: pass ``bytes.fromhex(...)``).
    :param threads: hashing threads; ``None`` means the number of CPUs, at most 4.
    :returns: the :class:`Digest`, with its descriptor.
    :raises OSError: the file cannot be opened or read, is not a regular file, or
        changed size while it was read.
    :raises verityfuse.errors.InvalidParameters: (a ``ValueError``) an unknown algorithm, a
        bad block size, a salt longer than 32 bytes, or a file too large for the
        kernel's tree depth.
    :raises TypeError: ``salt`` is not bytes or ``block_size`` not an int.
    """
    params = _params(hash_alg, block_size, salt)
    threads = _threads(threads)
    fd = fsutil.open_regular(fspath(path), follow=True)
    try:
        desc = treebuild.build_tree(fd, params, threads=threads)
    finally:
        os.close(fd)
    return digest_of(desc)


# -- seal -----------------------------------------------------------------------------


def _inside(path: str, directory: str) -> bool:
    rel = os.path.relpath(path, directory)
    return rel != ".." and not rel.startswith("../")


def _seal_targets(src: "SourceDir", store: "Store", paths: Iterable[PathArg]) -> List[str]:
    from .sealing import walk_files

    rels: Dict[str, None] = {}
    source = src.path
    src_abs = os.path.abspath(source)
    for p in paths:
        full = os.path.abspath(os.path.join(source, fspath(p)))
        if not _inside(full, src_abs):
            raise ValueError(f"{fspath(p)!r} is not inside {source!r}")
        if _inside(full, store.path):
            raise ValueError(f"{fspath(p)!r} is inside the store {store.path!r}")
        rel = os.path.relpath(full, src_abs)
        st = src.lstat(rel)
        if stat.S_ISDIR(st.st_mode):
            for sub in walk_files(src, store, rel):
                rels[sub] = None
        else:
            rels[rel] = None
    return list(rels)


def seal(source: PathArg, paths: Optional[Iterable[PathArg]] = None, *,
         store: Optional[PathArg] = None, hash_alg: HashAlgArg = "sha256",
         block_size: int = 4096, salt: bytes = b"",
         threads: Optional[int] = None) -> Dict[str, Digest]:
    """Seal regular files under ``source``: build each one's Merkle tree into the store
    and record its digest for its inode, as ``verityfuse seal`` does.

    A sealed file then reads through a mount (and :func:`open_verified`) only
    if it still hashes to that digest.  Resealing an unchanged file is idempotent;
    each file is committed atomically (a crash leaves it sealed or not, never half).

    :param source: the directory whose files are sealed.
    :param paths: files or directories to seal, relative to ``source`` (or absolute,
        inside it); a directory means every regular file under it.  ``None``
        (default) seals every regular file under ``source``.  Symlinks are never
        followed, and the store itself is skipped.
    :param store: the store directory, created if missing; default ``SOURCE/.verityfuse``
        (hidden by the mount).
    :param hash_alg: as for :func:`digest`.
    :param block_size: as for :func:`digest`.
    :param salt: as for :func:`digest`.
    :param threads: as for :func:`digest`.
    :returns: ``{relative path: Digest}`` for every file sealed, in sealing order.
    :raises NotADirectoryError: ``source`` is not a directory.
    :raises TypeError: ``paths`` is one path, not a list of them.
    :raises ValueError: a path is outside ``source`` or inside the store; bad
        parameters (``verityfuse.errors.InvalidParameters``).
    :raises OSError: a file cannot be read, a directory cannot be listed, or a named
        path is missing, a symlink, under a symlink or not a regular file (files sealed
        before it stay sealed).
    :raises verityfuse.errors.VerityError: the store is malformed or of format 1
        (``verityfuse upgrade-store``).
    """
    from .sealing import seal_path, walk_files
    from .source_dir import SourceDir
    from .store import store_of

    if isinstance(paths, (str, bytes, os.PathLike)):  # a string is an iterable of paths too
        raise TypeError(f"paths is a list of paths, not one: seal(source, [{paths!r}])")

    src = fspath(source)
    if not os.path.isdir(src):
        raise NotADirectoryError(_errno.ENOTDIR, "Not a directory", src)
    params = _params(hash_alg, block_size, salt)
    threads = _threads(threads)
    out: Dict[str, Digest] = {}
    with store_of(src, fspath(store) if store is not None else None, create=True) as st, \
            SourceDir(src) as sd:
        st.cleanup_tmp()
        rels = list(walk_files(sd, st)) if paths is None else _seal_targets(sd, st, paths)
        for rel in rels:
            built: List[merkle.Descriptor] = []
            try:
                seal_path(st, sd, rel, params, check=built.append, threads=threads)
            except OSError as e:
                if e.filename is not None or e.errno is None:
                    raise
                # The file's own error (it changed while it was read) names it: in a
                # tree of thousands, "file shrank while hashing" alone says not which.
                raise type(e)(e.errno, e.strerror, sd.full(rel)) from None
            out[rel] = digest_of(built[-1])
    return out


# -- verify ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FileResult:
    """What :func:`verify` found for one regular file (or for a directory it could not
    list: an ``"error"``, as nothing under it was verified)."""

    path: str
    """Relative to the source directory."""
    status: Status
    """``"ok"``: sealed, every byte matches.  ``"corrupt"``: sealed, but its data, its
    tree, its size or its store entry does not match.  ``"unsealed"``: no digest in
    the store.  ``"error"``: it could not be read (permissions, I/O error)."""
    message: str = ""
    """Why, for ``corrupt`` and ``error`` (the first bad offset with the expected and
    actual hash for a corrupt block)."""
    digest: Optional[Digest] = None
    """The digest it was sealed with (``ok`` and ``corrupt``; ``None`` when the store
    entry itself is unreadable)."""
    error: Optional[BaseException] = field(default=None, compare=False, repr=False)
    """The exception behind ``corrupt`` or ``error``: a ``verityfuse.errors.VerityError``
    (``IntegrityError``, ``SizeMismatch``, ``StoreCorrupt``) or an ``OSError``."""


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found: one :class:`FileResult` per regular file, sorted by path.

    Iterating over a report gives its results; ``len()`` is their number.
    """

    source: str
    store: str
    strict: bool
    files: Tuple[FileResult, ...]
    stale_entries: int = 0
    """Index entries naming no file under ``source`` (files deleted or replaced since
    they were sealed): harmless, not a failure."""

    def __iter__(self) -> Iterator[FileResult]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def count(self, status: Status) -> int:
        """How many files have ``status``."""
        return sum(1 for f in self.files if f.status == status)

    @property
    def sealed(self) -> int:
        """How many files are sealed (``ok`` or ``corrupt``)."""
        return self.count("ok") + self.count("corrupt")

    @property
    def failures(self) -> Tuple[FileResult, ...]:
        """The results that make the report not ``ok``: ``corrupt`` and ``error``, and
        ``unsealed`` too when ``strict``."""
        bad = ("corrupt", "error", "unsealed") if self.strict else ("corrupt", "error")
        return tuple(f for f in self.files if f.status in bad)

    @property
    def ok(self) -> bool:
        """True when nothing failed and at least one sealed file was verified (as the
        CLI's exit code: a source with nothing sealed usually means the wrong store)."""
        return self.sealed > 0 and not self.failures

    def __str__(self) -> str:
        sealed, corrupt = self.sealed, self.count("corrupt")
        unsealed, errors = self.count("unsealed"), self.count("error")
        return (f"{sealed - corrupt} of {sealed} sealed files intact"
                + (f", {unsealed} unsealed" if unsealed else "")
                + (f", {errors} unreadable" if errors else ""))


def verify(source: PathArg, *, store: Optional[PathArg] = None, strict: bool = False) -> VerifyReport:
    """Read every regular file under ``source`` and check each sealed one against its
    tree, as ``verityfuse verify`` does.  Nothing is written.

    :param source: the directory.
    :param store: the store directory; default ``SOURCE/.verityfuse``.
    :param strict: count unsealed regular files as failures (``--strict``).
    :returns: a :class:`VerifyReport`; ``report.ok`` says whether it all passed.
        Corruption is reported, never raised.
    :raises FileNotFoundError: ``source`` or the store does not exist.
    :raises verityfuse.errors.VerityError: the store is malformed or of format 1.
    """
    from .sealing import StaleCount, describe_failure, verify_file, walk_files
    from .source_dir import SourceDir
    from .store import default_store, store_of
    from .verifier import ONE_PASS_CACHE_BYTES, TreeBlockCache

    src = fspath(source)
    if not os.path.isdir(src):
        raise FileNotFoundError(_errno.ENOENT, "No such directory", src)
    named = fspath(store) if store is not None else None
    store_path = existing_store(named or default_store(src))
    cache = TreeBlockCache(ONE_PASS_CACHE_BYTES)
    results: List[FileResult] = []
    reached = StaleCount()
    with store_of(src, named) as st, SourceDir(src) as sd:
        def unreadable(rel: str, e: OSError) -> None:  # a directory: nothing under it verified
            results.append(FileResult(rel, "error", describe_failure(e), None, e))

        for rel in walk_files(sd, st, unreadable=unreadable):
            res = verify_file(st, sd, rel, cache)
            d = Digest(res.entry.alg.name, res.entry.digest) if res.entry is not None else None
            reached.add(res)
            msg = describe_failure(res.error) if res.error is not None else ""
            results.append(FileResult(rel, cast(Status, res.status), msg, d, res.error))
        stale = reached.of(st)
    results.sort(key=lambda r: r.path)
    return VerifyReport(os.path.abspath(src), os.path.abspath(store_path), strict,
                        tuple(results), stale)
