"""Mount lifecycle: checks, trust, the view, one trio nursery, signals, clean unmount.

``mount`` returns once the mount is ready and serves in the background (like
sshfs); ``Settings.foreground`` stays in the foreground.  SIGINT, SIGTERM and
SIGHUP unmount cleanly; so do ``verityfuse umount`` and ``fusermount3 -u``.
The daemon works from "/" (it never keeps a directory busy), writes nothing
to SOURCE or the store except what a client asks for through the mount (each
write atomic), and never imports the command line (cli -> daemon only).
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import logging
import os
import resource
import signal
import stat
import sys
from typing import TYPE_CHECKING, Any, Callable, Optional, Tuple

from . import fsutil, identity, logs, mountinfo, mountopts
from .jsonout import warning
from .mount_measure import files_written, measure_mount, measure_unmount
from .mount_trust import Trust, is_oci
from .mountopts import MountError, Settings

if TYPE_CHECKING:
    from .view import View

log = logging.getLogger("verityfuse")


def set_readahead(mountpoint: str, kb: int):
    """Widen the kernel's readahead window for this mount.

    FUSE mounts start at 128 KiB; each FUSE_READ then carries 128 KiB, and the
    per-request cost dominates.  With 1 MiB the kernel sends 1 MiB reads
    (libfuse negotiates max_pages = 256), which verify in one hashing batch.
    Only root may write the bdi setting; otherwise the default stays.
    """
    if not kb:
        return
    dev = mountinfo.device(mountpoint)
    if dev is None:
        log.info("cannot find %s in /proc/self/mountinfo: keeping the kernel readahead", mountpoint)
        return
    try:
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(f"{kb}\n")
    except OSError as e:
        log.info("cannot set readahead to %d KiB (%s): keeping the kernel default", kb, e.strerror)


async def _on_signals(*, task_status):
    """SIGINT, SIGTERM and SIGHUP unmount; started (``nursery.start``) once they are ours."""
    import pyfuse3
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
        task_status.started()
        async for signum in sigs:
            log.info("%s received: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


# Set by VerifiedMount (testing.py), whose daemon's stdin is a pipe that only the test
# process holds: its EOF says that process is gone (killed, even by SIGKILL, which runs no
# teardown), and the mount goes with it, as on SIGTERM, instead of outliving it.
STOP_AT_STDIN_EOF = "VERITYFUSE_STOP_AT_STDIN_EOF"


async def _stop_at_stdin_eof():
    import pyfuse3
    import trio

    while True:
        await trio.lowlevel.wait_readable(0)
        if not os.read(0, 4096):
            log.info("stdin closed (the process that started this mount is gone): unmounting")
            pyfuse3.terminate()
            return


async def _serve(ops, mountpoint, readahead_kb):
    import pyfuse3
    import trio

    from . import fuse_loop

    async def readahead_after_init():
        # The kernel applies the INIT reply's max_readahead over the bdi setting: set ours
        # once that reply is written (VerityOperations.init).
        await ops.init_done.wait()
        set_readahead(mountpoint, readahead_kb)

    async with trio.open_nursery() as nursery:
        await nursery.start(_on_signals)
        # Enables outlive their ioctl callback: their tasks' home is open before any request.
        await nursery.start(ops.ioctls.run)
        nursery.start_soon(readahead_after_init)
        if os.environ.get(STOP_AT_STDIN_EOF) and stat.S_ISFIFO(os.fstat(0).st_mode):
            nursery.start_soon(_stop_at_stdin_eof)
        # What start-up made lives as long as the daemon (a 200,000-entry manifest's tree
        # is ~220,000 objects): kept out of the collector's full passes, each of which
        # would walk it all and stall every request meanwhile (~90 ms, measured).
        gc.freeze()
        if not fuse_loop.install(pyfuse3):
            log.debug("pyfuse3 does not run on trio through pyfuse3.trio: its own read lock kept")
        await pyfuse3.main()
        # Running enables stop and answer EINTR before we close (IoctlHandlers.run).
        nursery.cancel_scope.cancel()


def make_view(source: str, mountpoint: str, s: Settings, trust: Trust, stats) -> Tuple["View", Any]:
    """The view for this trust mode, and the store it reads (annotated: mypy checks that each
    view class implements the ``View`` protocol)."""
    from .store import store_of
    from .verifier import TreeBlockCache

    cache = TreeBlockCache(s.cache_size << 20) if s.cache_size else TreeBlockCache()
    if trust.remote is not None:
        from .view_oci import OciView

        m = trust.remote.manifest
        log.info("%s: manifest of %d entries, digest %s", source, len(m.tree.nodes), m.digest)
        return OciView(trust.remote, cache, stats=stats), trust.remote
    if trust.manifest is not None:
        from .view_manifest import ManifestView

        # The share is the host's: read it, never write to it, and follow no symlink
        # in it (the default store is the share's: store_of refuses one there).
        store = store_of(source, s.store, objects_only=True)
        m = trust.manifest
        log.info("manifest %s: %d entries, digest %s", s.manifest, len(m.tree.nodes), m.digest)
        return ManifestView(source, m.tree, store, cache, m.digest, stats=stats), store
    from .view_local import LocalView

    # An explicit store must exist; the default one is made by the first enable (and, as
    # it is SOURCE's own, never reached through a symlink planted there).
    store = store_of(source, s.store, objects_only=False, lazy=not s.store)
    if store.exists:
        store.cleanup_tmp()
    view = LocalView(source, store, cache, policy=s.policy, trust_certs=trust.certs,
                     require_signatures=s.require_signatures, read_only=mountopts.read_only(s),
                     remounted_ro=lambda: mountinfo.read_only(mountpoint), stats=stats,
                     noatime=any(n == "noatime" for n, _ in s.fuse))
    if not view.inodes.reopen:
        log.warning("cannot reopen files by handle (open_by_handle_at needs CAP_DAC_READ_SEARCH): "
                    "keeping one fd per inode the kernel remembers; big trees need a higher fd limit")
    try:
        identity.lasting_fsid(view.inodes.root.fd)
    except identity.NoLastingHandles as e:
        log.warning("%s: %s: its files are served unverified and fsverity enable fails "
                    "(EOPNOTSUPP); use manifest mode", source, e.strerror)
    except OSError:
        pass  # no statfs: each file's key says why, when asked
    return view, store


def serve(source: str, mountpoint: str, s: Settings, trust: Trust,
          on_ready: Optional[Callable[[], None]] = None) -> int:
    """Mount and serve until unmounted; ``on_ready()`` is called once mounted.
    ``source`` and ``mountpoint`` are absolute and resolved."""
    from . import fuseshim
    from .stats import Stats

    # First of all: the ioctl shim must be in the global scope before pyfuse3.
    shim, why_not = fuseshim.load()
    import pyfuse3
    import trio

    from .ops import VerityOperations

    os.chdir("/")  # never keep a directory busy (umount of it would fail)
    os.umask(0)    # the kernel already applied the caller's umask to every mode it sends
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if trust.manifest is not None and ("ro", None) not in s.fuse:
        # The manifest defines the tree: mount it read-only (the caller's settings stay as given).
        s = dataclasses.replace(s, fuse=[o for o in s.fuse if o[0] != "rw"] + [("ro", None)])
    if s.measure and trust.manifest is None:
        raise MountError("measure needs a manifest: a measured mount attests the manifest's "
                         "digest (local mode has none)")
    stats = Stats()
    view, store = make_view(source, mountpoint, s, trust, stats)
    ops = VerityOperations(view, threads=getattr(view, "threads", 4), stats=stats,
                           max_handles_per_uid=s.max_handles_per_uid, info={
        "source": source, "mountpoint": mountpoint, "store": store.path, "pid": os.getpid(),
        "mode": "manifest" if trust.manifest else "local",
        "policy": None if trust.manifest else s.policy,
        "manifest_digest": trust.manifest.digest if trust.manifest else None,
        "ioctl_shim": shim is not None, "settings": mountopts.daemon_settings(s)}, shim=shim)
    if shim is not None:
        shim.set_dont_mask(view.posix_acl)  # local mode creates with the caller's umask
        shim.set_noflush_ro(True)  # ops.flush has nothing to do for a read-only handle
    background = getattr(view, "max_background", None)
    background_set = bool(background and shim is not None
                          and shim.set_max_background(background))
    try:
        # A list, not the set pyfuse3's stubs name: libfuse gets them in a fixed order.
        pyfuse3.init(ops, mountpoint, mountopts.fuse_options(s, source))  # type: ignore[arg-type]
    except BaseException:
        ops.shutdown()
        store.close()
        raise
    if background and not (background_set and shim.hook_count()):
        log.warning("the kernel keeps its default of 12 reads in flight to this mount (the "
                    "ioctl shim is not active): 12 reads waiting on a stalled blob hold up "
                    "the reads of every other file")
    try:
        # Measured once the mount exists (a mount that failed must not be attested as
        # serving the manifest) and before any request is answered: requests are only
        # read in trio.run below.  A failed measurement unmounts.
        ops.tripwire = measure_mount(mountpoint, s, trust)
    except BaseException:
        pyfuse3.close(unmount=True)
        ops.shutdown()
        store.close()
        raise
    if shim is not None and shim.hook_count() < 1:
        shim, why_not = None, "the shim did not hook libfuse (was libfuse3 loaded first?)"
    if shim is None:
        log.warning("fs-verity ioctls unavailable, answering ENOTTY: %s", why_not)
        ops.info["ioctl_shim"] = False
    else:
        shim.set_handler(ops.ioctls.ioctl)
    ops.info["fast_reads"] = ops.use_fast_reads(shim)
    log.info("serving %s on %s (store %s, %s)", source, mountpoint, store.path,
             f"manifest {trust.manifest.digest}" if trust.manifest else f"policy {s.policy}")
    try:
        if on_ready is not None:  # in the try: a failure here unmounts too
            on_ready()
        trio.run(_serve, ops, mountpoint, s.readahead_kb)
    except BaseException:
        log.exception("daemon failed")
        raise
    finally:
        pyfuse3.close(unmount=True)
        try:
            # Nothing is served any more: a measured mount says so (after every violation's
            # event, which trio.run waited for).
            measure_unmount(mountpoint, ops.tripwire)
        finally:  # (a Ctrl-C meanwhile, outside trio's handling, still closes everything)
            outstanding = ops.shutdown()
            store.close()
        log.info("unmounted %s; %d inodes still had lookups", mountpoint, outstanding)
    return 0


def check(source: str, mountpoint: str, s: Settings) -> list:
    """Refuse what cannot work (MountError); return warnings worth printing."""
    checked = (("mount point", mountpoint),) if is_oci(source) else \
        (("source", source), ("mount point", mountpoint))
    for what, path in checked:
        try:
            os.statvfs(path)  # always asks the file system (a stat may be answered cached)
        except OSError as e:
            if e.errno == errno.ENOTCONN:  # a FUSE mount whose daemon died
                raise MountError(f"{what} '{path}' is a mount whose file system daemon is gone "
                                 f"({e.strerror}): unmount it first (umount -l '{path}')") from None
            # any other answer (a FUSE source without statfs, say): the stat below decides
        try:
            is_dir = stat.S_ISDIR(os.stat(path).st_mode)
        except OSError:
            is_dir = False
        if not is_dir:
            raise MountError(f"{what} '{path}' is not a directory")
    src, mnt = os.path.realpath(source), os.path.realpath(mountpoint)
    if not is_oci(source) and mnt != src and fsutil.within(mnt, src):
        # A lookup of that directory through the mount would ask this daemon
        # to open its own mount: it would wait on itself.
        raise MountError(f"mount point '{mountpoint}' is inside the source '{source}'")
    if not is_oci(source) and fsutil.within(src, mnt):
        # SOURCE's paths (its store's, made on first use) would then lead through this
        # very mount, where the store is hidden: a request it cannot answer.
        raise MountError(f"mount point '{mountpoint}' is the source '{source}' or holds it: "
                         f"mount the verified view somewhere else")
    if s.store and not os.path.isdir(s.store):
        if os.path.lexists(s.store):
            raise MountError(f"store '{s.store}' is not a directory")
        raise MountError(f"store '{s.store}' does not exist (a typo? without store= the store is "
                         f"SOURCE/.verityfuse)")
    for what, path in files_written(s):
        if fsutil.within(os.path.realpath(path), mnt):
            # Written by the daemon while it mounts and serves: through its own mount, a
            # request it cannot answer (it would wait on itself).
            raise MountError(f"{what} '{path}' is under the mount point '{mountpoint}'")
    warnings = []
    if mountinfo.is_mounted(mnt):
        if mountinfo.fstype(mnt) == "fuse.verityfuse" and mountinfo.source(mnt) in (src, source):
            # `mount MNT` again (fstab): a second daemon stacked on the first.
            raise MountError(f"'{source}' is already mounted on '{mountpoint}'")
        warnings.append(f"'{mountpoint}' is already a mount point ({mountinfo.fstype(mnt)}); "
                        f"mounting over it")
    return warnings


def mount(source: str, mountpoint: str, s: Settings, err=sys.stderr, verbose: bool = False) -> int:
    """Check, load the trust, mount; in the background unless ``s.foreground``.
    Raises MountError before anything is mounted.  Says nothing on success (as
    mount(8) helpers and kernel filesystems), except where the logs go when that is
    not where the documentation says they go, or when ``verbose``."""
    s = mountopts.absolute_paths(s)
    for w in check(source, mountpoint, s):
        warning(w, err)  # escaped: it names SOURCE and the mount point
    try:
        trust = Trust(s, source)  # a bad manifest, key or cert: refuse before mounting
    except Exception as e:  # VerityError or OSError, with a message for the user
        raise MountError(f"refusing to mount: {mountopts.reason(e)}") from None
    src = source if is_oci(source) else os.path.realpath(source)
    mnt = os.path.realpath(mountpoint)
    if s.foreground:
        logs.setup(s.debug, s.log_file, mountpoint=mnt)
        try:
            return serve(src, mnt, s, trust)
        except Exception as e:
            mountopts.refuse(source, mountpoint, mountopts.reason(e))
    return _background(src, mnt, s, trust, err, verbose)


def _log_file_of(where: str) -> Optional[str]:
    """The file logs.setup's ``where`` names ("file PATH (why)"), or None."""
    return where.removeprefix("file ").split(" (", 1)[0] if where.startswith("file ") else None


def _obvious_log_place(where: str, s: Settings, mnt: str) -> bool:
    """The places --log-file's help names: the file given, syslog, the journal, or
    the documented fallback file; anything else (a fallback of a fallback) is said."""
    if where.startswith(("syslog", "the journal")):
        return True
    path = _log_file_of(where)
    return path is not None and path in (s.log_file, logs.fallback_log_file(mnt))


def _background(src: str, mnt: str, s: Settings, trust: Trust, err, verbose: bool = False) -> int:
    """The child mounts and reports through a pipe; the parent returns once the
    mount is usable (or says why it is not)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        os.setsid()
        code = 1
        pipe_open = [True]
        where = ""
        try:
            where = logs.setup(s.debug, s.log_file, background=True, mountpoint=mnt)
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1):
                os.dup2(devnull, fd)

            def ready():
                # A name (the log's, after the mount point's) need not be UTF-8.
                os.write(wfd, os.fsencode(f"ok logs go to {where}"))
                os.close(wfd)
                pipe_open[0] = False  # its number may be reused from here on
                if not where.startswith(("the journal", "stderr")):
                    os.dup2(devnull, 2)  # stderr stayed open for init errors only

            code = serve(src, mnt, s, trust, on_ready=ready)
        except Exception as e:
            # Before the mount was ready: tell the parent.  After it, serve()
            # has logged the failure already.
            if pipe_open[0]:
                os.write(wfd, os.fsencode(f"error {mountopts.reason(e)}"))
                fallback = None if s.log_file else _log_file_of(where)
                if fallback is not None:
                    # A fallback log this failed mount made, and never wrote to: not left
                    # behind (a bad option left an empty /var/log/verityfuse/MNT.log).
                    logs.remove_if_empty(fallback)
        finally:
            os._exit(code)
    os.close(wfd)
    msg = b""
    while True:
        chunk = os.read(rfd, 4096)
        if not chunk:
            break
        msg += chunk
    os.close(rfd)
    text = os.fsdecode(msg)
    if text.startswith("ok "):
        where = text[3:].removeprefix("logs go to ")
        if verbose or not _obvious_log_place(where, s, mnt):
            print(f"verityfuse: {logs.escape(text[3:])}", file=err)
        return 0
    os.waitpid(pid, 0)
    mountopts.refuse(src, mnt, text.removeprefix("error ") or "daemon exited")
