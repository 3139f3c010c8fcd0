"""Manifest payload, format version 2: the whole trusted tree (pure, stdlib only).

The payload is UTF-8 JSON Lines (protocol/manifest-format.md): a header line,
then one line per directory, regular file or symlink, with its type,
permission bits, owner, mtime, and for files the size and fs-verity digest,
for symlinks the target.  Entries are sorted by the bytes of their path, the
root "." first, so one tree has exactly one payload (and one digest), every
parent precedes its children, and a duplicate is simply "not increasing".

Parsing goes line by line into compact ``Node`` objects: peak memory is the
finished tree plus one line, whatever the payload size.  The payload must be
authenticated (manifest.load) before it is parsed.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from . import merkle
from .errors import ManifestError, VerityError

FORMAT = "verityfuse-manifest"
VERSION = 2
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
MAX_TARGET_BYTES = 4095
MAX_LINE_BYTES = 16384
MAX_BLOCK_SIZE = 65536
MAX_ID = 0xFFFFFFFE          # uid/gid; (uid_t)-1 means "no change" to the kernel
MAX_SIZE = (1 << 63) - 1
TIME_RANGE = (-(1 << 63), (1 << 63) - 1)

TYPES = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK}
COMMON_KEYS = {"path", "type", "mode", "uid", "gid", "mtime"}
KEYS = {"dir": COMMON_KEYS, "file": COMMON_KEYS | {"size", "digest", "block_size", "salt"},
        "symlink": COMMON_KEYS | {"target"}}
CONVERT_HINT = ("re-create it from the source tree with `verityfuse seal SOURCE --manifest M "
                "--sign-key KEY.pem` (version 2 records every directory, file and symlink)")


class Node:
    """One entry of the trusted tree.  ``ino`` is its position + 1 (root: 1)."""

    __slots__ = ("ino", "parent", "path", "name", "mode", "uid", "gid", "mtime", "size", "nlink",
                 "children", "target", "alg", "digest", "params")

    def __init__(self, ino, parent, path, name, mode, uid, gid, mtime):
        self.ino, self.parent, self.path, self.name = ino, parent, path, name
        self.mode, self.uid, self.gid, self.mtime = mode, uid, gid, mtime
        self.size, self.nlink = 0, 1
        self.children: Optional[Dict[bytes, "Node"]] = None
        self.target: Optional[bytes] = None
        self.alg = self.digest = self.params = None

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def digest_text(self) -> str:
        return merkle.format_digest(self.alg, self.digest)


class Tree:
    """A parsed payload: ``nodes[ino - 1]``, the root first."""

    def __init__(self, nodes: List[Node], payload_bytes: int):
        self.nodes = nodes
        self.payload_bytes = payload_bytes

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def node(self, ino: int) -> Optional[Node]:
        return self.nodes[ino - 1] if 0 < ino <= len(self.nodes) else None

    def files(self) -> Iterator[Node]:
        return (n for n in self.nodes if n.kind == stat.S_IFREG)


# -- writing ------------------------------------------------------------------

def entry_of(path: str, st: os.stat_result, target: Optional[str] = None,
             sealed: Optional[Tuple[merkle.HashAlg, bytes, merkle.Params]] = None) -> dict:
    """The entry for ``path`` (relative, "." for the root) from its lstat."""
    fmt = stat.S_IFMT(st.st_mode)
    kind = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink"}.get(fmt)
    if kind is None:
        raise ManifestError(f"{path}: a manifest holds directories, regular files and symlinks only")
    e = {"path": path, "type": kind, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
         "gid": st.st_gid, "mtime": st.st_mtime_ns}
    if kind == "file":
        if sealed is None:
            raise ManifestError(f"{path}: a file entry needs its fs-verity digest")
        alg, digest, params = sealed
        e.update(size=st.st_size, digest=merkle.format_digest(alg, digest),
                 block_size=params.block_size, salt=params.salt.hex())
    elif kind == "symlink":
        e["target"] = target
    return e


def _sort_key(e: dict) -> bytes:
    return b"" if e["path"] == "." else e["path"].encode()


def make_payload(entries: Iterable[dict]) -> bytes:
    """Canonical payload bytes: header line, entries sorted by path bytes, root first."""
    lines = [json.dumps({"format": FORMAT, "version": VERSION}, sort_keys=True,
                        separators=(",", ":"))]
    for e in sorted(entries, key=_sort_key):
        lines.append(json.dumps(e, sort_keys=True, separators=(",", ":"), ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode()


def iter_entries(payload: bytes, where: str = "manifest") -> Iterator[dict]:
    """The raw entry dicts of a valid payload, in order (for updates)."""
    for _, e in _lines(payload, where):
        yield e


# -- reading ------------------------------------------------------------------

def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _loads(line: bytes, at: str):
    try:
        return json.loads(line.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise ManifestError(f"{at}: not UTF-8 at byte {e.start}") from None
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"{at}: invalid JSON: {e}") from None


def _header(line: bytes, where: str):
    head = _loads(line, f"{where}: line 1")
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise ManifestError(f"{where}: not a {FORMAT} document")
    version = head.get("version")
    if version == 1:
        raise ManifestError(f"{where}: manifest format version 1 lists file digests only and "
                            f"cannot describe the tree a mount serves; {CONVERT_HINT}")
    if version != VERSION or set(head) != {"format", "version"}:
        raise ManifestError(f"{where}: unsupported manifest version {version!r} "
                            f"(this verityfuse reads version {VERSION})")


def _lines(payload: bytes, where: str) -> Iterator[Tuple[str, dict]]:
    """(location, entry dict) per entry line, after the header line."""
    end = payload.find(b"\n")
    _header(payload[:end] if end >= 0 else payload, where)
    if not payload.endswith(b"\n"):
        raise ManifestError(f"{where}: payload does not end with a newline")
    n = 1
    while end + 1 < len(payload):
        start, end = end + 1, payload.find(b"\n", end + 1)
        n += 1
        at = f"{where}: line {n}"
        if end - start > MAX_LINE_BYTES:
            raise ManifestError(f"{at}: entry longer than {MAX_LINE_BYTES} bytes")
        e = _loads(payload[start:end], at)
        if not isinstance(e, dict):
            raise ManifestError(f"{at}: an entry must be a JSON object")
        path = e.get("path")
        yield (f"{at} ({path})" if isinstance(path, str) else at), e


def _int(e: dict, key: str, lo: int, hi: int, at: str) -> int:
    v = e[key]
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ManifestError(f"{at}: {key} must be an integer in [{lo}, {hi}], not {v!r}")
    return v


def _text(v, key: str, limit: int, at: str) -> bytes:
    if not isinstance(v, str) or not v or "\0" in v:
        raise ManifestError(f"{at}: {key} must be a non-empty string without NUL")
    try:
        raw = v.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"{at}: {key} is not valid UTF-8") from None
    if len(raw) > limit:
        raise ManifestError(f"{at}: {key} is longer than {limit} bytes")
    return raw


def _split(path: str, at: str) -> Tuple[bytes, bytes]:
    """(parent path bytes, name bytes) of a normalized relative path."""
    raw = _text(path, "path", MAX_PATH_BYTES, at)
    parts = raw.split(b"/")
    if any(p in (b"", b".", b"..") for p in parts):
        raise ManifestError(f"{at}: path must be relative and normalized "
                            f"(no leading '/', no empty, '.' or '..' components)")
    if len(parts[-1]) > MAX_NAME_BYTES:
        raise ManifestError(f"{at}: name longer than {MAX_NAME_BYTES} bytes")
    return b"/".join(parts[:-1]), parts[-1]


def parse_payload(payload: bytes, where: str = "manifest") -> Tree:
    """Validate and parse an authenticated payload; ManifestError names the bad entry."""
    nodes: List[Node] = []
    dirs: Dict[bytes, Node] = {}
    params_cache: Dict[tuple, merkle.Params] = {}  # files share a handful of parameter sets
    last = None
    for at, e in _lines(payload, where):
        kind = e.get("type")
        if kind not in KEYS:
            raise ManifestError(f"{at}: unknown type {kind!r} (dir, file or symlink)")
        if set(e) != KEYS[kind]:
            raise ManifestError(f"{at}: a {kind} entry has exactly the keys "
                                f"{', '.join(sorted(KEYS[kind]))}")
        path = e["path"]
        if not nodes:
            if path != "." or kind != "dir":
                raise ManifestError(f"{at}: the first entry must be the root directory '.'")
            key, parent, name = b"", None, b""
        else:
            parent_path, name = _split(path, at)
            key = path.encode()
            if last is not None and key <= last:
                raise ManifestError(f"{at}: entries must be sorted by path, each listed once "
                                    f"(this one is {'a duplicate' if key == last else 'out of order'})")
            parent = dirs.get(parent_path)
            if parent is None:
                raise ManifestError(f"{at}: parent {parent_path.decode() or '.'!r} is not a "
                                    f"listed directory")
            last = key
        mode = _int(e, "mode", 0, 0o7777, at) | TYPES[kind]
        node = Node(len(nodes) + 1, parent.ino if parent else 1, path, name, mode, _int(e, "uid", 0, MAX_ID, at),
                    _int(e, "gid", 0, MAX_ID, at), _int(e, "mtime", *TIME_RANGE, at))
        if kind == "dir":
            node.children, node.nlink, node.size = {}, 2, 4096
            dirs[key] = node
        elif kind == "symlink":
            node.target = _text(e["target"], "target", MAX_TARGET_BYTES, at)
            node.size = len(node.target)
        else:
            node.size = _int(e, "size", 0, MAX_SIZE, at)
            _file_fields(node, e, params_cache, at)
        if parent is not None:
            parent.children[name] = node
            if kind == "dir":
                parent.nlink += 1
        nodes.append(node)
    if not nodes:
        raise ManifestError(f"{where}: no entries (the root directory '.' must be listed)")
    return Tree(nodes, len(payload))


def _file_fields(node: Node, e: dict, cache: dict, at: str):
    from .store import parse_digest

    try:
        if not isinstance(e["digest"], str) or not isinstance(e["salt"], str):
            raise ValueError("digest and salt must be strings")
        node.alg, node.digest = parse_digest(e["digest"])
        bs = _int(e, "block_size", 1, MAX_BLOCK_SIZE, at)
        key = (node.alg.name, bs, e["salt"])
        params = cache.get(key)
        if params is None:
            params = cache[key] = merkle.Params(node.alg, bs, bytes.fromhex(e["salt"]))
        node.params = params
    except (ValueError, VerityError) as err:
        if isinstance(err, ManifestError):
            raise
        raise ManifestError(f"{at}: {err}") from None


# -- recording a source tree -----------------------------------------------------

def scan(source: str, skip: Callable[[str, os.stat_result], bool],
         warn: Callable[[str], None]) -> Iterator[Tuple[str, os.stat_result]]:
    """(relative path, lstat) of the root and every directory, file and symlink under
    ``source``, never following symlinks; ``skip`` prunes (the store, the manifest).
    Other types and names that are not UTF-8 are reported through ``warn`` and left out."""
    yield ".", os.stat(source)  # the root the caller named, even through a symlink
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(source, rel) if rel else source) as it:
            found = sorted(it, key=lambda d: d.name)
        for d in found:
            path = f"{rel}/{d.name}" if rel else d.name
            try:
                path.encode("utf-8")
            except UnicodeEncodeError:
                warn(f"skipping {os.path.join(source, path)!r}: its name is not UTF-8")
                continue
            st = d.stat(follow_symlinks=False)
            if skip(path, st):
                continue
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                warn(f"skipping {os.path.join(source, path)}: not a directory, regular file "
                     f"or symlink")
                continue
            yield path, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)
