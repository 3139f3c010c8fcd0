"""Command line: digest, seal, verify, mount and the rest (see `verityfuse --help`).

Exit codes follow fsverity-utils: 0 success, 1 error, 2 usage error.  Errors
are printed as ``ERROR: <message>`` on stderr.  Mount commands live in
cli_mount, seal in cli_seal, verify in cli_verify; this module parses and dispatches.
"""

from __future__ import annotations

import argparse
import os
import signal
import stat
import sys
from typing import Optional

from . import __version__, merkle, treebuild
from .argtypes import (Once, _expires, _pinned_digest, _sequence, _threads, add_tree_options,
                       params_from)
from .errors import InvalidParameters, VerityError
from .jsonout import emit, error, shown

EXIT_ERROR = 1
EXIT_USAGE = 2
COMMANDS = ("digest", "seal", "verify", "upgrade-store", "measure-manifest", "keygen", "mount",
            "umount", "status", "install-helper", "uninstall-helper", "dump-metadata", "dump_metadata", "measure",
            "enable", "doctor", "attest", "push")


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
            try:  # O_NONBLOCK: a FIFO is refused below, never waited on
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                error(f"can't open '{shown(path)}' for reading: {e.strerror}")
                if args.json:
                    emit({"file": path, "error": f"can't open for reading: {e.strerror}"})
                return EXIT_ERROR
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):  # its size says nothing of it
                    raise OSError(0, "not a regular file")
                desc = treebuild.build_tree(fd, params, write_block=write_block if tree_out else None,
                                         threads=args.threads)
            except OSError as e:
                error(f"error reading '{shown(path)}': {e.strerror or e}")
                if args.json:
                    emit({"file": path, "error": f"error reading: {e.strerror or e}"})
                return EXIT_ERROR
            finally:
                os.close(fd)
            if desc_out:
                desc_out.write(desc.raw)
            if args.json:
                emit({"file": path, "digest": merkle.format_digest(params.alg, desc.digest),
                      "hash_algorithm": params.alg.name, "block_size": params.block_size,
                      "salt": params.salt.hex(), "size": desc.data_size})
            elif args.for_builtin_sig:
                print(f"{merkle.formatted_digest(params.alg, desc.digest).hex()} {shown(path)}")
            elif args.compact:
                print(desc.digest.hex())
            else:
                print(f"{merkle.format_digest(params.alg, desc.digest)} {shown(path)}")
    finally:
        for f in (tree_out, desc_out):
            if f:
                f.close()
    return 0


# -- seal, manifests ------------------------------------------------------

def cmd_seal(args) -> int:
    from . import cli_seal

    params = params_from(args)
    if params.block_size > merkle.MAX_BLOCK_SIZE:  # every reader refuses such a tree
        error(f"--block-size {params.block_size}: a store keeps Merkle trees of blocks of at "
              f"most {merkle.MAX_BLOCK_SIZE} bytes (each read hashes a tree block whole)")
        return EXIT_USAGE
    if cli_seal.no_source_dir(args):
        return EXIT_ERROR
    if args.unsigned and args.sign_key:
        error("--unsigned and --sign-key contradict each other")
        return EXIT_USAGE
    if not args.manifest and (args.unsigned or args.sequence is not None or args.expires
                              or args.local):
        error("--unsigned, --sequence, --expires and --local are for --manifest")
        return EXIT_USAGE
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
    return cli_seal.cmd_seal(args, params, key, rels)


def cmd_measure_manifest(args) -> int:
    from . import cli_seal
    return cli_seal.cmd_measure_manifest(args)


def cmd_keygen(args) -> int:
    from . import cli_seal
    return cli_seal.cmd_keygen(args)


def cmd_doctor(args) -> int:
    from . import doctor
    return doctor.run(json_out=getattr(args, "json", False))


# -- entry point ----------------------------------------------------------

DESCRIPTION = ("fs-verity in userspace: build and check fs-verity Merkle trees and signed "
               "manifests, and mount a directory as a view where every read is verified")

def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The whole parser, or (``command``) one with only the group that has it.

    One group is what a run needs: `verityfuse digest` then imports none of the
    mount, attest or OCI modules, which was ~20 ms of its ~70 ms start-up
    (bench `build`, `python -X importtime`).  The docs are generated from the
    whole parser, so both must give a command the same options.
    """
    parser = argparse.ArgumentParser(prog="verityfuse", description=DESCRIPTION,
                                     epilog=EXIT_STATUS_TEXT,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-V", "--version", action="store_true",
                        help="print the version (with -v: what this machine supports, as doctor)")
    parser.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command")
    for names, add in _GROUPS:
        if command is None or command in names:
            add(sub)
    for name, p in sub.choices.items():
        _exit_status_epilog(name, p)
    return parser


def _add_tree_commands(sub):
    p = sub.add_parser("digest", help="compute fs-verity digests (like `fsverity digest`)")
    p.add_argument("files", nargs="+", metavar="FILE")
    add_tree_options(p)
    p.add_argument("--out-merkle-tree", action=Once, metavar="FILE")
    p.add_argument("--out-descriptor", action=Once, metavar="FILE")
    p.add_argument("--compact", action="store_true", help="print the digest only")
    p.add_argument("--for-builtin-sig", action="store_true",
                   help="print the fsverity_formatted_digest, in hex")
    p.add_argument("--json", action="store_true", help="one JSON object per file")
    p.set_defaults(func=cmd_digest)

    p = sub.add_parser("seal", help="enable verity offline: build trees into the store")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="files or directories to seal, inside SOURCE (default: all of SOURCE)")
    p.add_argument("--store", metavar="DIR", help="store directory (default SOURCE/.verityfuse)")
    p.add_argument("--manifest", metavar="M", help="seal for manifest mode and write a manifest "
                   "of the files (no index entry for local mode: --local); its sequence is one "
                   "above M's (1 for a new M)")
    p.add_argument("--sign-key", metavar="KEY.pem", help="Ed25519 private key to sign the manifest")
    p.add_argument("--unsigned", action="store_true",
                   help="write an unsigned manifest even where M is signed (refused otherwise)")
    p.add_argument("--sequence", type=_sequence, metavar="N",
                   help="the manifest's sequence, above M's (default: M's + 1)")
    p.add_argument("--expires", type=_expires, metavar="WHEN",
                   help="the manifest is refused from WHEN on: a duration (90m, 12h, 30d, 2w), "
                        "a UTC time YYYY-MM-DDTHH:MM:SSZ, or never (needed to drop M's expiry)")
    p.add_argument("--local", action="store_true",
                   help="with --manifest, also seal each file for local mode on this machine "
                        "(index its inode, as seal without --manifest does; without --local, "
                        "index entries an earlier seal wrote are left as they were)")
    p.add_argument("--json", action="store_true", help="one JSON object per file (and manifest)")
    add_tree_options(p, threads_help="worker processes sealing files at once, and hashing "
                     "threads of a file over 1 MiB (default: one per CPU, at most 4; 1: no "
                     "worker process)")
    p.set_defaults(func=cmd_seal)

    p = sub.add_parser("measure-manifest", help="print a manifest's digest (the value to pin)")
    p.add_argument("manifest", metavar="M")
    p.add_argument("--trust-key", action="append", metavar="PUB.pem",
                   help="also check that M is signed by this key (repeatable: any one), "
                        "as a mount would, without mounting")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_measure_manifest)

    p = sub.add_parser("keygen", help="create an Ed25519 key pair for signing manifests")
    p.add_argument("private", metavar="PRIVATE.pem")
    p.add_argument("public", metavar="PUBLIC.pem")
    p.set_defaults(func=cmd_keygen)


def _add_store_commands(sub):
    from . import cli_seal, cli_verify

    p = sub.add_parser("verify", help="check every sealed file under SOURCE against its tree")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--store", metavar="DIR")
    p.add_argument("-v", "--verbose", action="store_true", help="also list intact and unsealed files")
    p.add_argument("--strict", action="store_true",
                   help="unsealed regular files are failures too (listed as UNSEALED)")
    p.add_argument("--json", action="store_true", help="one JSON object per file, then a summary")
    p.add_argument("--threads", type=_threads, default=None, metavar="N",
                   help="worker processes verifying files (or manifest entries) at once "
                        "(default: one per CPU, at most 4; 1: no worker process)")
    p.add_argument("--manifest", metavar="M", help="check SOURCE against this manifest instead: "
                   "every listed entry's type, metadata and content, and what it does not list "
                   "(the host's CI gate before shipping a share)")
    p.add_argument("--trust-key", action="append", metavar="PUB.pem",
                   help="with --manifest: the key it must be signed with (repeatable)")
    p.add_argument("--manifest-digest", metavar="sha256:HEX|@FILE", type=_pinned_digest,
                   help="with --manifest: its pinned digest (or @FILE holding it)")
    p.set_defaults(func=cli_verify.cmd_verify)

    p = sub.add_parser("upgrade-store", help="convert a store of format 1 (indexed by path) or 2 to format 3")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--store", metavar="DIR")
    p.set_defaults(func=cli_seal.cmd_upgrade_store)


def _add_doctor(sub):
    p = sub.add_parser("doctor", help="what this machine supports: native hashing, the ioctl "
                                      "shim, libfuse, fs-verity ioctls through FUSE")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_doctor)


def _add_fsverity(sub):
    from . import cli_fsverity
    cli_fsverity.add_commands(sub)


def _add_mount(sub):
    from . import cli_mount
    cli_mount.add_commands(sub)


def _add_attest(sub):
    from . import cli_attest
    cli_attest.add_commands(sub)


def _add_oci(sub):
    from . import cli_oci
    cli_oci.add_commands(sub)


# Every command's group, in the order --help and the docs list them.
_GROUPS = (
    (("digest", "seal", "measure-manifest", "keygen"), _add_tree_commands),
    (("verify", "upgrade-store"), _add_store_commands),
    (("dump-metadata", "dump_metadata", "measure", "enable"), _add_fsverity),
    (("doctor",), _add_doctor),
    (("mount", "umount", "status", "install-helper", "uninstall-helper"), _add_mount),
    (("attest",), _add_attest),
    (("push",), _add_oci),
)


# What each command's exit status means, for --help and the man page (one place, so
# the two never disagree).  A command not listed here has the common meaning.
EXIT_STATUS_TEXT = ("exit status: 0 success, 1 an error (said on stderr as ERROR: ...), "
                    "2 a usage error (bad arguments or options), 130 interrupted (Ctrl-C)")
EXIT_STATUS = {
    "seal": "0 every file sealed; 1 a file could not be sealed (each named) or another error; "
            "2 usage error; 130 interrupted by Ctrl-C; stopped by SIGTERM it ends by that "
            "signal (143 in a shell): either way once its workers are stopped and what it "
            "staged and never printed is removed (a second SIGTERM ends it at once)",
    "verify": "0 every sealed file is intact; 1 a file is corrupt or unreadable, nothing was "
              "sealed, or (with --strict) a file is unsealed; 2 usage error",
    "mount": "0 mounted (in the background: once the mount answers); 1 the mount failed; "
             "2 a bad option",
    "measure": "0 every FILE was measured; 1 one or more were not (each named on stderr); "
               "2 usage error",
    "status": "0 printed; 1 MOUNTPOINT is not a running verityfuse mount; 2 usage error",
    "umount": "0 unmounted (and its daemon exited, or a warning says why not); 1 not a "
              "verityfuse mount, or the unmount failed (it says why); 2 usage error",
}


def _exit_status_epilog(name: str, p: argparse.ArgumentParser):
    if p.epilog is None:
        codes = EXIT_STATUS.get(name)
        p.epilog = f"exit status: {codes}" if codes else EXIT_STATUS_TEXT


def main(argv=None) -> int:
    """The command line (``argv``: the arguments, default sys.argv's).  As the program
    (no ``argv``), a seal stopped by SIGTERM ends by that signal once it has cleaned up."""
    program = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) >= 2 and not argv[0].startswith("-") and argv[0] not in COMMANDS and (
            "/" in argv[0] or os.path.exists(argv[0]) or any(a.startswith("-o") for a in argv)):
        # mount.fuse3's convention: verityfuse SOURCE MOUNTPOINT -o OPTIONS (not a mistyped
        # command: `verityfuse staus MNT` is argparse's "invalid choice")
        from .cli_mount import helper_main
        return helper_main(argv)
    if sys.stdout is None:  # started with stdout closed: output goes nowhere, as print's
        sys.stdout = open(os.devnull, "w")
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.version:
        args.func = _version  # behind _run's error boundary, as every command
        return _run(args)
    if args.command is None:
        parser.print_usage(sys.stderr)
        error("a command is needed (see verityfuse --help)")
        return EXIT_USAGE
    pool = sys.modules.get("verityfuse.seal_pool")
    if pool is not None:
        setattr(pool, "workers_killed", False)  # this command's workers, not an earlier caller's
    rc = _run(args)
    pool = sys.modules.get("verityfuse.seal_pool")
    if rc == EXIT_TERMINATED and program:
        # Ended by the signal, as without the handler: a service manager takes that for a
        # clean stop (an exit status of 143 for a failure); a shell still shows 143.
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    if pool is not None and pool.workers_killed:  # Ctrl-C twice: out now (seal_pool)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _version(args) -> int:
    """``-V``: the version; with ``-v``, what the doctor command says too."""
    print(f"verityfuse {__version__}")
    return cmd_doctor(args) if args.verbose else 0


# The commands that unwind on SIGTERM as on Ctrl-C, because what they leave half done is
# theirs to undo (seal: its workers, the tmp/ files it staged).  Every other command keeps
# SIGTERM's default action: a handler makes the signal non-fatal, and a process waiting on
# a hung FUSE (or hard NFS) mount is woken only by a fatal one.
UNWIND_ON_SIGTERM = ("seal",)
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager's stop, `timeout`, `kill`), raised where the command is
    and unwound as a Ctrl-C is: seal's workers stop and what it staged and never reported
    is removed, where the default action would have left its tmp/ files to the next seal."""


def _terminated(signum, frame):
    # A second SIGTERM (the command stuck on a hung file system, or its cleanup too slow
    # for the sender) ends it at once, as SIGTERM did before: its tmp/ files are then the
    # next seal's to remove.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


def _run(args) -> int:
    # Only over the default action: a SIGTERM the caller ignores (or handles itself)
    # stays so.  Not from a thread other than the main one (main() called by a program
    # of its own), where no handler can be set.
    installed = False
    if args.command in UNWIND_ON_SIGTERM:
        try:
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _terminated)
                installed = True
        except ValueError:
            pass
    try:
        return _run_command(args)
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_command(args) -> int:
    try:
        return args.func(args)
    except VerityError as e:
        error(str(e))
        if isinstance(e, InvalidParameters) and args.command == "digest":
            error("failed to compute digest")
        return EXIT_ERROR
    except OSError as e:  # a missing key, manifest or store file, a full disk...
        error(f"{e.filename}: {e.strerror}" if e.filename else e.strerror or str(e))
        return EXIT_ERROR
    except KeyboardInterrupt as e:
        return EXIT_TERMINATED if isinstance(e, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
