"""The commands fsverity-utils has for a mounted verity file, on a verityfuse mount:
`measure` (FS_IOC_MEASURE_VERITY), `enable` (FS_IOC_ENABLE_VERITY) and `dump-metadata`
(FS_IOC_READ_VERITY_METADATA cannot reach a FUSE server: the mount's control xattrs)."""

from __future__ import annotations

import errno
import os
import sys

from . import merkle
from .argtypes import non_negative
from .cli import EXIT_ERROR, EXIT_USAGE, add_tree_options, error, params_from
from .jsonout import shown


# -- dump-metadata --------------------------------------------------------

def cmd_dump_metadata(args) -> int:
    """Like `fsverity dump_metadata`, through the mount's control xattrs."""
    if (args.offset is None) != (args.length is None):
        error("--offset and --length must be given together")
        return EXIT_USAGE
    offset, length = args.offset or 0, args.length
    try:
        if args.type == "merkle_tree":
            out = bytearray()
            off = offset
            while length is None or len(out) < length:
                chunk = os.getxattr(args.file, f"user.fsverity.merkle_tree.{off}")
                if not chunk:
                    break
                out += chunk
                off += len(chunk)
            data = bytes(out if length is None else out[:length])
        else:
            whole = os.getxattr(args.file, f"user.fsverity.{args.type}")
            data = whole[offset:] if length is None else whole[offset:offset + length]
    except OSError as e:
        if e.errno == errno.ENODATA:
            what = "has no signature" if args.type == "signature" else "is not a verity file"
            error(f"'{args.file}' {what} (or is not on a verityfuse mount)")
        else:
            error(f"reading {args.type} of '{args.file}': {e.strerror}")
        return EXIT_ERROR
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


# -- fsverity-utils' names on a mount ---------------------------------------

def cmd_measure(args) -> int:
    """`fsverity measure`: FS_IOC_MEASURE_VERITY, through the mount's ioctl shim; the
    digest xattr where ioctls are not forwarded."""
    import fcntl

    from . import uapi

    status = 0
    for path in args.files:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            error(f"can't open '{shown(path)}' for reading: {e.strerror}")
            status = EXIT_ERROR
            continue
        try:
            buf = bytearray(uapi.DIGEST_HEADER_STRUCT.pack(0, 64) + bytes(64))
            try:
                fcntl.ioctl(fd, uapi.FS_IOC_MEASURE_VERITY, buf)
                alg_no, size = uapi.DIGEST_HEADER_STRUCT.unpack_from(buf)
                alg = merkle.ALGORITHMS_BY_NUMBER.get(alg_no)
                text = f"{alg.name if alg else f'ALG_{alg_no}'}:{bytes(buf[4:4 + size]).hex()}"
            except OSError as e:
                if e.errno != errno.ENOTTY:
                    raise
                text = os.getxattr(path, "user.fsverity.digest").decode()
            print(f"{text} {shown(path)}")
        except OSError as e:
            error(f"FS_IOC_MEASURE_VERITY failed on '{shown(path)}': {e.strerror}")
            status = EXIT_ERROR
        finally:
            os.close(fd)
    return status


def cmd_enable(args) -> int:
    """`fsverity enable`: FS_IOC_ENABLE_VERITY on a file of a verityfuse mount."""
    import ctypes
    import fcntl

    from . import ioctl, uapi

    params = params_from(args)
    sig = b""
    if args.signature:
        with open(args.signature, "rb") as f:
            sig = f.read(1 << 20)
    salt = ctypes.create_string_buffer(params.salt, len(params.salt) or 1)
    sigbuf = ctypes.create_string_buffer(sig, len(sig) or 1)
    arg = bytearray(ioctl.pack_enable(params)[:uapi.ENABLE_ARG_STRUCT.size])
    uapi.ENABLE_ARG_STRUCT.pack_into(arg, 0, 1, params.alg.number, params.block_size,
                                     len(params.salt), ctypes.addressof(salt), len(sig), 0,
                                     ctypes.addressof(sigbuf), b"")
    try:
        fd = os.open(args.file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        error(f"can't open '{args.file}' for reading: {e.strerror}")
        return EXIT_ERROR
    try:
        fcntl.ioctl(fd, uapi.FS_IOC_ENABLE_VERITY, bytes(arg))
    except OSError as e:
        error(f"FS_IOC_ENABLE_VERITY failed on '{args.file}': {e.strerror}")
        return EXIT_ERROR
    finally:
        os.close(fd)
    return 0


def add_commands(sub):
    p = sub.add_parser("dump-metadata", aliases=["dump_metadata"],
                       help="print a mounted verity file's metadata (like `fsverity dump_metadata`)")
    p.add_argument("type", choices=("merkle_tree", "descriptor", "signature"))
    p.add_argument("file", metavar="FILE")
    p.add_argument("--offset", type=non_negative("--offset"))
    p.add_argument("--length", type=non_negative("--length"))
    p.set_defaults(func=cmd_dump_metadata)

    p = sub.add_parser("measure", help="print a mounted verity file's digest (like `fsverity measure`)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("enable", help="enable verity on a file of a mount (like `fsverity enable`)")
    p.add_argument("file", metavar="FILE")
    add_tree_options(p)
    p.add_argument("--signature", metavar="SIGFILE", help="DER PKCS#7 signature (fsverity sign)")
    p.set_defaults(func=cmd_enable)
