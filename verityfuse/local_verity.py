"""Verity state of backing inodes in local mode (no pyfuse3/trio).

Verity belongs to the inode, as on ext4: the store indexes inodes by identity
(filesystem and file handle), so hard links, renames through the mount or
directly in SOURCE, and renames during an enable all keep it, and nothing is
walked.  An inode's state is resolved once and kept on the inode.  Enabling
it is enable.py's.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any, Callable, Optional

from . import identity, merkle
from .errors import Errno, StoreCorrupt, VerityError
from .inodes import NOT_VERITY, UNKNOWN, Inode
from .store import IndexEntry, Store
from .store_object import inline_tree
from .view import VerityInfo


class LocalVerity:
    def __init__(self, store: Store, label: Callable, trust_certs=(), require_signatures=False):
        self.store = store
        self.label = label  # inode -> a name for messages
        self.trust_certs = list(trust_certs)
        self.require_signatures = require_signatures

    # -- state --------------------------------------------------------------------

    def info(self, inode: Inode) -> Optional[VerityInfo]:
        """The inode's verity state, loaded on first use; None if it has none.

        Raises the error that makes its metadata unusable (every open then
        fails with it, as on ext4 with a corrupt descriptor).
        """
        v: Any = inode.verity
        if v is UNKNOWN:
            v = NOT_VERITY
            if inode.is_reg:
                try:
                    key = inode.store_key
                    entry = self.store.get_entry(key) if key else None
                    if entry is not None:
                        v = self.load(entry)
                except StoreCorrupt as e:  # every open fails with it: name the file too
                    name = self.label(inode)
                    v = StoreCorrupt(f"{name}: {e}", name)
                except VerityError as e:
                    v = e
            inode.verity = v
        if isinstance(v, Exception):
            raise v
        return v

    def load(self, entry: IndexEntry) -> VerityInfo:
        """The verity state an index entry describes (its tree object opened, or the
        descriptor it keeps; its signature checked)."""
        d, root = entry.descriptor, b""
        if d is not None:  # it hashes to entry.digest: checked when the entry was read
            tree_id, root = merkle.TreeId(d.params, d.data_size, entry.digest), d.root_hash
        else:
            with self.store.open_object(entry.alg, entry.digest) as tree:
                tree_id = tree.tree_id  # its descriptor hashes to entry.digest: checked at open
        self.check_signature(entry.signature, entry.alg, entry.digest)
        return VerityInfo(tree_id, entry.signature, root)

    def is_verity(self, inode: Inode) -> bool:
        """Verity, even if its metadata is damaged (it stays read-only)."""
        if not inode.is_reg:
            return False
        try:
            return self.info(inode) is not None
        except VerityError:
            return True

    def tree(self, info: VerityInfo, label: str):
        """The tree of ``info``: its object (a corrupt one names the file ``label`` too),
        or, for a file whose index entry keeps its descriptor, that descriptor rebuilt
        from what ``load`` kept (a root hash, not a descriptor, per inode)."""
        if info.inline_root:
            t = info.tree
            desc = merkle.Descriptor.build(t.params, t.data_size, info.inline_root)
            return inline_tree(label, desc, t.digest)  # a label formats its name only if needed
        try:
            return self.store.open_object(info.alg, info.digest)
        except StoreCorrupt as e:
            name = str(label)
            raise StoreCorrupt(f"{name}: {e}", name) from None

    def check_signature(self, sig: bytes, alg, digest: bytes):
        """Built-in signature rules, as the kernel applies them on open."""
        if not sig:
            if self.require_signatures:
                raise Errno(errno.EPERM, "unsigned verity file and signatures are required")
            return
        if self.trust_certs:
            from . import signature
            signature.verify(sig, alg, digest, self.trust_certs)
        # Without trusted certificates the signature is kept unverified, as a
        # kernel without CONFIG_FS_VERITY_BUILTIN_SIGNATURES does.

    def dropped(self, fd: int):
        """The inode behind O_PATH ``fd`` lost its last name: forget its entry."""
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 0:
                self.store.remove_entry(identity.key_of(fd))
        except OSError:
            pass  # no handle, no entry; a stale entry is harmless (never matches)
