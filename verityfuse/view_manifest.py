"""The manifest view: the tree a signed manifest describes, and nothing else.

For confidential containers the host owns the share (data, store, directory
tree) and may change any of it at any moment.  So identity is the manifest
path, never a backing inode: lookup, getattr, readdir and readlink answer from
the manifest alone (files the host adds do not exist here; modes, owners,
sizes, times and link targets are the manifest's; node ids are positions in
the manifest, stable for the life of the mount).  The share is consulted only
when a file is opened: its path is walked below the share root without
following any symlink, only a regular file is accepted (opened O_PATH first,
so a FIFO never blocks and a device is never opened), and every byte read is
checked against the tree object named by that path's manifest digest (content
addressed: the store's index is never consulted), or for a small file against
the tree its bytes give if that hashes to the digest (a file of one block is
sealed without an object).  The mount is read-only.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from typing import Dict, Optional, Tuple

from . import fsutil, manifest_tree, uapi
from . import ioctl as vioctl
from .errors import RESOURCE_ERRNOS, ContentMismatch, Corruption, MissingObject, StoreCorrupt
from .small_trees import small_file_differs, small_tree, small_tree_fits
from .treebuild import read_upto
from .verifier import Verifier
from .view import Attr, DirHandle, FileHandle, ReadOnlyView, VerityInfo, erofs

# The manifest cannot change under a mount: the kernel may cache it all.
TIMEOUT = 3600.0


def _share_fault(e: OSError, message: str, path: str) -> Exception:
    """What the share's failure ``e`` is: the daemon's own lack of fds or memory stays
    itself (never an integrity failure); any other answer of the host's is Corruption."""
    return e if e.errno in RESOURCE_ERRNOS else Corruption(message, path)


def _unreadable(e: OSError, path: str) -> Exception:
    """_share_fault of a failed fstat or read of the share's file at ``path``."""
    return _share_fault(e, f"{path}: the share's file cannot be read ({e.strerror})", path)


class ManifestView(ReadOnlyView):
    posix_acl = False
    untrusted_source = True  # the host's share (or registry): its errnos are not passed on

    def __init__(self, source: Optional[str], tree: manifest_tree.Tree, store, cache,
                 digest: str, stats=None):
        """``source``: the share's root; None for a view with no share (the OCI view, whose
        bytes come from a registry: it overrides every method that opens the share)."""
        self.tree = tree
        self.stats = stats
        self.store = store
        self.cache = cache
        self.manifest_digest = digest
        self._listings: Dict[int, Tuple[tuple, tuple]] = {}  # directory ino -> (names, nodes)
        # The share root the administrator named (a symlink there is their choice);
        # nothing below it is followed.
        self.root_fd = -1 if source is None else os.open(
            source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        # RWF_NOWAIT until the share refuses it (tmpfs, FUSE, virtio-fs), then not asked
        # again per file (_small_tree).  A share is one file system, mostly; a file
        # on a submount of another kind is then read as the object it replaces would be
        # (a read that may wait), never with weaker checks.
        self._nowait = os.RWF_NOWAIT

    @functools.cached_property
    def blocks(self) -> int:
        """4 KiB blocks of all files (statfs): a walk of every entry, so not at mount."""
        return sum(-(-n.size // 4096) for n in self.tree.files())

    def close(self) -> int:
        if self.root_fd >= 0:
            os.close(self.root_fd)
        return 0

    # -- the tree -----------------------------------------------------------------

    def _node(self, ino: int) -> manifest_tree.Node:
        node = self.tree.node(ino)
        if node is None:
            raise OSError(errno.ESTALE, f"no inode {ino}")
        return node

    def path_of(self, ino: int) -> Optional[str]:
        """The manifest path of ``ino`` (what a measured IntegrityViolation names)."""
        node = self.tree.node(ino)
        return None if node is None else node.path

    @staticmethod
    def _attr(node: manifest_tree.Node) -> Attr:
        return Attr(node.ino, node.mode, node.nlink, node.uid, node.gid, node.size,
                    node.mtime, node.mtime, node.mtime, timeout=TIMEOUT)

    def lookup(self, parent: int, name: bytes, caller=None) -> Attr:
        p = self._node(parent)
        if p.children is None:
            raise OSError(errno.ENOTDIR, "not a directory")
        child = p.children.get(name)
        if child is None:
            if len(name) > manifest_tree.MAX_NAME_BYTES:  # as the mount's statfs says
                raise OSError(errno.ENAMETOOLONG, "name too long")
            raise OSError(errno.ENOENT, "not in the manifest")
        return self._attr(child)

    def forget(self, ino: int, n: int):
        pass  # node ids are permanent

    def getattr(self, ino: int, fh=None) -> Attr:
        return self._attr(self._node(ino))

    def readlink(self, ino: int) -> bytes:
        node = self._node(ino)
        if node.target is None:
            raise OSError(errno.EINVAL, "not a symlink")
        return node.target

    def opendir(self, ino: int, caller=None) -> DirHandle:
        node = self._node(ino)
        if node.children is None:
            raise OSError(errno.ENOTDIR, "not a directory")
        return DirHandle(node)

    def _listing(self, node: manifest_tree.Node):
        """The directory's children as (names, nodes), built on its first listing and
        shared by every handle after it: a manifest directory cannot change, so a handle
        needs only an offset into it (400 handles on a big directory cost one index)."""
        listing = self._listings.get(node.ino)
        if listing is None:
            children = node.children or {}  # opendir let only directories through
            listing = self._listings[node.ino] = (tuple(children), tuple(children.values()))
        return listing

    def readdir(self, dh: DirHandle, start: int):
        """(name, Attr, next offset) from ``start``; ``.`` and ``..`` first (offsets 0, 1)."""
        node = dh.node
        if dh.entries is None:
            dh.entries = self._listing(node)
        names, nodes = dh.entries
        for i in range(start, 2 + len(names)):
            if i < 2:
                yield (b".", b"..")[i], self._attr(node if i == 0 else self._node(node.parent)), i + 1
            else:
                yield names[i - 2], self._attr(nodes[i - 2]), i + 1

    def unlookup(self, ino: int):
        pass

    def releasedir(self, dh: DirHandle):
        dh.close()

    def statfs(self):
        n = len(self.tree.nodes)
        return dict(f_bsize=4096, f_frsize=4096, f_blocks=self.blocks, f_bfree=0, f_bavail=0,
                    f_files=n, f_ffree=0, f_favail=0, f_namemax=manifest_tree.MAX_NAME_BYTES)

    # -- files ----------------------------------------------------------------------

    def _file(self, ino: int) -> manifest_tree.Node:
        node = self._node(ino)
        if node.kind != stat.S_IFREG:
            raise OSError(errno.EISDIR if node.children is not None else errno.EINVAL,
                          "not a regular file")
        return node

    def _open_backing(self, node: manifest_tree.Node, wait: bool = False) -> int:
        """The share's file at the manifest path, regular, opened without waiting unless
        ``wait`` (a WouldWait's ``finish``, in a worker thread: it needs only root_fd)."""
        try:
            pfd = fsutil.open_beneath(self.root_fd, node.path.encode())
        except OSError as e:
            raise _share_fault(e, f"{node.path}: listed in the manifest, but the share has no "
                               f"regular file there ({e.strerror}; symlinks are not followed)",
                               node.path) from None
        what = f"{node.path}: in the share, it"
        try:
            if wait:
                return fsutil.reopen_regular(pfd, what)
            return fsutil.open_nowait(lambda f: fsutil.reopen_regular(pfd, what, f), os.O_RDONLY,
                                      lambda: lambda: self._open_backing(node, wait=True))
        except fsutil.NotRegular as e:
            raise Corruption(e.strerror, node.path) from None
        except OSError as e:  # its fstat or open: the host's answer, whatever its errno
            raise _share_fault(e, f"{node.path}: listed in the manifest, but the share's file "
                               f"cannot be opened ({e.strerror})", node.path) from None

    def _fetch_tree(self, node: manifest_tree.Node):
        """The tree object the manifest digest names, validated as a store object."""
        try:
            return self.store.open_object(node.alg, node.digest)
        except StoreCorrupt as e:  # the object's name alone would not say which file
            raise type(e)(f"{node.path}: {e}", node.path) from None

    def open_tree(self, node: manifest_tree.Node):
        """The tree object the manifest digest names, consistent with the entry (one rule
        for every source of tree objects: a share's store, a registry)."""
        tree = self._fetch_tree(node)
        try:
            node.tree.check(tree.descriptor, node.path)
        except BaseException:
            tree.close()
            raise
        return tree

    def _small_tree(self, node: manifest_tree.Node, fd: int):
        """A small file's tree is made from its bytes (small_trees.small_tree): a file
        of at most one block has none (its descriptor is the manifest's parameters and
        size with the hash of its one block), one of up to SMALL_TREE_BYTES has one
        block of its blocks' hashes.  Made from what the share's file ``fd`` holds now,
        it is used only if its descriptor hashes to the manifest's digest, which makes
        that root hash the sealed one (the digest covers it), so every read is then
        checked against it as against an object's; the store is not read at all (on a
        virtio-fs share: one read of the open file instead of an object's lookup, open,
        read and release on the host).

        This is the first, cheap try: one read, None when the file is larger, its bytes
        do not match, the read comes back short (``_tree`` reads on), or it would wait
        where the file system can tell (RWF_NOWAIT).  A share that cannot tell (tmpfs,
        FUSE and virtio-fs refuse RWF_NOWAIT) is read as an object would be: a read that
        may wait, on the request thread."""
        if not small_tree_fits(node.params, node.size):
            return None
        buf = bytearray(node.size + 1)  # a byte more: a file longer than sealed shows
        try:
            try:
                n = os.preadv(fd, [buf], 0, self._nowait)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    return None  # it would wait (EAGAIN), or fails: _tree says
                self._nowait = 0
                n = os.preadv(fd, [buf], 0)
        except OSError:
            return None
        if n != node.size:
            return None
        return small_tree(node.path, node.params, bytes(buf[:n]), node.digest)

    def _bytes_tree(self, node: manifest_tree.Node, fd: int):
        """(the bytes of the share's file ``fd``, read on where it reads short, waiting if
        need be; the tree they give, or None if it does not hash to the manifest's
        digest).  A failed read is the host's answer (Corruption), unless it is the
        daemon's own want (RESOURCE_ERRNOS): never an integrity failure."""
        try:
            data = read_upto(fd, node.size)
        except OSError as e:
            raise _unreadable(e, node.path) from None
        tree = None
        if len(data) == node.size:
            tree = small_tree(node.path, node.params, data, node.digest)
        return data, tree

    def _tree(self, node: manifest_tree.Node, fd: int):
        """The tree ``node``'s reads are checked against, for its share file ``fd``: a small
        file's own when that does, else the object.  A file of one block is sealed without
        an object (in a format-3 store): its bytes are read, waiting if need be, before an
        object is looked for (an older seal's, a format-2 store's); a larger small file's
        object comes first when its bytes would wait, as before."""
        tree = self._small_tree(node, fd)
        if tree is not None:
            return tree
        data = None
        if node.size <= node.params.block_size:
            data, tree = self._bytes_tree(node, fd)
            if tree is not None:
                return tree
        try:
            return self.open_tree(node)
        except (StoreCorrupt, Corruption) as e:  # no object that will do: its bytes may
            if not small_tree_fits(node.params, node.size):
                raise
            if data is None:
                data, tree = self._bytes_tree(node, fd)
                if tree is not None:
                    return tree
            differs = "the share's file " + small_file_differs(node.params, data, node.size,
                                                               node.digest)
            if node.size <= node.params.block_size:
                # Its bytes are all there is to check (no object, or none that proves
                # itself), and they are not what was sealed: its one block, when its
                # size is right, is where a read would have failed.
                why = differs if isinstance(e, MissingObject) else f"{differs}; and {e}"
                at = 0 if len(data) == node.size else None
                raise ContentMismatch(f"{node.path}: {why}", node.path, at) from None
            kind = StoreCorrupt if isinstance(e, StoreCorrupt) else Corruption
            raise kind(f"{e}; and {differs}", node.path) from None

    def open(self, ino: int, flags: int, caller=None, fd: Optional[int] = None) -> FileHandle:
        """``fd``: what a WouldWait's ``finish`` opened (taken)."""
        try:
            node = self._file(ino)
            if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
                erofs()
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        fh = FileHandle(self._open_backing(node) if fd is None else fd, node)
        try:  # open_tree made the sealed size the manifest's
            fh.verify_with(self._tree(node, fh.fd), self.cache, node.path, self.stats,
                           what="the share's file", sealed="the manifest says")
        except OSError as e:  # the fstat of the share's file: the host's errno, not ours
            fh.close()
            raise _unreadable(e, node.path) from None
        except BaseException:
            fh.close()
            raise
        return fh

    def release(self, fh: FileHandle):
        fh.close()

    # -- verity and xattrs ------------------------------------------------------------

    def verity_info(self, ino: int):
        node = self._node(ino)
        if node.kind != stat.S_IFREG:
            return None
        return VerityInfo(node.tree)

    def tree_verifier(self, ino: int) -> Verifier:
        """The file's tree object, read only through a verifier (the caller closes
        ``.tree``): what the mount exports of it is checked as reads are."""
        node = self._file(ino)
        if not small_tree_fits(node.params, node.size):
            return self._verifier(self.open_tree(node), node)
        # A small file needs no object here either (what open reads it against).
        try:
            fd = self._open_backing(node, wait=True)
        except Corruption as e:  # no file in the share: its object may still say
            try:
                return self._verifier(self.open_tree(node), node)
            except MissingObject:  # none (a file of one block has none): the share's fault
                raise e from None
        try:
            return self._verifier(self._tree(node, fd), node)
        finally:
            os.close(fd)

    def _verifier(self, tree, node: manifest_tree.Node) -> Verifier:
        try:
            return Verifier(tree, self.cache, node.path)
        except BaseException:  # (out of memory): the tree's fd is not left behind
            tree.close()
            raise

    def flags(self, ino: int, fh=None) -> int:
        return uapi.FS_VERITY_FL if self._node(ino).kind == stat.S_IFREG else 0

    def fsxattr(self, ino: int, fh, new=None) -> bytes:
        if new is not None:
            erofs()
        return vioctl.with_xflag_verity(bytes(uapi.FSXATTR_SIZE),
                                        self._node(ino).kind == stat.S_IFREG)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        raise OSError(errno.ENODATA, "no such attribute")  # only user.fsverity.* exist here

    def listxattr(self, ino: int, ctx=None):
        return []
