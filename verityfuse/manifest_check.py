"""Offline check of a directory against an authenticated manifest (the host's CI gate).

``verityfuse verify SOURCE --manifest M`` answers, before anything is shipped, the
question a guest's mount would answer file by file: does every listed entry have the
manifest's type, mode, owner, mtime, size and link target, and does every listed file's
content hash up to the manifest's digest for *that path* (through the store object that
digest names, or for a small file the tree its bytes give, exactly as the mount reads
it)?  Entries the manifest does not list are reported too: a mount would hide them, and
a gate should say they are there.

Paths are walked below SOURCE without following any symlink (``fsutil.open_beneath``),
so a listed path reached through a symlinked directory is reported, not followed.
Nothing is written.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Set, Tuple, Union

from . import fsutil, manifest_tree
from .errors import ContentMismatch, MissingObject, VerityError
from .reader import attach_reader
from .seal_pool import in_order
from .sealing import describe_failure
from .source_dir import SourceDir, opened, unlistable
from .small_trees import small_file_differs, small_tree, small_tree_fits
from .treebuild import CHUNK_SIZE, read_upto
from .verifier import ONE_PASS_CACHE_BYTES, TreeBlockCache

# Statuses (protocol/cli-json.md): ok; corrupt (content does not hash up to the digest);
# differs (type or metadata); missing; unlisted; error (could not be read).
STATUSES = ("ok", "corrupt", "differs", "missing", "unlisted", "error")


@dataclass
class EntryResult:
    path: str                       # relative to SOURCE, as in the manifest
    status: str
    message: str = ""
    digest: Optional[str] = None    # the manifest's digest, for files
    error: Optional[Exception] = None


def _metadata_differences(node: manifest_tree.Node, st: os.stat_result) -> list:
    out = []
    if stat.S_IFMT(st.st_mode) != node.kind:
        return [f"is {fsutil.type_name(st.st_mode)}, the manifest lists "
                f"{fsutil.type_name(node.mode)}"]
    for what, want, got in (("mode", f"{stat.S_IMODE(node.mode):04o}",
                             f"{stat.S_IMODE(st.st_mode):04o}"),
                            ("uid", node.uid, st.st_uid), ("gid", node.gid, st.st_gid),
                            ("mtime", node.mtime, st.st_mtime_ns)):
        if want != got:
            out.append(f"{what} {got}, the manifest says {want}")
    if node.kind == stat.S_IFREG and st.st_size != node.size:
        out.append(f"size {st.st_size}, the manifest says {node.size}")
    return out


def _check_content(pfd: int, node: manifest_tree.Node, store, cache, label: str) -> None:
    """Read the file whole through a reader checked against the manifest's digest: a
    small file's bytes pass if the tree they give hashes to it (no object needed, as
    the mount reads them; a file of one block is sealed without one), else the object
    says where they differ (the first failure in file order)."""
    fd = fsutil.reopen_regular(os.dup(pfd), label)
    try:
        data = b""
        if small_tree_fits(node.params, node.size):
            data = read_upto(fd, node.size)
            if len(data) == node.size and small_tree(label, node.params, data,
                                                     node.digest) is not None:
                return
        try:
            tree = store.open_object(node.alg, node.digest)
        except MissingObject:
            if node.size > node.params.block_size:
                raise
            differs = small_file_differs(node.params, data, node.size, node.digest)
            # (verify prints the file's name: the message is what differs)
            raise ContentMismatch(f"the file {differs}", label) from None
        with tree:
            node.tree.check(tree.descriptor, label)
            # Read whole: the first failure in file order (check_size=False), as verify.
            reader = attach_reader(fd, tree, cache, label, check_size=False)
            off = 0
            while reader.read(off, CHUNK_SIZE):  # the read at EOF checks nothing follows
                off += CHUNK_SIZE
    finally:
        os.close(fd)


def check_node(root_fd: int, node: manifest_tree.Node, store, cache) -> EntryResult:
    digest = node.digest_text if node.kind == stat.S_IFREG else None
    res = EntryResult(node.path, "ok", digest=digest)
    try:
        pfd = (os.dup(root_fd) if node.path == "."
               else fsutil.open_beneath(root_fd, node.path.encode()))
    except FileNotFoundError:
        res.status, res.message = "missing", "listed in the manifest, not in SOURCE"
        return res
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):  # a symlink or a file on the way
            res.status, res.message, res.error = "differs", (
                f"cannot be reached without following a symlink ({e.strerror})"), e
        else:  # unreadable (EACCES), an I/O error: not a difference from the manifest
            res.status, res.message, res.error = "error", describe_failure(e), e
        return res
    try:
        st = os.fstat(pfd)
        diffs = _metadata_differences(node, st)
        if node.kind == stat.S_IFLNK and stat.S_ISLNK(st.st_mode):
            target = os.readlink(b"", dir_fd=pfd)  # readlinkat() of the O_PATH fd itself
            if target != node.target:
                diffs.append(f"points to {target!r}, the manifest says {node.target!r}")
        if diffs:
            res.status, res.message = "differs", "; ".join(diffs)
        if node.kind == stat.S_IFREG and stat.S_ISREG(st.st_mode):
            _check_content(pfd, node, store, cache, node.path)  # also when metadata differs
    except VerityError as e:  # content outranks metadata: say both
        res.status, res.error = "corrupt", e
        res.message = "; ".join([describe_failure(e)] + ([res.message] if res.message else []))
    except OSError as e:
        res.status, res.message, res.error = "error", describe_failure(e), e
    finally:
        os.close(pfd)
    return res


def unlisted(source: Union[str, SourceDir], listed: Set[str], skip: Iterable[str],
             unreadable: Optional[Callable[[str, OSError], None]] = None,
             skipped: Optional[Callable[[str], None]] = None) -> Iterator[str]:
    """Paths under ``source`` that the manifest does not list, in os.walk's order (in
    each directory, what stats as a directory first, each group sorted; then the listed
    subdirectories, depth first).  Each directory is opened beneath SOURCE with no
    symlink on its path (source_dir): one swapped for a symlink meanwhile is never
    listed.  A directory that cannot be listed goes to ``unreadable``, with an error
    saying so (raised as it is without it); one gone meanwhile holds nothing.
    ``skip`` names files or directories to leave out (the store, the manifest itself).
    What no manifest can list (a FIFO, socket or device: seal skips it with a warning)
    goes to ``skipped`` instead, if given: it is no sign that SOURCE changed."""
    skip_ids: Set[Tuple[int, int]] = set()
    for p in skip:
        try:
            s = os.lstat(p)
            skip_ids.add((s.st_dev, s.st_ino))
        except OSError:
            pass
    with opened(source) as src:
        stack = [""]
        while stack:
            rel_dir = stack.pop()
            found, descend = [], []
            try:
                with src.listing(rel_dir) as entries:
                    for d in entries:
                        try:
                            s = d.stat(follow_symlinks=False)
                            # os.walk's order: what stats as a directory (a link to one
                            # too) among the directories; only real ones are walked.
                            kind = 0 if d.is_dir() else 1
                        except OSError:
                            continue  # gone meanwhile
                        if (s.st_dev, s.st_ino) not in skip_ids:
                            found.append((kind, d.name, s.st_mode))
            except FileNotFoundError:
                continue
            except OSError as e:
                if unreadable is None:
                    raise
                unreadable(rel_dir or ".", unlistable(e))
                continue
            for _, name, mode in sorted(found):
                rel = f"{rel_dir}/{name}" if rel_dir else name
                if rel in listed:
                    if stat.S_ISDIR(mode):
                        descend.append(rel)  # an unlisted directory is reported once, not walked
                elif skipped is not None and not _recordable(mode):
                    skipped(rel)
                else:
                    yield rel
            stack.extend(reversed(descend))


def _recordable(mode: int) -> bool:
    return stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode)


def check_tree(source: str, tree: manifest_tree.Tree, store, skip: Iterable[str] = (),
               threads: Optional[int] = None,
               skipped: Optional[Callable[[str], None]] = None) -> Iterator[EntryResult]:
    """Every manifest entry in manifest order, then every unlisted path (``skipped``:
    ``unlisted``'s).  Entries are checked by seal_pool's worker processes (``threads``);
    each worker finds the node by its index in the tree it inherited, so only numbers
    and results cross the pipe."""
    cache = TreeBlockCache(ONE_PASS_CACHE_BYTES)
    nodes = tree.nodes
    with SourceDir(source) as src:  # one SOURCE for the entries and the unlisted walk

        def check(i: int, here: bool) -> EntryResult:
            return check_node(src.fd, nodes[i], store, cache)

        for _, res, err in in_order(range(len(nodes)), check, threads, lambda res: None,
                                    command="verify", done="verified"):
            assert res is not None, err  # check_node reports every OSError in its result
            yield res
        unlistable_dirs: list = []
        for rel in unlisted(src, {n.path for n in tree.nodes}, skip,
                            lambda rel, e: unlistable_dirs.append((rel, e)), skipped):
            yield EntryResult(rel, "unlisted", "in SOURCE, not in the manifest (a mount hides it)")
        for rel, e in unlistable_dirs:
            yield EntryResult(rel, "error", describe_failure(e), error=e)
