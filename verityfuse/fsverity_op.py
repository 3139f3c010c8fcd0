"""The FUSE_FSVERITY operation (protocol/fuse-fsverity.md): bytes in, bytes out.

``handle(request, target)`` decodes one request, serves it from ``target``
and returns the encoded reply, or raises ``Errno`` with the errno the
specification gives.  Pure: the daemon maps it onto xattrs and ioctls (what
today's kernels forward), and the tests drive it with protocol/vectors.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import Callable, Optional

from . import ioctl, merkle, treebuild
from .errors import Errno

VERSION = 1
OP_GET_DESCRIPTOR = 1
OP_READ_MERKLE_TREE = 2
OP_READ_SIGNATURE = 3
OP_MEASURE = 4
OP_ENABLE = 5
OUT_EOF = 1
MAX_READ = 1 << 20

IN = struct.Struct("<IIQII")   # version, op, offset, size, flags
OUT = struct.Struct("<IIQ")    # size, flags, total
assert IN.size == 24 and OUT.size == 16


@dataclass
class Metadata:
    """What a verity file offers: the descriptor, the tree (pread-like) and the signature.

    The file digest is ``descriptor.digest``: a holder passes the descriptor of the tree
    object opened by the trusted digest, which hashes to it."""

    descriptor: merkle.Descriptor
    read_tree: Callable[[int, int], bytes]
    signature: bytes = b""


class Target:
    """The file a request is about.  ``metadata()`` is None for a non-verity file."""

    def metadata(self) -> Optional[Metadata]:
        raise NotImplementedError

    def enable(self, arg: "ioctl.EnableArg") -> None:
        """Enable verity with a parsed fsverity_enable_arg, or raise Errno: the
        target applies the enable rules (EEXIST, parameters, ...)."""
        raise NotImplementedError


def encode_request(op: int, offset: int = 0, size: int = 0, payload: bytes = b"",
                   version: int = VERSION, flags: int = 0) -> bytes:
    return IN.pack(version, op, offset, size, flags) + payload


def decode_reply(reply: bytes):
    """(payload, flags, total) of a reply."""
    size, flags, total = OUT.unpack_from(reply)
    payload = reply[OUT.size:]
    if len(payload) != size:
        raise ValueError(f"reply says {size} payload bytes, carries {len(payload)}")
    return payload, flags, total


def _pread(item_size: int, read: Callable[[int, int], bytes], offset: int, size: int) -> bytes:
    if offset + size > 0xFFFFFFFFFFFFFFFF:
        raise Errno(errno.EINVAL, "offset + size overflows")
    size = min(size, MAX_READ)
    data = read(offset, size) if offset < item_size else b""
    eof = OUT_EOF if offset + len(data) >= item_size else 0
    return OUT.pack(len(data), eof, item_size) + data


def handle(request: bytes, target: Target) -> bytes:
    if len(request) < IN.size:
        raise Errno(errno.EINVAL, f"request of {len(request)} bytes, header is {IN.size}")
    version, op, offset, size, flags = IN.unpack_from(request)
    payload = request[IN.size:]
    if version != VERSION:
        raise Errno(errno.EINVAL, f"unsupported FUSE_FSVERITY version {version}")
    if flags:
        raise Errno(errno.EINVAL, f"undefined flags {flags:#x}")
    if op not in (OP_GET_DESCRIPTOR, OP_READ_MERKLE_TREE, OP_READ_SIGNATURE, OP_MEASURE, OP_ENABLE):
        raise Errno(errno.EOPNOTSUPP, f"unknown FUSE_FSVERITY op {op}")
    if op != OP_ENABLE and payload:
        raise Errno(errno.EINVAL, f"op {op} takes no payload, got {len(payload)} bytes")

    if op == OP_ENABLE:
        if offset or size != len(payload):
            raise Errno(errno.EINVAL, "ENABLE: offset must be 0 and size the payload length")
        target.enable(ioctl.parse_enable(payload))
        return OUT.pack(0, 0, 0)

    md = target.metadata()
    if md is None:
        raise Errno(errno.ENODATA, "not a verity file")
    if op == OP_MEASURE:
        if offset:
            raise Errno(errno.EINVAL, "MEASURE: offset must be 0")
        d = md.descriptor
        room = min(size, 0xFFFF)  # the caller's digest buffer, as FS_IOC_MEASURE_VERITY's
        body = ioctl.measure_reply(struct.pack("<HH", 0, room), d.params.alg, d.digest, 4 + room)
        return OUT.pack(len(body), 0, 0) + body
    if op == OP_GET_DESCRIPTOR:
        raw = md.descriptor.raw
        return _pread(len(raw), lambda o, n: raw[o:o + n], offset, size)
    if op == OP_READ_MERKLE_TREE:
        return _pread(md.descriptor.geometry.tree_size, md.read_tree, offset, size)
    sig = md.signature
    if not sig:
        raise Errno(errno.ENODATA, "no signature was given at enable")
    return _pread(len(sig), lambda o, n: sig[o:o + n], offset, size)


class MemoryTarget(Target):
    """A target over bytes in memory: for test vectors and client implementations."""

    def __init__(self, data: bytes, params: Optional[merkle.Params] = None, signature: bytes = b""):
        self.data = data
        self.md = None
        if params is not None:
            self._build(params, signature)

    def metadata(self):
        return self.md

    def enable(self, arg):
        if self.md is not None:
            raise Errno(errno.EEXIST, "already a verity file")
        self._build(ioctl.enable_params(arg), arg.signature)

    def _build(self, params, signature):
        import os

        tree = bytearray()

        def write_block(offset, block):
            if len(tree) < offset + len(block):
                tree.extend(bytes(offset + len(block) - len(tree)))
            tree[offset:offset + len(block)] = block

        fd = os.memfd_create("verityfuse-vector")
        try:
            os.write(fd, self.data)
            desc = treebuild.build_tree(fd, params, write_block=write_block)
        finally:
            os.close(fd)
        tree = bytes(tree)
        self.md = Metadata(desc, lambda o, n: tree[o:o + n], signature)
