"""``verityfuse push SOURCE REF --manifest M``: publish a sealed tree as an OCI artifact.

Uploads, per distinct fs-verity digest of M's files, the tree object from the
store and the file's bytes from SOURCE (uncompressed: readers fetch blocks by
byte range), then M itself as the artifact's config, then the OCI manifest
(oci_artifact).  A blob the repository already has is not uploaded again.  A file
of one block has no object in the store (sealing writes none): its object, a
header and its descriptor, is made from its bytes, the same bytes an object holds.

Every file's bytes are checked against its tree while they are hashed for the
upload, so a file changed after sealing fails the push (naming the file and
offset) instead of publishing an image whose reads would fail.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from dataclasses import dataclass
from typing import IO, Callable, Optional

from . import fsutil, manifest, manifest_tree, oci_artifact
from .errors import Corruption, VerityError
from .oci_artifact import Artifact, Blob
from .oci_client import Client, sha256_digest
from .store import store_of
from .small_trees import small_file_differs, small_tree
from .store_object import TREE_OFFSET, object_head
from .treebuild import read_full, read_upto
from .verifier import TreeBlockCache, Verifier

_PIECE = 1 << 20


class PushError(VerityError):
    pass


@dataclass
class PushResult:
    oci_digest: str        # the OCI manifest's digest (what REF@DIGEST names)
    manifest_digest: str   # the verityfuse manifest's digest (what a mount pins)
    uploaded: int = 0      # blobs uploaded
    uploaded_bytes: int = 0
    present: int = 0       # blobs the repository had already


def _hash_and_check(fd: int, size: int, tree, label: str) -> str:
    """SHA-256 of the file's bytes, each block verified against ``tree`` on the way."""
    verifier = Verifier(tree, TreeBlockCache(4 << 20), label)
    bs = tree.block_size
    h = hashlib.sha256()
    pos = 0
    while pos < size:
        want = min(_PIECE, size - pos)
        padded = bytearray(want + -want % bs)  # whole blocks, the tail's zeros in place
        got = read_full(fd, memoryview(padded)[:want], pos)  # a FUSE source reads short
        if got < want:
            raise PushError(f"{label}: the file ends at {pos + got} bytes, the "
                            f"manifest says {size}")
        h.update(memoryview(padded)[:want])
        verifier.verify(pos // bs, padded)  # IntegrityError names the file and offset
        pos += want
    if os.pread(fd, 1, size):
        raise PushError(f"{label}: the file is longer than the manifest's {size} bytes")
    return "sha256:" + h.hexdigest()


class _Uploader:
    def __init__(self, client: Client, result: PushResult, chunk_size: int):
        self.client, self.result, self.chunk_size = client, result, chunk_size
        self.done: set = set()

    def put(self, blob: Blob, open_body: Callable[[], IO[bytes]]):
        if blob.digest in self.done:
            return
        self.done.add(blob.digest)
        if self.client.blob_size(blob.digest) == blob.size:
            self.result.present += 1
            return
        self.client.upload_blob(blob.digest, blob.size, open_body, self.chunk_size)
        self.result.uploaded += 1
        self.result.uploaded_bytes += blob.size


def _fd_reader(fd: int) -> Callable[[], IO[bytes]]:
    """Each call: a reader of ``fd`` from its start, with its own file offset."""
    return lambda: open(f"/proc/self/fd/{fd}", "rb")


def push(source: str, manifest_path: str, client: Client, tag: Optional[str],
         store_path: Optional[str] = None, chunk_size: int = 64 << 20,
         progress: Callable[[str], None] = lambda line: None) -> PushResult:
    env, payload = manifest.read_envelope(manifest_path)  # the publisher's own: not authenticated
    tree = manifest_tree.parse_payload(payload, manifest_path)
    mdigest = manifest.manifest_digest(payload)
    with open(manifest_path, "rb") as f:
        mbytes = f.read(manifest.MAX_BYTES + 1)
    store = store_of(source, store_path, objects_only=True)
    root = os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    art = Artifact(Blob(sha256_digest(mbytes), len(mbytes)))
    result = PushResult("", mdigest)
    up = _Uploader(client, result, chunk_size)
    try:
        client.check()
        for node in tree.files():
            fsv = node.digest_text
            if fsv in art.trees:
                continue
            if node.size <= node.params.block_size:
                obj_bytes, data = _one_block(root, node)
                art.trees[fsv] = Blob(sha256_digest(obj_bytes), len(obj_bytes))
                up.put(art.trees[fsv], functools.partial(io.BytesIO, obj_bytes))
                if data:
                    art.data[fsv] = Blob(sha256_digest(data), len(data))
                    up.put(art.data[fsv], functools.partial(io.BytesIO, data))
                progress(node.path)
                continue
            with store.open_object(node.alg, node.digest) as obj:
                try:
                    node.tree.check(obj.descriptor, node.path)
                except Corruption as e:  # the publisher's manifest, not the store, is wrong
                    raise PushError(str(e)) from None
                size = TREE_OFFSET + obj.geometry.tree_size
                obj_bytes = os.pread(obj.fd, size, 0)
                art.trees[fsv] = Blob(sha256_digest(obj_bytes), size)
                up.put(art.trees[fsv], functools.partial(io.BytesIO, obj_bytes))
                if node.size:
                    fd = _open_data(root, node)
                    try:
                        art.data[fsv] = Blob(_hash_and_check(fd, node.size, obj, node.path),
                                             node.size)
                        up.put(art.data[fsv], _fd_reader(fd))
                    finally:
                        os.close(fd)
            progress(node.path)
        up.put(art.manifest, lambda: io.BytesIO(mbytes))
        body = oci_artifact.build(art, mdigest)
        result.oci_digest = client.put_manifest(tag or sha256_digest(body), body)
    finally:
        os.close(root)
        store.close()
    return result


def _one_block(root: int, node: manifest_tree.Node):
    """(object bytes, data) of a file of at most one block: its object made from its
    bytes, which must give the manifest's digest (a file changed after sealing fails
    the push, as a larger one does in _hash_and_check)."""
    fd = _open_data(root, node)
    try:
        data = read_upto(fd, node.size)
    finally:
        os.close(fd)
    tree = None
    if len(data) == node.size:  # its descriptor, if it hashes to the manifest's digest
        tree = small_tree(node.path, node.params, data, node.digest)
    if tree is not None:
        return object_head(tree.descriptor), data
    raise PushError(f"{node.path}: the file "
                    f"{small_file_differs(node.params, data, node.size, node.digest)}")


def _open_data(root: int, node: manifest_tree.Node) -> int:
    try:
        pfd = fsutil.open_beneath(root, node.path.encode())
        return fsutil.reopen_regular(pfd, f"{node.path}: it")
    except OSError as e:
        raise PushError(f"{node.path}: cannot open it below SOURCE ({e.strerror}; symlinks "
                        f"are not followed)") from None
