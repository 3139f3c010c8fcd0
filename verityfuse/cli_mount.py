"""Command line for mounts: mount, umount, status, doctor, and the mount(8) helper.

Three ways to mount, one code path (``mountopts.Settings`` -> ``daemon.mount``):

    verityfuse mount SOURCE MNT [--store DIR] [--policy P] [-o OPTS] ...   # the CLI
    verityfuse SOURCE MNT -o OPTS                                          # mount.fuse3's convention
    mount.fuse.verityfuse SOURCE MNT [-o OPTS] [-n] [-s] [-f] [-v]         # what mount(8) runs
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from . import mountopts
from .mountopts import OptionError, Settings

from .argtypes import _pinned_digest
from .helper_link import DEFAULT_DIR, HELPER_NAME
from .jsonout import error


def _positive(name):
    def conv(text):
        try:
            return mountopts.positive_int(text, name)
        except OptionError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return conv


def _option(check):
    def conv(text):
        try:
            return check(text)
        except OptionError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return conv


def _non_negative(text):
    try:
        return mountopts.readahead_kb(text, "readahead-kb")
    except OptionError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _min_sequence(text):
    try:
        return mountopts.non_negative_int(text, "min-sequence")
    except OptionError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def settings_from(args) -> Settings:
    """The CLI flags, then the -o groups (a later value wins)."""
    s = Settings(store=args.store, policy=args.policy, manifest=args.manifest,
                 trust_key=list(args.trust_key or ()), manifest_digest=args.manifest_digest,
                 trust_cert=list(args.trust_cert or ()), require_signatures=args.require_signatures,
                 cache_size=args.cache_size, readahead_kb=args.readahead_kb, log_file=args.log_file,
                 measure=args.measure, event_log=args.event_log, on_corruption=args.on_corruption,
                 debug=args.debug, foreground=args.foreground, min_sequence=args.min_sequence,
                 plain_http=args.plain_http, registry_ca=args.registry_ca,
                 registry_auth=args.registry_auth, registry_timeout=args.registry_timeout,
                 cache_dir=args.cache,
                 max_handles_per_uid=args.max_handles_per_uid)
    # A flag given is a setting given, as one in -o is: a remount compares both with the
    # running mount's (a remount's --require-signatures changed nothing and exited 0).
    default = Settings()
    s.given = [n for n in (*mountopts.VALUED, *mountopts.REPEATED, *mountopts.FLAGS)
               if getattr(s, mountopts.attr_of(n)) != getattr(default, mountopts.attr_of(n))]
    return mountopts.parse(args.o or [], s)


def run_mount(source: str, mountpoint: str, s: Settings, failure: int = 1,
              verbose: bool = False, usage: int = 2) -> int:
    """``failure``, ``usage``: the exit codes of a failed mount and of an option libfuse
    refused (verityfuse's own are checked before)."""
    from .daemon import mount
    from .mount_control import remount
    from .mountopts import MountError

    try:
        if s.remount:
            return remount(os.path.realpath(mountpoint), s, source)
        return mount(source, mountpoint, s, verbose=verbose)
    except MountError as e:
        error(str(e))
        return failure
    except OptionError as e:
        error(str(e))
        return usage


def cmd_mount(args) -> int:
    try:
        s = settings_from(args)
    except OptionError as e:
        error(f"mount option {e}")
        return 2
    return run_mount(args.source, args.mountpoint, s, verbose=args.verbose)


def cmd_umount(args) -> int:
    from .mount_control import umount
    return umount(args.mountpoint)


def cmd_status(args) -> int:
    from . import jsonout
    from .stats import escape_name as esc, human_bytes, human_duration

    try:
        raw = os.getxattr(args.mountpoint, "user.verityfuse.status")
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES):  # the status is its owner's and root's
            error(f"the status of '{args.mountpoint}' is for root and the user who mounted it "
                  f"({e.strerror}; without allow_other only that user reaches the mount)")
        else:
            error(f"'{args.mountpoint}' is not a running verityfuse mount ({e.strerror})")
        return 1
    st = json.loads(raw)
    if args.json:
        jsonout.emit(st)
        return 0
    # .get: a daemon of an older version may still be running (the JSON may only grow)
    cache, failures, dropped = st["tree_cache"], st.get("failures", []), st.get(
        "failure_groups_dropped", 0)
    rows = [
        ("mount", f"{esc(st['source'])} on {esc(st['mountpoint'])} (pid {st['pid']}, "
                  f"verityfuse {st['version']})"),
        ("mode", st["mode"] + (f", manifest {st['manifest_digest']}" if st["manifest_digest"]
                               else f", policy {st['policy']}")),
        ("store", esc(st["store"])),
        ("ioctl shim", "active" if st["ioctl_shim"] else "inactive (fs-verity ioctls answer ENOTTY)"),
        ("uptime", human_duration(st["uptime_s"])),
        ("open files", st["open_files"]),
        ("verified", f"{st['blocks_verified']} blocks in {st['verified_reads']} reads, "
                     f"{human_bytes(st['bytes_served'])} served"),
        ("integrity failures", f"{st['integrity_failures']}" + (
            f" ({len(failures) + dropped} distinct blocks)" if failures else "")),
        ("tree-block cache", f"{cache['hits']} hits, {cache['misses']} misses, {cache['blocks']} "
                             f"blocks, {human_bytes(cache['bytes'])} of "
                             f"{human_bytes(cache['max_bytes'])}"),
    ]
    reg = st.get("registry")
    if reg:  # an oci:// mount
        calls = ", ".join(f"{n} {m}" for m, n in sorted(reg["requests"].items()))
        dc = reg["data_cache"]
        rows += [("registry", f"{esc(reg['source'])}: {reg['bytes_fetched']} bytes fetched "
                              f"({calls or 'no requests'})"),
                 ("data cache", f"{dc['hits']} hits, {dc['misses']} misses, {dc['blocks']} blocks, "
                                f"{human_bytes(dc['bytes'])} of {human_bytes(dc['max_bytes'])}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for f in failures:
        when = (f"at {_clock(f['first'])}" if f["count"] == 1 else
                f"{f['count']} times, first {_clock(f['first'])}, last {_clock(f['last'])}")
        print(f"  failure: {esc(f['message'])} ({when})")
    if dropped:
        print(f"  ... and {dropped} more failing blocks, seen longest ago")
    return 0


def _clock(t: float) -> str:
    import time
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _helper_command(action, args) -> int:
    from . import helper_link
    try:
        lines = action(args.dir, force=args.force)
    except (helper_link.HelperError, OSError) as e:
        error(str(e))
        return 1
    print("\n".join(lines))
    return 0


def cmd_install_helper(args) -> int:
    """Link DIR/mount.fuse.verityfuse to this installation's helper (for mount(8), fstab)."""
    from . import helper_link
    return _helper_command(helper_link.install, args)


def cmd_uninstall_helper(args) -> int:
    from . import helper_link
    return _helper_command(helper_link.uninstall, args)


def add_commands(sub):
    p = sub.add_parser("mount", help="mount a verified view of SOURCE on MOUNTPOINT")
    p.add_argument("source", metavar="SOURCE", help="a directory, or oci://HOST[:PORT]/REPO"
                   "[:TAG|@DIGEST] (a tree pushed with `verityfuse push`, served lazily)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--store", metavar="DIR", help="store directory (must exist; default "
                   "SOURCE/.verityfuse, made by the first enable)")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground (not in fstab or a systemd unit: mount(8) would "
                        "wait for it to end)")
    p.add_argument("-o", action="append", metavar="OPTIONS",
                   help="mount options, comma-separated: ro, allow_other, ... and every setting "
                        "below as name=value (store=, policy=, manifest=, trust_key=, ...)")
    p.add_argument("--policy", choices=("enforce", "require"), default="enforce",
                   help="enforce: verify verity files, pass others through (default); "
                        "require: refuse to open regular files without verity")
    p.add_argument("--manifest", metavar="M", help="signed manifest: the tree this mount serves")
    p.add_argument("--trust-key", action="append", metavar="PUB.pem",
                   help="Ed25519 public key the manifest must be signed with (repeatable)")
    p.add_argument("--manifest-digest", metavar="sha256:HEX|@FILE", type=_pinned_digest,
                   help="the manifest's digest, pinned (see measure-manifest), or @FILE that "
                        "holds it")
    p.add_argument("--min-sequence", type=_min_sequence, default=0, metavar="N",
                   help="refuse a manifest whose sequence is below N (an older manifest the key "
                        "once signed: a rollback); an expired manifest is always refused")
    p.add_argument("--trust-cert", action="append", metavar="CERT.pem",
                   help="X.509 certificate trusted for fs-verity built-in signatures (repeatable)")
    p.add_argument("--require-signatures", action="store_true",
                   help="like fs.verity.require_signatures=1: unsigned verity files are refused")
    p.add_argument("--cache-size", type=_positive("cache-size"), metavar="MIB",
                   help="memory for verified Merkle tree blocks (default 32 MiB); for oci:// "
                        "sources also the verified data blocks kept (default 64 MiB, in "
                        "memory or in --cache DIR) and a quarter of it for tree objects")
    p.add_argument("--readahead-kb", type=_non_negative, default=1024, metavar="KIB",
                   help="kernel readahead window of the mount (default 1024; 0 keeps 128)")
    p.add_argument("--log-file", metavar="FILE", help="log here (default: stderr in the "
                   "foreground; else syslog, the journal, or /var/log/verityfuse/MNT.log)")
    p.add_argument("--measure", metavar="REGISTER", type=_option(mountopts._measure),
                   help="measured mount (manifest mode): before serving, extend a MountManifest "
                        "event into REGISTER: tpm[:PCR] (default PCR 23, /dev/tpmrm0), rtmr[:N] "
                        "(Intel TDX, default 3) or file:[sha256|sha384:]PATH; a failed extend "
                        "fails the mount. Integrity violations are extended too")
    p.add_argument("--event-log", metavar="FILE", help="the event log a verifier replays "
                   "(default /run/verityfuse/events-<register>.log)")
    p.add_argument("--on-corruption", choices=("eio", "refuse"), default="eio",
                   help="eio: fail the damaged blocks (default); refuse: after the first "
                        "integrity violation every open fails with EIO")
    p.add_argument("--max-handles-per-uid", type=_positive("max-handles-per-uid"), metavar="N",
                   help="open files and directories one user may hold on the mount; more are "
                        "refused with EMFILE (default: an eighth of the daemon's fd limit)")
    p.add_argument("--debug", action="store_true", help="log every request (all reads then go through Python: slower)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="say where the logs go (said anyway when it is not the documented place)")
    from .cli_oci import add_registry_options
    add_registry_options(p)  # SOURCE oci://HOST[:PORT]/REPO[:TAG|@DIGEST]
    p.add_argument("--registry-timeout", default=10,
                   type=_option(lambda t: mountopts.registry_timeout(t, "registry-timeout")),
                   metavar="S", help="oci:// sources: the registry's connect and read "
                   "timeout; a whole answer may take 3 times this (more for a large body), "
                   "then the reads waiting on it fail with EIO (default 10)")
    p.add_argument("--cache", metavar="DIR", help="oci:// sources: keep verified data blocks "
                   "in a private directory under DIR (removed at unmount), within --cache-size, "
                   "instead of in memory")
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", help="unmount a verityfuse mount")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("status", help="a running mount's state and counters")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("install-helper", help=f"link DIR/{HELPER_NAME} to this installation's "
                       f"helper, for mount(8), fstab, systemd")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"where mount(8) looks (default {DEFAULT_DIR})")
    p.add_argument("--force", action="store_true", help="also replace a file that is not a link")
    p.set_defaults(func=cmd_install_helper)

    p = sub.add_parser("uninstall-helper", help=f"remove DIR/{HELPER_NAME} if it is this "
                       f"installation's link")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"where it was installed (default {DEFAULT_DIR})")
    p.add_argument("--force", action="store_true", help="remove another installation's link too")
    p.set_defaults(func=cmd_uninstall_helper)


# -- mount(8) ------------------------------------------------------------------------

# mount(8)'s exit status for helpers: 1 incorrect invocation or permissions, 32 mount failure.
HELPER_USAGE = 1
HELPER_MOUNT_FAILURE = 32


class _HelperParser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(HELPER_USAGE, f"{self.prog}: error: {message}\n")


def helper_parser() -> argparse.ArgumentParser:
    p = _HelperParser(
        prog=HELPER_NAME, description="mount a verified view of SOURCE on MOUNTPOINT, as "
        "mount(8) and fstab do (type fuse.verityfuse); every setting of `verityfuse mount` "
        "is an -o option", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"exit status (mount(8)'s convention for helpers): 0 mounted, {HELPER_USAGE} "
               f"incorrect invocation (a bad option or argument), {HELPER_MOUNT_FAILURE} the "
               f"mount failed")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-o", action="append", default=[], metavar="OPTIONS",
                   help="comma-separated: the kernel's (ro, noatime, allow_other, ...) and "
                        "verityfuse's (store=, policy=, manifest=, trust_key=, ...)")
    p.add_argument("-t", dest="type", metavar="TYPE", help="fuse.verityfuse (ignored)")
    p.add_argument("-N", dest="namespace", metavar="NS",
                   help="a mount namespace (not supported: refused)")
    for flag, what in (("-s", "sloppy: accepted"), ("-f", "fake: check the options, mount nothing"),
                       ("-n", "no mtab: accepted"), ("-v", "verbose: say where the logs go")):
        p.add_argument(flag, action="store_true", help=what)
    return p


def helper_main(argv=None) -> int:
    """``mount.fuse.verityfuse SOURCE MNT [-sfnv] [-N NS] [-o OPTS] [-t TYPE]``, as mount(8)
    calls a helper: -f fakes (does nothing), -n, -s, -v are accepted."""
    args = helper_parser().parse_args(argv)
    if args.namespace:
        error("mount namespaces (-N) are not supported")
        return HELPER_USAGE
    try:
        s = mountopts.parse(args.o)
    except OptionError as e:
        error(f"mount option {e}")
        return HELPER_USAGE
    if args.f:
        return 0
    return run_mount(args.source, args.mountpoint, s, failure=HELPER_MOUNT_FAILURE, verbose=args.v,
                     usage=HELPER_USAGE)
