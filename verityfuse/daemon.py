"""Mount lifecycle: init, one trio nursery, signals, clean unmount.

``verityfuse mount`` returns once the mount is ready and serves in the
background (like sshfs); ``-f`` stays in the foreground.  SIGINT, SIGTERM and
SIGHUP unmount cleanly; so does ``verityfuse umount`` / ``fusermount3 -u``.
The daemon writes nothing to SOURCE or the store except what a client asks
for through the mount, each write atomic: killing it damages nothing.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import resource
import signal
import subprocess
import sys

log = logging.getLogger("verityfuse")

# Options we always pass; -o adds to them.
BASE_OPTIONS = ("default_permissions", "subtype=verityfuse")


def setup_logging(debug: bool, log_file=None, background=False):
    level = logging.DEBUG if debug else logging.INFO
    fmt = "%(asctime)s verityfuse[%(process)d] %(levelname)s: %(message)s"
    if log_file:
        handler = logging.FileHandler(log_file)
    elif background:
        if os.path.exists("/dev/log"):
            handler = logging.handlers.SysLogHandler("/dev/log")
            fmt = "verityfuse[%(process)d]: %(levelname)s: %(message)s"
        else:
            handler = logging.NullHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def fuse_options(extra) -> set:
    opts = set(BASE_OPTIONS)
    for group in extra or ():
        opts.update(o for o in group.split(",") if o)
    return opts


def _mountinfo(mountpoint: str):
    """The fields of the topmost mount at ``mountpoint`` in /proc/self/mountinfo, or None.

    Never stat() our own mount point here: before the FUSE loop runs, the
    kernel would wait for a GETATTR answer that this thread has to give.
    """
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            # mountinfo escapes space, tab, newline and backslash as \ooo octal
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
            if point == os.fsencode(mountpoint):
                found = fields  # the last (topmost) mount wins
    return found


def mount_device(mountpoint: str):
    """"major:minor" of the filesystem mounted at ``mountpoint``."""
    fields = _mountinfo(mountpoint)
    return fields[2].decode() if fields else None


def mount_read_only(mountpoint: str) -> bool:
    """Whether the mount is read-only now (``mount -o remount,ro`` included): per-mount
    options, then the superblock's after the " - " separator."""
    fields = _mountinfo(mountpoint)
    if fields is None:
        return False
    sep = fields.index(b"-")
    return b"ro" in fields[5].split(b",") or b"ro" in fields[sep + 3].split(b",")


def set_readahead(mountpoint: str, kb: int):
    """Widen the kernel's readahead window for this mount.

    FUSE mounts start at 128 KiB; each FUSE_READ then carries 128 KiB, and the
    per-request cost dominates.  With 1 MiB the kernel sends 1 MiB reads
    (libfuse negotiates max_pages = 256), which verify in one hashing batch.
    Only root may write the bdi setting; otherwise the default stays.
    """
    if not kb:
        return
    dev = mount_device(mountpoint)
    if dev is None:
        log.info("cannot find %s in /proc/self/mountinfo: keeping the kernel readahead", mountpoint)
        return
    path = f"/sys/class/bdi/{dev}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(f"{kb}\n")
    except OSError as e:
        log.info("cannot set readahead to %d KiB (%s): keeping the kernel default", kb, e.strerror)


async def _serve(ops, mountpoint, readahead_kb):
    import pyfuse3
    import trio

    async with trio.open_nursery() as nursery:
        ops.nursery = nursery

        async def after_init():
            # The kernel applies the INIT reply's max_readahead over the bdi
            # setting; libfuse writes that reply right after ops.init()
            # returns, on this thread, so once init ran it is done.
            while not ops.initialized:
                await trio.sleep(0.01)
            set_readahead(mountpoint, readahead_kb)

        async def on_signals():
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
                async for signum in sigs:
                    log.info("%s received: unmounting", signal.Signals(signum).name)
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signals)
        nursery.start_soon(after_init)
        await pyfuse3.main()
        # Running enables see this, stop, and answer EINTR before we close.
        ops.stopping = True
        nursery.cancel_scope.cancel()


class Trust:
    """Where trusted digests and signatures come from, loaded before mounting."""

    def __init__(self, args):
        from . import manifest, signature
        from .errors import ManifestError

        self.manifest = None
        if args.manifest:
            if args.trust_cert or args.require_signatures:
                raise ManifestError("--trust-cert and --require-signatures are for local mode; "
                                    "with --manifest the manifest's signature is the trust")
            keys = [manifest.load_public_key(k) for k in args.trust_key or ()]
            self.manifest = manifest.load(args.manifest, keys, args.manifest_digest)
        elif args.trust_key or args.manifest_digest:
            raise ManifestError("--trust-key and --manifest-digest need --manifest")
        self.certs = signature.load_certificates(args.trust_cert or ())


def make_view(args, trust: "Trust", options):
    """The view for this trust mode, and the store it reads."""
    from .store import Store, default_store
    from .verify import TreeBlockCache

    cache = TreeBlockCache(args.cache_size << 20) if args.cache_size else TreeBlockCache()
    store_path = args.store or default_store(args.source)
    if trust.manifest is not None:
        from .view_manifest import ManifestView

        # The share is the host's: read it, never write to it.
        store = Store(store_path, create=False, objects_only=True)
        m = trust.manifest
        log.info("manifest %s: %d entries, digest %s", args.manifest, len(m.tree.nodes), m.digest)
        return ManifestView(args.source, m.tree, store, cache, m.digest), store
    from .view_local import LocalView

    store = Store(store_path, create=True)
    store.cleanup_tmp()
    mountpoint = os.path.realpath(args.mountpoint)
    view = LocalView(args.source, store, cache, policy=args.policy, trust_certs=trust.certs,
                     require_signatures=args.require_signatures, read_only="ro" in options,
                     remounted_ro=lambda: mount_read_only(mountpoint))
    if not view.inodes.reopen:
        log.warning("cannot reopen files by handle (open_by_handle_at needs CAP_DAC_READ_SEARCH): "
                    "keeping one fd per inode the kernel remembers; big trees need a higher fd limit")
    return view, store


def serve(args, trust: "Trust", on_ready=None) -> int:
    """Mount and serve until unmounted; ``on_ready()`` is called once mounted."""
    from . import fuseshim

    # First of all: the ioctl shim must be in the global scope before pyfuse3.
    shim, why_not = fuseshim.load()
    import pyfuse3
    import trio

    from .ops import VerityOperations

    # The kernel already applied the caller's umask to every mode it sends.
    os.umask(0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    options = fuse_options(args.o) | {f"fsname={os.path.realpath(args.source)}"}
    if trust.manifest is not None:
        options.add("ro")  # the manifest defines the tree
    view, store = make_view(args, trust, options)
    ops = VerityOperations(view)
    if shim is not None:
        shim.set_dont_mask(view.posix_acl)  # local mode creates with the caller's umask
    # Resolved now: once mounted, touching the path would ask this very daemon.
    mountpoint = os.path.realpath(args.mountpoint)
    pyfuse3.init(ops, mountpoint, options)
    if shim is not None and shim.hook_count() < 1:
        shim, why_not = None, "the shim did not hook libfuse (was libfuse3 loaded first?)"
    if shim is None:
        log.warning("fs-verity ioctls unavailable, answering ENOTTY: %s", why_not)
    else:
        ops.shim = shim
        shim.set_handler(ops.ioctl)
    log.info("serving %s on %s (store %s, %s)", args.source, args.mountpoint, store.path,
             f"manifest {trust.manifest.digest}" if trust.manifest else f"policy {args.policy}")
    if on_ready is not None:
        on_ready()
    try:
        trio.run(_serve, ops, mountpoint, args.readahead_kb)
    except BaseException:
        log.exception("daemon failed")
        raise
    finally:
        pyfuse3.close(unmount=True)
        outstanding = ops.shutdown()
        store.close()
        log.info("unmounted %s; %d inodes still had lookups", args.mountpoint, outstanding)
    return 0


def cmd_mount(args) -> int:
    from .cli import error
    from .errors import VerityError

    for what, path in (("source", args.source), ("mount point", args.mountpoint)):
        if not os.path.isdir(path):
            error(f"{what} '{path}' is not a directory")
            return 1
    if os.path.realpath(args.mountpoint).startswith(os.path.realpath(args.source) + "/"):
        # A lookup of that directory through the mount would ask this daemon
        # to open its own mount: it would wait on itself.
        error(f"mount point '{args.mountpoint}' is inside the source '{args.source}'")
        return 1
    try:
        trust = Trust(args)  # a bad manifest, key or cert: refuse before mounting
    except (VerityError, OSError) as e:
        error(f"refusing to mount: {e}")
        return 1
    if args.foreground:
        setup_logging(args.debug, args.log_file)
        try:
            return serve(args, trust)
        except Exception as e:
            error(f"cannot mount '{args.source}' on '{args.mountpoint}': {e}")
            return 1

    # Background: the child mounts and reports through a pipe; the parent
    # returns only once the mount is usable (or says why it is not).
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        os.setsid()
        setup_logging(args.debug, args.log_file, background=True)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):
            os.dup2(devnull, fd)
        pipe_open = [True]

        def ready():
            os.write(wfd, b"ok")
            os.close(wfd)
            pipe_open[0] = False  # its number may be reused from here on
            os.dup2(devnull, 2)  # stderr stayed open for init errors only

        code = 1
        try:
            code = serve(args, trust, on_ready=ready)
        except Exception as e:
            # Before the mount was ready: tell the parent.  After it, serve()
            # has logged the failure already.
            if pipe_open[0]:
                os.write(wfd, f"error: {e}".encode())
        finally:
            os._exit(code)
    os.close(wfd)
    msg = b""
    while True:
        chunk = os.read(rfd, 4096)
        if not chunk:
            break
        msg += chunk
        if msg == b"ok":
            break
    os.close(rfd)
    if msg == b"ok":
        return 0
    os.waitpid(pid, 0)
    error(f"cannot mount '{args.source}' on '{args.mountpoint}': "
          f"{msg.decode(errors='replace').removeprefix('error: ') or 'daemon exited'}")
    return 1


def cmd_umount(args) -> int:
    r = subprocess.run(["fusermount3", "-u", args.mountpoint])
    return 0 if r.returncode == 0 else 1


def add_commands(sub):
    p = sub.add_parser("mount", help="mount a verified view of SOURCE on MOUNTPOINT")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--store", metavar="DIR", help="store directory (default SOURCE/.verityfuse)")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-o", action="append", metavar="OPTIONS",
                   help="mount options, comma-separated (ro, allow_other, ...)")
    p.add_argument("--policy", choices=("enforce", "require"), default="enforce",
                   help="enforce: verify verity files, pass others through (default); "
                        "require: refuse to open regular files without verity")
    p.add_argument("--manifest", metavar="M", help="signed manifest: the trusted digest of every path")
    p.add_argument("--trust-key", action="append", metavar="PUB.pem",
                   help="Ed25519 public key the manifest must be signed with (repeatable)")
    p.add_argument("--manifest-digest", metavar="sha256:HEX",
                   help="the manifest's digest, pinned (see measure-manifest)")
    p.add_argument("--trust-cert", action="append", metavar="CERT.pem",
                   help="X.509 certificate trusted for fs-verity built-in signatures (repeatable)")
    p.add_argument("--require-signatures", action="store_true",
                   help="like fs.verity.require_signatures=1: unsigned verity files are refused")
    p.add_argument("--cache-size", type=int, metavar="MIB",
                   help="memory for verified Merkle tree blocks (default 32 MiB)")
    p.add_argument("--readahead-kb", type=int, default=1024, metavar="KIB",
                   help="kernel readahead window of the mount (default 1024; 0 keeps 128)")
    p.add_argument("--log-file", metavar="FILE", help="log here (default: stderr, or syslog "
                   "in the background)")
    p.add_argument("--debug", action="store_true", help="log every request")
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", help="unmount a verityfuse mount")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=cmd_umount)
