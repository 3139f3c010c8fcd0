"""Manifest payload, format version 2: the whole trusted tree (pure, stdlib only).

The payload is UTF-8 JSON Lines (protocol/manifest-format.md): a header object,
then one JSON array per directory, regular file or symlink, with its type,
path, permission bits, owner, mtime, and for files the size and fs-verity
digest, for symlinks the target, at fixed positions (arrays decode about twice
as fast as objects, and 100k entries must mount in well under two seconds).
Entries are sorted by the bytes of their path, the root "." first, so one tree
has exactly one payload (and one digest), every parent precedes its children,
and a duplicate is simply "not increasing".

Parsing goes line by line into compact ``Node`` objects: peak memory is the
finished tree plus one line, whatever the payload size.  The payload must be
authenticated (manifest.load) before it is parsed.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple, Union

from . import manifest_header, merkle
from .errors import ManifestError, VerityError
from .manifest_header import Header

FORMAT, VERSION = manifest_header.FORMAT, manifest_header.VERSION  # the header's, kept here too
CONVERT_HINT = manifest_header.CONVERT_HINT
MAX_PATH_BYTES = 4095  # PATH_MAX counts the NUL: a longer path could never be opened
MAX_NAME_BYTES = 255
MAX_TARGET_BYTES = 4095
MAX_LINE_BYTES = 16384
MAX_BLOCK_SIZE = merkle.MAX_BLOCK_SIZE
MAX_ID = 0xFFFFFFFE          # uid/gid; (uid_t)-1 means "no change" to the kernel
MAX_SIZE = (1 << 63) - 1
TIME_RANGE = (-(1 << 63), (1 << 63) - 1)

TYPES = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK}
COMMON = ("type", "path", "mode", "uid", "gid", "mtime")
FIELDS = {"dir": COMMON, "file": COMMON + ("size", "digest", "block_size", "salt"),
          "symlink": COMMON + ("target",)}


class Node:
    """One entry of the trusted tree.  ``ino`` is its position + 1 (root: 1)."""

    __slots__ = ("ino", "parent", "path", "mode", "uid", "gid", "mtime", "size", "nlink",
                 "children", "target", "params", "digest")

    def __init__(self, ino, parent, path, mode, uid, gid, mtime):
        self.ino, self.parent, self.path = ino, parent, path
        self.mode, self.uid, self.gid, self.mtime = mode, uid, gid, mtime
        self.size, self.nlink = 0, 1
        self.children: Optional[Dict[bytes, "Node"]] = None
        self.target: Optional[bytes] = None
        # A regular file's tree, in parts: ``tree`` is its record.  (Kept apart because a
        # record object per entry would cost a 100k-file manifest a quarter more parsing
        # time and ~5 MB; ``size`` is the entry's st_size and its tree's data size.)
        self.params = self.digest = None  # a merkle.Params and the digest's bytes

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def tree(self) -> merkle.TreeId:
        """A regular file's tree: the one record of it (``merkle.TreeId``)."""
        return merkle.TreeId(self.params, self.size, self.digest)

    @property
    def alg(self) -> merkle.HashAlg:
        return self.params.alg

    @property
    def digest_text(self) -> str:
        return merkle.format_digest(self.params.alg, self.digest)


class Tree:
    """A parsed payload: ``nodes[ino - 1]``, the root first, and its header."""

    def __init__(self, nodes: List[Node], header: Header = Header()):
        self.nodes = nodes
        self.header = header

    def node(self, ino: int) -> Optional[Node]:
        return self.nodes[ino - 1] if 0 < ino <= len(self.nodes) else None

    def files(self) -> Iterator[Node]:
        return (n for n in self.nodes if n.kind == stat.S_IFREG)


# -- writing ------------------------------------------------------------------

class Recorded(NamedTuple):
    """What a manifest records of a file's fstat (``entry_of`` takes it as a stat):
    what a seal worker hands back instead of a whole os.stat_result, which costs ten
    times as much to build and pass through a pipe."""

    st_mode: int
    st_uid: int
    st_gid: int
    st_size: int
    st_mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "Recorded":
        return cls(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)


def entry_of(path: str, st: Union[os.stat_result, Recorded], target: Optional[str] = None,
             sealed: Optional[Tuple[merkle.HashAlg, bytes, merkle.Params]] = None) -> dict:
    """The entry for ``path`` (relative, "." for the root) from its lstat (a sealed
    file's: the fstat of what was sealed, an os.stat_result or a Recorded)."""
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


_quote = json.encoder.encode_basestring  # a JSON string as ensure_ascii=False writes it


def line_of(e: dict) -> str:
    """The payload line of entry ``e`` (entry_of's dict), without its newline: the
    bytes of json.dumps([its FIELDS], separators=(",", ":"), ensure_ascii=False)
    (tests/test_manifest_lines.py compares the two), put together directly, as
    json.dumps took ~3.8 us of a seal's ~5 us a line for 100k lines."""
    kind = e["type"]
    if kind not in FIELDS:
        raise ManifestError(f"{e['path']}: unknown entry type {kind!r}")
    line = (f'["{kind}",{_quote(e["path"])},{e["mode"]:d},{e["uid"]:d},{e["gid"]:d},'
            f'{e["mtime"]:d}')
    if kind == "file":
        return line + (f',{e["size"]:d},{_quote(e["digest"])},{e["block_size"]:d},'
                       f'{_quote(e["salt"])}]')
    if kind == "symlink":
        return line + f',{_quote(e["target"])}]'
    return line + "]"


def _sort_key(e: dict) -> bytes:
    return b"" if e["path"] == "." else e["path"].encode()


def make_payload(entries: Iterable[dict], header: Header = Header()) -> bytes:
    """Canonical payload bytes: header line, entries sorted by path bytes, root first."""
    lines = [manifest_header.line(header)]
    for e in sorted(entries, key=_sort_key):
        lines.append(line_of(e))
    return ("\n".join(lines) + "\n").encode()


def iter_entries(payload: bytes, where: str = "manifest") -> Iterator[dict]:
    """The entries of a valid payload as dicts, in order (for updates)."""
    parse_payload(payload, where)
    for _, e in _lines(payload, where):
        yield dict(zip(FIELDS[e[0]], e))


# -- reading ------------------------------------------------------------------
# Fast enough for 100k entries in well under a second: lines are decoded by the
# C JSON scanner in batches, and each entry is checked with as little Python as
# possible.  Only when a batch fails is it decoded again line by line, to name
# the line.  (A key repeated within one entry is not detected: the last value
# counts, as in most JSON parsers.  Entries themselves are strictly ordered,
# so a repeated entry is.)

BATCH = 1024


def _bad(where: str, n: int, path, msg: str) -> ManifestError:
    at = f"{where}: line {n}" + (f" ({path})" if isinstance(path, str) else "")
    return ManifestError(f"{at}: {msg}")


def _decode(text: str, where: str, n: int):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise _bad(where, n, None, f"invalid JSON: {e}") from None


def parse_header(payload: bytes, where: str = "manifest", legacy: bool = False) -> Header:
    """The header (first line) of a payload alone, without its entries (``legacy``:
    a version 1 header reads as sequence 0, for the manifest `seal` replaces)."""
    end = payload.find(b"\n", 0, MAX_LINE_BYTES + 1)
    first = payload[:end if end >= 0 else MAX_LINE_BYTES + 1]
    if len(first) > MAX_LINE_BYTES:
        raise ManifestError(f"{where}: line 1: header longer than {MAX_LINE_BYTES} bytes")
    try:
        text = first.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{where}: line 1: not UTF-8 at byte {e.start}") from None
    return manifest_header.parse(text, where, legacy)


def _batch(lines: List[str], first: int, where: str):
    try:
        objs = json.loads("[" + ",".join(lines) + "]")
        if len(objs) == len(lines):
            return zip(range(first, first + len(lines)), objs)
    except (ValueError, RecursionError):
        pass
    return [(first + i, _decode(line, where, first + i)) for i, line in enumerate(lines)]


def _lines(payload: bytes, where: str):
    """(line number, decoded JSON value) per entry line, after the header line (which
    parse_header checks)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        n = payload.count(b"\n", 0, e.start) + 1
        col = e.start - (payload.rfind(b"\n", 0, e.start) + 1)
        raise ManifestError(f"{where}: line {n}: not UTF-8 at byte {col}") from None
    if not text.endswith("\n"):
        raise ManifestError(f"{where}: payload does not end with a newline")
    lines: List[Optional[str]] = list(text.split("\n"))  # the payload's size again, as str
    del text
    lines.pop()  # after the last newline
    for i in range(1, len(lines), BATCH):
        batch = [line or "" for line in lines[i:i + BATCH]]
        if max(map(len, batch)) > MAX_LINE_BYTES:
            n = next(k for k, line in enumerate(batch) if len(line) > MAX_LINE_BYTES)
            raise ManifestError(f"{where}: line {i + n + 1}: entry longer than {MAX_LINE_BYTES} bytes")
        yield from _batch(batch, i + 1, where)
        lines[i:i + BATCH] = [None] * len(batch)  # free as we go


def _explain(e, where: str, n: int) -> ManifestError:
    """What is wrong with entry ``e`` (the fast path only knows that something is)."""
    if type(e) is not list or not e:
        return _bad(where, n, None, "an entry must be a non-empty JSON array")
    kind = e[0]
    fields = FIELDS.get(kind) if type(kind) is str else None
    path = e[1] if len(e) > 1 else None
    if fields is None:
        return _bad(where, n, path, f"unknown type {kind!r} (dir, file or symlink)")
    if len(e) != len(fields):
        return _bad(where, n, path, f"a {kind} entry has {len(fields)} fields "
                                    f"({', '.join(fields)}), not {len(e)}")
    d = dict(zip(fields, e))
    ranges = {"mode": (0, 0o7777), "uid": (0, MAX_ID), "gid": (0, MAX_ID), "mtime": TIME_RANGE,
              "size": (0, MAX_SIZE), "block_size": (1, MAX_BLOCK_SIZE)}
    for key, (lo, hi) in ranges.items():
        v = d.get(key, lo)
        if type(v) is not int or not lo <= v <= hi:
            return _bad(where, n, path, f"{key} must be an integer in [{lo}, {hi}], not {v!r}")
    for key, limit in (("path", MAX_PATH_BYTES), ("target", MAX_TARGET_BYTES)):
        if key not in d:
            continue
        v = d[key]
        if type(v) is not str or not v or "\0" in v:
            return _bad(where, n, path, f"{key} must be a non-empty string without NUL")
        try:
            raw = v.encode("utf-8")
        except UnicodeEncodeError:
            return _bad(where, n, path, f"{key} is not valid UTF-8")
        if len(raw) > limit:
            return _bad(where, n, path, f"{key} is longer than {limit} bytes")
    if kind == "file":
        digest, salt = d["digest"], d["salt"]
        try:
            if type(digest) is not str or type(salt) is not str:
                raise ValueError("digest and salt must be strings")
            alg = merkle.parse_digest(digest)[0]
            merkle.Params(alg, d["block_size"], bytes.fromhex(salt))
        except (ValueError, VerityError) as err:
            return _bad(where, n, path, str(err))
    raw = str(path).encode()
    name = raw.rpartition(b"/")[2]
    if path != "." and len(name) > MAX_NAME_BYTES:
        return _bad(where, n, path, f"name longer than {MAX_NAME_BYTES} bytes")
    return _bad(where, n, path, "path must be relative and normalized (no leading '/', no empty, "
                                "'.' or '..' components)")


def parse_payload(payload: bytes, where: str = "manifest") -> Tree:
    """Validate and parse an authenticated payload; ManifestError names the bad entry."""
    header = parse_header(payload, where)
    nodes: List[Node] = []
    dirs: Dict[bytes, Node] = {}
    params_cache: Dict[tuple, merkle.Params] = {}  # files share a handful of parameter sets
    last = b""
    lo_t, hi_t, max_id, max_name = TIME_RANGE[0], TIME_RANGE[1], MAX_ID, MAX_NAME_BYTES
    for n, e in _lines(payload, where):
        # The fast path: one combined check; _explain says what failed.
        try:
            kind = e[0]
            if kind == "file":
                _, path, mode, uid, gid, mtime, size, digest, bs, salt = e
                ok = (type(size) is int and 0 <= size <= MAX_SIZE and type(digest) is str
                      and type(bs) is int and 0 < bs <= MAX_BLOCK_SIZE and type(salt) is str)
            elif kind == "dir":
                _, path, mode, uid, gid, mtime = e
                ok = True
            elif kind == "symlink":
                _, path, mode, uid, gid, mtime, target = e
                # Encoded here, inside the try: a lone surrogate is refused like a bad path.
                raw_target = target.encode() if type(target) is str else b""
                ok = 0 < len(raw_target) <= MAX_TARGET_BYTES and b"\0" not in raw_target
            else:
                ok = False
            ok = (ok and type(e) is list and type(mode) is int and 0 <= mode <= 0o7777
                  and type(uid) is int and 0 <= uid <= max_id and type(gid) is int
                  and 0 <= gid <= max_id and type(mtime) is int and lo_t <= mtime <= hi_t
                  and type(path) is str and "\0" not in path and len(path) <= MAX_PATH_BYTES)
            raw = path.encode() if ok else b""
        except (TypeError, ValueError, KeyError, IndexError, UnicodeEncodeError):
            ok = False
        if not ok:
            raise _explain(e, where, n)
        if nodes:
            if raw <= last:
                raise _bad(where, n, path, "entries must be sorted by path, each listed once (this "
                           f"one is {'a duplicate' if raw == last else 'out of order'})")
            last = raw
            parent_path, _, name = raw.rpartition(b"/")
            if (name == b"" or name == b"." or name == b".." or raw[0] == 0x2F or b"//" in raw
                    or b"/./" in raw or b"/../" in raw or raw[:2] == b"./" or raw[:3] == b"../"
                    or len(raw) > MAX_PATH_BYTES or len(name) > max_name):
                raise _explain(e, where, n)
            parent = dirs.get(parent_path)
            if parent is None:
                raise _bad(where, n, path, f"parent {parent_path.decode() or '.'!r} is not a "
                           f"listed directory")
            pino = parent.ino
        elif path != "." or kind != "dir":
            raise _bad(where, n, path, "the first entry must be the root directory '.'")
        else:
            parent, pino, name = None, 1, b""
        node = Node(len(nodes) + 1, pino, path, mode | TYPES[kind], uid, gid, mtime)
        if kind == "file":
            node.size = size
            params = params_cache.get((digest[:7], bs, salt))
            if params is None:
                params = _params(e, where, n)
                params_cache[(digest[:7], bs, salt)] = params
            hexd = digest[len(params.alg.name) + 1:]
            try:
                raw_digest = bytes.fromhex(hexd)
            except ValueError:
                raw_digest = b""
            if (len(raw_digest) != params.alg.digest_size or len(hexd) != 2 * params.alg.digest_size
                    or not digest.startswith(params.alg.name + ":")):
                raise _explain(e, where, n)
            node.params, node.digest = params, raw_digest
        elif kind == "dir":
            node.children, node.nlink, node.size = {}, 2, 4096
            dirs[raw if parent else b""] = node
        else:
            node.target = raw_target
            node.size = len(node.target)
        if parent is not None and parent.children is not None:
            parent.children[name] = node
            if kind == "dir":
                parent.nlink += 1
        nodes.append(node)
    if not nodes:
        raise ManifestError(f"{where}: no entries (the root directory '.' must be listed)")
    return Tree(nodes, header)


def _params(e: list, where: str, n: int) -> merkle.Params:
    try:
        alg = merkle.parse_digest(e[7])[0]
        return merkle.Params(alg, e[8], bytes.fromhex(e[9]))
    except (ValueError, VerityError):
        raise _explain(e, where, n) from None

