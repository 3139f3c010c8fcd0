"""The command line's argument types and shared options (fsverity-utils' rules for the
tree options: a usage error, exit 2, for a malformed value)."""

from __future__ import annotations

import argparse
import re

from . import merkle
from .treebuild import MAX_THREADS  # the API's bound too


class Once(argparse.Action):
    """fsverity-utils refuses an option given twice."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} can only be specified once")
        setattr(namespace, self.dest, values)


def non_negative(option: str):
    """An argparse type: an integer of 0 or more, for ``option``."""
    def parse(text: str) -> int:
        try:
            n = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option}: {text!r} is not an integer") from None
        if n < 0:
            raise argparse.ArgumentTypeError(f"{option}: must be 0 or more, not {n}")
        return n
    return parse


def _pinned_digest(text: str) -> str:
    from .errors import ManifestError
    from .manifest import pinned_digest
    try:
        return pinned_digest(text)
    except ManifestError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_block_size(text: str) -> int:
    try:
        n = int(text, 10)
    except ValueError:
        n = 0
    if n <= 0 or n & (n - 1) or n > 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"Invalid block size: {text}.  Must be power of 2")
    return n


def parse_salt(text: str) -> bytes:
    try:
        if len(text) % 2:
            raise ValueError
        return bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError("salt is not a valid hex string") from None


def parse_hash_alg(text: str):
    """A name must be known (usage error); a number is checked later (error), as fsverity does."""
    if text.isdigit():
        return int(text)
    if text.lower() in merkle.ALGORITHMS:
        return text.lower()
    raise argparse.ArgumentTypeError(
        f"unknown hash algorithm: '{text}'\nAvailable hash algorithms: {' '.join(merkle.ALGORITHMS)}")


def add_tree_options(p, threads_help: str = "hashing threads (default: number of CPUs, at most 4)"):
    p.add_argument("--hash-alg", type=parse_hash_alg, action=Once, metavar="HASH_ALG",
                   help="sha256 (default) or sha512, or an fs-verity algorithm number")
    p.add_argument("--block-size", type=parse_block_size, action=Once, metavar="BLOCK_SIZE",
                   help="Merkle tree block size, a power of 2 (default 4096)")
    p.add_argument("--salt", type=parse_salt, action=Once, metavar="SALT",
                   help="salt, in hex (at most 32 bytes)")
    p.add_argument("--threads", type=_threads, default=None, metavar="N", help=threads_help)


def _threads(text: str) -> int:
    # A negative count used to hang the hashing of a large file; a huge one would fork
    # that many seal workers.  0 is the default, as when the option is not given.
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"--threads must be an integer from 0 to {MAX_THREADS} "
                                         f"(0: the default)")
    return int(text)


def params_from(args) -> merkle.Params:
    alg = merkle.hash_alg(args.hash_alg if args.hash_alg is not None else "sha256")
    return merkle.Params(alg, args.block_size or merkle.DEFAULT_BLOCK_SIZE, args.salt or b"")


def _expires(text: str) -> str:
    """``seal --expires WHEN`` that is no duration, UTC time or 'never' is a usage error
    (exit 2); whether WHEN is still in the future is seal's to say when it runs."""
    from .manifest_header import parse_expiry

    try:
        parse_expiry(text, -1)  # before every time: only the shape (and the year 9999) count
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _sequence(text: str) -> int:
    from .manifest_header import MAX_SEQUENCE

    if not re.fullmatch(r"[0-9]{1,19}", text) or not 1 <= int(text) <= MAX_SEQUENCE:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer in [1, {MAX_SEQUENCE}]")
    return int(text)
