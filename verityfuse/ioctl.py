"""fs-verity ioctl codecs and argument checks, with the kernel's errnos (pure).

Linux >= 6.10 forwards FS_IOC_ENABLE_VERITY and FS_IOC_MEASURE_VERITY to FUSE
servers without checking anything (fs/fuse/ioctl.c), so every rule of
fs/verity/enable.c and measure.c is applied here.  The daemon calls these in
the kernel's order; see ops.VerityOperations.ioctl.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from . import merkle, uapi
from .errors import Errno

# The inode-flag ioctls, both widths (uapi): the kernel's fileattr path always carries 4 bytes.
GETFLAGS_CMDS = (uapi.FS_IOC_GETFLAGS, uapi.FS_IOC32_GETFLAGS)
SETFLAGS_CMDS = (uapi.FS_IOC_SETFLAGS, uapi.FS_IOC32_SETFLAGS)

# Block sizes this implementation enables.  The kernel takes 1 KiB up to the page size
# and the file system's block size (4 KiB on x86 ext4); this takes up to 64 KiB, as a
# kernel with 64 KiB pages does, so that such a tree can be made anywhere: a superset,
# said in protocol/errnos.md.
MIN_ENABLE_BLOCK_SIZE = 1024
MAX_ENABLE_BLOCK_SIZE = merkle.MAX_BLOCK_SIZE


@dataclass(frozen=True)
class EnableArg:
    version: int
    hash_algorithm: int
    block_size: int
    salt: bytes
    signature: bytes


def parse_enable(data: bytes) -> EnableArg:
    """struct fsverity_enable_arg (128 bytes) || salt || signature, as FUSE forwards it.

    Checks done by fsverity_ioctl_enable() before anything else: EINVAL for a
    bad version, reserved field or non-power-of-2 block size, EMSGSIZE for a
    salt or signature that is too long.
    """
    if len(data) < uapi.ENABLE_ARG_STRUCT.size:
        raise Errno(errno.EINVAL, f"enable argument is {len(data)} bytes, expected at least 128")
    (version, alg, bs, salt_size, _salt_ptr, sig_size, reserved1, _sig_ptr,
     reserved2) = uapi.ENABLE_ARG_STRUCT.unpack_from(data)
    if version != 1:
        raise Errno(errno.EINVAL, f"unsupported fsverity_enable_arg version {version}")
    if reserved1 or any(reserved2):
        raise Errno(errno.EINVAL, "reserved fields of fsverity_enable_arg are not zero")
    if bs == 0 or bs & (bs - 1):
        raise Errno(errno.EINVAL, f"block size {bs} is not a power of 2")
    if salt_size > uapi.FS_VERITY_MAX_SALT_SIZE:
        raise Errno(errno.EMSGSIZE, f"salt of {salt_size} bytes is longer than 32")
    if sig_size > uapi.FS_VERITY_MAX_SIGNATURE_SIZE:
        raise Errno(errno.EMSGSIZE, f"signature of {sig_size} bytes is longer than "
                                    f"{uapi.FS_VERITY_MAX_SIGNATURE_SIZE}")
    body = data[uapi.ENABLE_ARG_STRUCT.size:]
    if len(body) != salt_size + sig_size:
        raise Errno(errno.EINVAL, f"enable argument carries {len(body)} bytes after the header, "
                                  f"expected salt {salt_size} + signature {sig_size}")
    return EnableArg(version, alg, bs, body[:salt_size], body[salt_size:])


def enable_params(arg: EnableArg) -> merkle.Params:
    """The tree parameters, or EINVAL for an unknown algorithm / unsupported block size."""
    alg = merkle.ALGORITHMS_BY_NUMBER.get(arg.hash_algorithm)
    if alg is None:
        raise Errno(errno.EINVAL, f"unknown hash algorithm {arg.hash_algorithm}")
    if not MIN_ENABLE_BLOCK_SIZE <= arg.block_size <= MAX_ENABLE_BLOCK_SIZE:
        raise Errno(errno.EINVAL, f"unsupported block size {arg.block_size}")
    return merkle.Params(alg, arg.block_size, arg.salt)


def pack_enable(params: merkle.Params, signature: bytes = b"") -> bytes:
    """What the kernel forwards for `fsverity enable` with these parameters (tests, vectors)."""
    head = uapi.ENABLE_ARG_STRUCT.pack(1, params.alg.number, params.block_size, len(params.salt),
                                       0, len(signature), 0, 0, b"")
    return head + params.salt + signature


def measure_reply(data: bytes, alg: merkle.HashAlg, digest: bytes, out_size: int) -> bytes:
    """struct fsverity_digest for FS_IOC_MEASURE_VERITY.

    ``data`` is the caller's header (digest_size = its buffer size, any value) and
    ``out_size`` what the kernel will copy back.  The kernel read digest_size to size
    the request and copied the header again: a thread of the caller that changes it in
    between makes the two disagree, and the smaller is the buffer there is.  EOVERFLOW
    if it cannot hold the digest.
    """
    if len(data) < uapi.DIGEST_HEADER_STRUCT.size:
        raise Errno(errno.EINVAL, "FS_IOC_MEASURE_VERITY argument shorter than 4 bytes")
    _, size = uapi.DIGEST_HEADER_STRUCT.unpack_from(data)
    size = min(size, out_size - uapi.DIGEST_HEADER_STRUCT.size)
    if size < len(digest):
        raise Errno(errno.EOVERFLOW, f"digest buffer of {max(size, 0)} bytes, need {len(digest)}")
    return uapi.DIGEST_HEADER_STRUCT.pack(alg.number, len(digest)) + digest


def getflags_reply(flags: int) -> bytes:
    return struct.pack("<I", flags & 0xFFFFFFFF)


def _xflags(buf: bytes) -> int:
    if len(buf) < uapi.FSXATTR_SIZE:
        raise Errno(errno.EINVAL, f"struct fsxattr of {len(buf)} bytes, expected {uapi.FSXATTR_SIZE}")
    return struct.unpack_from("<I", buf)[0]


def with_xflag_verity(buf: bytes, verity: bool) -> bytes:
    flags = _xflags(buf) & ~uapi.FS_XFLAG_VERITY
    return struct.pack("<I", flags | (uapi.FS_XFLAG_VERITY if verity else 0)) + buf[4:uapi.FSXATTR_SIZE]
