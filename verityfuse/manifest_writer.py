"""Writing a manifest file as its entries are produced, in constant memory.

The entries go, one line each, to a temporary payload file beside M while its
digest is computed; ``publish`` then writes the envelope (manifest.sign's exact
bytes: the payload in base64 between the JSON before and after it) to a second
temporary file, fsyncs it and renames it over M.  The payload is read back in
pieces; only an Ed25519 signature needs it whole (Ed25519 hashes the message
twice), and it then reads it from a map of the file, page cache rather than a
copy.  Entries must come in payload order (manifest_tree: sorted by path bytes,
the root first), and each is checked against the format's limits as it is
written, so what is published loads.

The temporary files' names hold the writer's pid: those of a writer that died
(killed mid-seal) are removed when the next one starts, before a walk could record
them in a manifest kept in SOURCE.  With ``keep_dir_mtime`` (M inside SOURCE)
publishing leaves M's directory's mtime as the walk recorded it.
"""

from __future__ import annotations

import base64
import hashlib
import mmap
import os
import re
import secrets
from typing import Optional

from . import manifest, manifest_header, manifest_tree
from .errors import ManifestError
from .store_tmp import remove_if_dead

_B64_PIECE = 3 << 14  # bytes of payload per base64 piece: a multiple of 3, so pieces join


def _create_beside(dfd: int, name: str) -> tuple:
    """A new file in ``dfd`` under an unpredictable name (O_EXCL|O_NOFOLLOW: a name an
    attacker planted is never written through): (name, fd)."""
    while True:
        tmp = f".{name[:200]}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
        try:
            return tmp, os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                | os.O_CLOEXEC, 0o644, dir_fd=dfd)
        except FileExistsError:
            continue


def _remove_dead_writers_files(dfd: int, name: str):
    """The temporary files of M a writer that died left in ``dfd``."""
    shape = re.compile(rf"\.{re.escape(name[:200])}\.(\d+)\.[0-9a-f]{{16}}\.tmp")
    for entry in os.listdir(dfd):
        m = shape.fullmatch(entry)
        if m:
            remove_if_dead(dfd, entry, m.group(1))


def _write_all(fd: int, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class ManifestWriter:
    """The manifest at ``path`` being written; ``add`` entries in order, then ``publish``
    (or ``discard``: M is left as it was)."""

    BUFFER = 1 << 16

    def __init__(self, path: str, header: manifest_header.Header, keep_dir_mtime: bool = False):
        self.path = path
        self.keep_dir_mtime = keep_dir_mtime
        directory, self._name = os.path.split(os.path.abspath(path))
        self._dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._tmp: list = []
        try:
            _remove_dead_writers_files(self._dfd, self._name)
            self._payload_name, self._fd = self._new_tmp()
        except BaseException:
            os.close(self._dfd)
            raise
        self._hash = hashlib.sha256()
        self._buf = bytearray()
        self._last: Optional[bytes] = None  # the previous entry's path bytes
        self.entries = self.files = 0
        self._write((manifest_header.line(header) + "\n").encode())

    def _new_tmp(self):
        name, fd = _create_beside(self._dfd, self._name)
        self._tmp.append(name)
        return name, fd

    def _write(self, data: bytes):
        self._buf += data
        if len(self._buf) >= self.BUFFER:
            self._flush()

    def _flush(self):
        # Hashed as written, a buffer at a time: one update per line cost ~0.3 us a line.
        self._hash.update(self._buf)
        _write_all(self._fd, self._buf)
        self._buf.clear()

    def add(self, e: dict):
        """Append entry ``e`` (manifest_tree.entry_of's dict); ManifestError if it is out
        of order or does not fit the format (named by its path)."""
        path = e["path"]
        raw = b"" if path == "." else path.encode()
        if (self._last is None) != (path == ".") or (self._last is not None and raw <= self._last):
            raise ManifestError(f"{path}: manifest entries out of order")  # a bug, not input
        self._last = raw
        data = (manifest_tree.line_of(e) + "\n").encode()
        _check(e, raw, len(data) - 1)
        self._write(data)
        self.entries += 1
        self.files += e["type"] == "file"

    @property
    def payload_path(self) -> str:
        """The payload's temporary file, beside M until ``publish``: a walk of SOURCE
        must skip it."""
        return os.path.join(os.path.dirname(os.path.abspath(self.path)), self._payload_name)

    @property
    def digest(self) -> str:
        """The manifest digest of what was added so far (the payload's SHA-256)."""
        h = self._hash.copy()
        h.update(self._buf)
        return "sha256:" + h.hexdigest()

    def publish(self, key=None):
        """Sign (with ``key``, or not) and rename the manifest into place, durably."""
        self._flush()
        size = os.fstat(self._fd).st_size
        # What a walk of SOURCE recorded of M's directory: its temporary files, made
        # and removed below, and M's rename change its mtime, not its contents.
        before = os.fstat(self._dfd) if self.keep_dir_mtime else None
        sigs = []
        if key is not None:
            with mmap.mmap(self._fd, size, prot=mmap.PROT_READ) as payload:
                sigs = manifest.signatures(payload, key)
        head, tail = manifest.envelope_text(sigs)
        name, fd = self._new_tmp()
        try:
            _write_all(fd, head)
            for off in range(0, size, _B64_PIECE):
                _write_all(fd, base64.b64encode(os.pread(self._fd, _B64_PIECE, off)))
            _write_all(fd, tail)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.rename(name, self._name, src_dir_fd=self._dfd, dst_dir_fd=self._dfd)
        except OSError as e:  # name the file the caller asked for, not our temporary one
            raise type(e)(e.errno, e.strerror, self.path) from None
        self._tmp.remove(name)
        if before is not None:
            for tmp in self._tmp:  # the payload's (discard would remove it after)
                os.unlink(tmp, dir_fd=self._dfd)
            self._tmp = []
            os.utime(self._dfd, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.fsync(self._dfd)
        self.discard()

    def discard(self):
        """Remove the temporary files (M itself is untouched unless published)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for name in self._tmp:
            try:
                os.unlink(name, dir_fd=self._dfd)
            except FileNotFoundError:
                pass
        self._tmp = []
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()


def _check(e: dict, raw: bytes, line_bytes: int):
    """The format's limits (protocol/manifest-format.md) that a real tree can exceed."""
    mt, path = manifest_tree, e["path"]
    if line_bytes > mt.MAX_LINE_BYTES:
        why = f"its entry is longer than {mt.MAX_LINE_BYTES} bytes"
    elif len(raw) > mt.MAX_PATH_BYTES:
        why = f"its path is longer than {mt.MAX_PATH_BYTES} bytes"
    elif len(raw.rpartition(b"/")[2]) > mt.MAX_NAME_BYTES:
        why = f"its name is longer than {mt.MAX_NAME_BYTES} bytes"
    elif not (0 <= e["uid"] <= mt.MAX_ID and 0 <= e["gid"] <= mt.MAX_ID):
        why = f"its owner {e['uid']}:{e['gid']} is out of range (at most {mt.MAX_ID})"
    elif not mt.TIME_RANGE[0] <= e["mtime"] <= mt.TIME_RANGE[1]:
        why = f"its mtime {e['mtime']} is out of range"
    elif e["type"] == "symlink" and not 0 < len(e["target"].encode()) <= mt.MAX_TARGET_BYTES:
        why = f"its target is empty or longer than {mt.MAX_TARGET_BYTES} bytes"
    else:
        return
    raise ManifestError(f"{path!r} cannot be recorded in a manifest: {why}")
