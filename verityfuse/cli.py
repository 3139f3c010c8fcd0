"""Command line: digest, seal, verify, mount, umount, dump-metadata, keygen, measure-manifest.

Exit codes follow fsverity-utils: 0 success, 1 error, 2 usage error.
Errors are printed as ``ERROR: <message>`` on stderr.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time

from . import merkle
from .errors import IntegrityError, InvalidParameters, VerityError
from .store import Store, default_store

EXIT_ERROR = 1
EXIT_USAGE = 2


def error(msg: str):
    print(f"ERROR: {msg}", file=sys.stderr)


class Once(argparse.Action):
    """fsverity-utils refuses an option given twice."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} can only be specified once")
        setattr(namespace, self.dest, values)


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


def add_tree_options(p):
    p.add_argument("--hash-alg", type=parse_hash_alg, action=Once, metavar="HASH_ALG",
                   help="sha256 (default) or sha512, or an fs-verity algorithm number")
    p.add_argument("--block-size", type=parse_block_size, action=Once, metavar="BLOCK_SIZE",
                   help="Merkle tree block size, a power of 2 (default 4096)")
    p.add_argument("--salt", type=parse_salt, action=Once, metavar="SALT",
                   help="salt, in hex (at most 32 bytes)")
    p.add_argument("--threads", type=int, default=None,
                   help="hashing threads (default: number of CPUs, at most 4)")


def params_from(args) -> merkle.Params:
    alg = merkle.hash_alg(args.hash_alg if args.hash_alg is not None else "sha256")
    return merkle.Params(alg, args.block_size or merkle.DEFAULT_BLOCK_SIZE, args.salt or b"")


class Progress:
    """A one-line progress display on a terminal, for files worth waiting on."""

    MIN_SIZE = 64 << 20

    def __init__(self, label: str, total: int, stream=sys.stderr):
        self.enabled = total >= self.MIN_SIZE and stream.isatty()
        self.label, self.total, self.stream = label, total, stream
        self.start = self.last = time.monotonic()

    def __call__(self, done: int):
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.2 and done < self.total):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9) / (1 << 20)
        self.stream.write(f"\r{self.label}: {100 * done // self.total:3d}% "
                          f"({done >> 20}/{self.total >> 20} MiB, {rate:.0f} MiB/s)")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()


# -- digest ---------------------------------------------------------------

def cmd_digest(args) -> int:
    params = params_from(args)
    # As fsverity-utils: each output is opened once; every file's tree is
    # written at its own offsets (so later files overwrite earlier ones) and
    # descriptors are appended one after another.
    tree_out = open(args.out_merkle_tree, "wb") if args.out_merkle_tree else None
    desc_out = open(args.out_descriptor, "wb") if args.out_descriptor else None

    def write_block(off, block):
        tree_out.seek(off)
        tree_out.write(block)

    try:
        for path in args.files:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                error(f"can't open '{path}' for reading: {e.strerror}")
                return EXIT_ERROR
            try:
                desc = merkle.build_tree(fd, params, write_block=write_block if tree_out else None,
                                         threads=args.threads)
            except OSError as e:
                error(f"error reading '{path}': {e.strerror or e}")
                return EXIT_ERROR
            finally:
                os.close(fd)
            if desc_out:
                desc_out.write(desc.raw)
            if args.for_builtin_sig:
                print(f"{merkle.formatted_digest(params.alg, desc.digest).hex()} {path}")
            elif args.compact:
                print(desc.digest.hex())
            else:
                print(f"{merkle.format_digest(params.alg, desc.digest)} {path}")
    finally:
        for f in (tree_out, desc_out):
            if f:
                f.close()
    return 0


# -- seal / verify --------------------------------------------------------

def open_store(args, create: bool) -> Store:
    return Store(args.store or default_store(args.source), create=create)


def cmd_seal(args) -> int:
    from .seal import seal_path, walk_files

    params = params_from(args)
    if not os.path.isdir(args.source):
        error(f"'{args.source}' is not a directory")
        return EXIT_ERROR
    key = None
    if args.sign_key:  # before any hashing: a bad key should cost nothing
        from . import manifest
        key = manifest.load_private_key(args.sign_key)
    rels = None
    if args.paths:
        rels = []
        for p in args.paths:
            rel = os.path.relpath(os.path.abspath(p), os.path.abspath(args.source))
            if rel == ".." or rel.startswith("../"):
                error(f"'{p}' is not inside '{args.source}'")
                return EXIT_ERROR
            rels.append(rel)
    with open_store(args, create=True) as store:
        store.cleanup_tmp()
        if args.manifest:
            return seal_manifest(args, store, params, key, rels)
        status = 0
        for rel in rels if rels is not None else walk_files(args.source, store):
            full = os.path.join(args.source, rel)
            try:
                progress = Progress(full, os.lstat(full).st_size)
                try:
                    entry = seal_path(store, args.source, rel, params, threads=args.threads,
                                      progress=progress)
                finally:
                    progress.close()
            except OSError as e:
                error(f"can't seal '{full}': {e.strerror or e}")
                status = EXIT_ERROR
                continue
            print(f"{entry.digest_text} {full}", flush=True)
    return status


def seal_manifest(args, store, params, key, rels) -> int:
    """Seal and record SOURCE (or update ``rels`` in it) into manifest ``args.manifest``."""
    from . import manifest, manifest_tree
    from .seal import ManifestRecorder

    def warn(msg):
        print(f"WARNING: {msg}", file=sys.stderr)

    def report(entry, full):
        print(f"{entry['digest']} {full}", flush=True)

    rec = ManifestRecorder(args.source, store, params, skip_paths=[args.manifest], warn=warn,
                           report=report, progress=Progress, threads=args.threads)
    if rels is None or "." in rels:
        rec.add(".")
    else:
        existing = []
        if os.path.exists(args.manifest):
            env, payload = manifest.read_envelope(args.manifest)
            if key is not None:
                # Re-signing must not launder entries this key never vouched for.
                manifest.check_signatures(args.manifest, env, payload, [key.public_key()])
            existing = list(manifest_tree.iter_entries(payload, args.manifest))
        rec.update(existing, rels)
    if rec.failed:
        error(f"manifest {args.manifest} not written: {rec.failed} file(s) could not be sealed")
        return EXIT_ERROR
    payload = manifest_tree.make_payload(rec.entries.values())
    manifest_tree.parse_payload(payload, "the new manifest")  # what we write must load
    tmp = f"{args.manifest}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(manifest.sign(payload, key))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, args.manifest)
    files = sum(1 for e in rec.entries.values() if e["type"] == "file")
    print(f"manifest {args.manifest}: {len(rec.entries)} entries ({files} files), "
          f"{manifest.manifest_digest(payload)}"
          + ("" if key else " (unsigned: mount it with --manifest-digest)"), file=sys.stderr)
    return 0


def cmd_measure_manifest(args) -> int:
    """The manifest digest, the one value a remote verifier pins."""
    from . import manifest, manifest_tree

    _, payload = manifest.read_envelope(args.manifest)
    manifest_tree.parse_payload(payload, args.manifest)  # refuse to measure garbage
    print(manifest.manifest_digest(payload))
    return 0


def cmd_keygen(args) -> int:
    from . import manifest

    try:
        key = manifest.generate_key(args.private, args.public)
    except FileExistsError:
        error(f"'{args.private}' exists; not overwriting a key")
        return EXIT_ERROR
    print(f"ed25519 key {manifest.key_id(key.public_key())}: private {args.private}, "
          f"public {args.public}")
    return 0


def describe_failure(e: Exception) -> str:
    if isinstance(e, IntegrityError):
        return (f"{e.what} {e.offset}: expected {e.expected.hex()}, actual {e.actual.hex()}")
    if isinstance(e, OSError):
        return f"{e.strerror or e}"
    return str(e)


def cmd_verify(args) -> int:
    from .seal import verify_file, walk_files
    from .verify import TreeBlockCache

    cache = TreeBlockCache()
    sealed = corrupt = errors = unsealed = 0
    seen = set()
    with open_store(args, create=False) as store:
        for rel in walk_files(args.source, store):
            res = verify_file(store, args.source, rel, cache)
            name = os.path.join(args.source, rel)
            if res.sealed:
                seen.add(res.key)
                sealed += 1
            if res.error is not None and res.sealed:
                corrupt += 1
                print(f"CORRUPT {name}: {describe_failure(res.error)}")
            elif res.error is not None:
                errors += 1
                print(f"ERROR {name}: {describe_failure(res.error)}")
            elif not res.sealed:
                unsealed += 1
                if args.strict or args.verbose:
                    print(f"UNSEALED {name}")
            elif args.verbose:
                print(f"OK {res.entry.digest_text} {name}")
        stale = sum(1 for k in store.keys() if k not in seen)
    print(f"{sealed - corrupt} of {sealed} sealed files intact"
          + (f", {unsealed} unsealed" if unsealed else "")
          + (f", {errors} unreadable" if errors else ""), file=sys.stderr)
    if stale:
        print(f"{stale} index entries name no file under {args.source} (files removed or "
              f"replaced; harmless)", file=sys.stderr)
    if sealed == 0 and not errors:
        error(f"nothing was verified: no sealed file under '{args.source}'")
        return EXIT_ERROR
    return EXIT_ERROR if corrupt or errors or (args.strict and unsealed) else 0


def cmd_upgrade_store(args) -> int:
    from .store_upgrade import upgrade

    with Store(args.store or default_store(args.source), objects_only=True) as store:
        if store.version == 2:
            print(f"store {store.path} is already format 2", file=sys.stderr)
            return 0
        converted, dropped = upgrade(args.source, store,
                                     lambda m: print(f"WARNING: {m}", file=sys.stderr))
    print(f"store {store.path}: format 2, {converted} entries converted, {dropped} dropped",
          file=sys.stderr)
    return 0


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


# -- entry point ----------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verityfuse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("digest", help="compute fs-verity digests (like `fsverity digest`)")
    p.add_argument("files", nargs="+", metavar="FILE")
    add_tree_options(p)
    p.add_argument("--out-merkle-tree", action=Once, metavar="FILE")
    p.add_argument("--out-descriptor", action=Once, metavar="FILE")
    p.add_argument("--compact", action="store_true", help="print the digest only")
    p.add_argument("--for-builtin-sig", action="store_true",
                   help="print the fsverity_formatted_digest, in hex")
    p.set_defaults(func=cmd_digest)

    p = sub.add_parser("seal", help="enable verity offline: build trees into the store")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("paths", nargs="*", metavar="PATH", help="files to seal (default: all)")
    p.add_argument("--store", metavar="DIR", help="store directory (default SOURCE/.verityfuse)")
    p.add_argument("--manifest", metavar="M", help="also write a manifest of the sealed files")
    p.add_argument("--sign-key", metavar="KEY.pem", help="Ed25519 private key to sign the manifest")
    add_tree_options(p)
    p.set_defaults(func=cmd_seal)

    p = sub.add_parser("measure-manifest", help="print a manifest's digest (the value to pin)")
    p.add_argument("manifest", metavar="M")
    p.set_defaults(func=cmd_measure_manifest)

    p = sub.add_parser("keygen", help="create an Ed25519 key pair for signing manifests")
    p.add_argument("private", metavar="PRIVATE.pem")
    p.add_argument("public", metavar="PUBLIC.pem")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("verify", help="check every sealed file under SOURCE against its tree")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--store", metavar="DIR")
    p.add_argument("-v", "--verbose", action="store_true", help="also list intact and unsealed files")
    p.add_argument("--strict", action="store_true",
                   help="unsealed regular files are failures too (listed as UNSEALED)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("upgrade-store", help="convert a format-1 store (indexed by path) to format 2")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--store", metavar="DIR")
    p.set_defaults(func=cmd_upgrade_store)

    p = sub.add_parser("dump-metadata", help="print a mounted verity file's metadata "
                                             "(like `fsverity dump_metadata`)")
    p.add_argument("type", choices=("merkle_tree", "descriptor", "signature"))
    p.add_argument("file", metavar="FILE")
    p.add_argument("--offset", type=int)
    p.add_argument("--length", type=int)
    p.set_defaults(func=cmd_dump_metadata)

    from . import daemon
    daemon.add_commands(sub)

    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except VerityError as e:
        error(str(e))
        if isinstance(e, InvalidParameters) and args.command == "digest":
            error("failed to compute digest")
        return EXIT_ERROR
    except OSError as e:  # a missing key, manifest or store file, a full disk...
        error(f"{e.filename}: {e.strerror}" if e.filename else str(e))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
