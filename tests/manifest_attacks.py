"""The attacks on a manifest-mode mount, written once.

Used by ``tests/test_manifest_attacks.py`` (ordinary mounts on this machine)
and by ``e2e/guest.py`` (a Linux guest reading a virtio-fs share that this
machine, the untrusted host, tampers with).  Not a test module itself.

The setting: SOURCE (the share) holds data, store and a signed manifest; the
reader trusts only a public key and the manifest's pinned digest.  Each
``Attack`` has

- ``prepare(ctx)``: what the reader does before the host acts (open a file,
  read it into the page cache, look it up), optional;
- ``host(source, exp)``: what the host does to SOURCE;
- ``check(ctx)``: what the reader then checks on the mount; it raises
  ``Failed`` with what it saw.  It drops caches itself where the attack needs
  it (``ctx.drop_caches``, ``echo 3 > /proc/sys/vm/drop_caches`` on whichever
  kernel runs the mount).

``exp`` is what the host computed before any attack (``expected(source)``):
per file its SHA-256, per-block SHA-256s, size, mode, owner, mtime and
fs-verity digest, and per directory its sorted entry names.  It is JSON, so
the guest gets it through a file.

The behaviour checked is the one manifest mode is being rebuilt to have
(read-only mount; names, listings and metadata from the manifest only; files
opened by walking the share without following symlinks; every byte hashing to
the manifest's digest), not necessarily today's.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

BS = 4096                  # the corpus is sealed with the default parameters
HASHES_PER_BLOCK = BS // 32  # SHA-256
TREE_OFFSET = 320           # protocol/store-format.md: header 64 + descriptor 256
ATTR_TIMEOUT = 1.2          # the daemon's attribute/entry timeout is 1 s
FIFO_TIMEOUT = 10.0

# -- the corpus ------------------------------------------------------------------

# rel path: (size, mode).  Each attack has files of its own, so that all attacks
# can run one after another on one share (the guest) as well as one per share
# (the host tests); the rest is never touched.
FILES: Dict[str, Tuple[int, int]] = {
    "bin/app.bin": (300_000, 0o755),
    "etc/config": (600, 0o644),
    "lib/libx.so": (50_000, 0o644),
    "data/big.bin": (8 * 1024 * 1024 + 1, 0o644),     # two tree levels
    "empty": (0, 0o644),
    "docs/a/b/readme.txt": (1234, 0o444),
    "readonly/victim.txt": (100, 0o644),
    "flip/data.bin": (5 * BS + 100, 0o644),
    "reseal/config": (5000, 0o644),
    "swap-open/a.bin": (3 * BS + 10, 0o644),
    "swap-open/b.bin": (3 * BS + 10, 0o644),
    "swap-cached/a.bin": (20_000, 0o644),
    "swap-cached/b.bin": (20_000, 0o644),
    "hardlink/victim.bin": (12_000, 0o644),
    "hardlink/other.bin": (12_000, 0o644),
    "rename/victim.bin": (12_000, 0o644),
    "rename/other.bin": (12_000, 0o644),
    "symlink-file/target.bin": (9000, 0o644),
    "symlink-dir/x/y/file.bin": (9000, 0o644),
    "truncate/file.bin": (40_000, 0o644),
    "added/keep.txt": (300, 0o644),
    "deleted/gone.bin": (7000, 0o644),
    "deleted/stays.bin": (700, 0o644),
    "mode/tool.sh": (3000, 0o644),
    "tree/big.bin": (3 * HASHES_PER_BLOCK * BS, 0o644),  # 1.5 MiB: three leaf tree blocks
    "tree/cold.bin": (3 * HASHES_PER_BLOCK * BS, 0o644),  # never read before its attack
    "fifo/file.bin": (5000, 0o644),
    # Files of one block have no tree, and are sealed without a store object: the daemon
    # reads them against a descriptor made from the manifest's entry and their one
    # block, used only if it hashes to the manifest's digest, and reads the store's
    # object (an older seal's, a format-2 store's) only if it does not.
    "one-block/flip.txt": (3000, 0o644),
    "one-block/with-object.txt": (2700, 0o644),
    "one-block/planted.txt": (2000, 0o644),
    "one-block/both.txt": (2500, 0o644),
    "one-block/held.txt": (3500, 0o644),
}


def content(rel: str) -> bytes:
    size = FILES[rel][0]
    if rel == "etc/config":
        line = b"db_url = postgres://trusted\n"
        return (line * (size // len(line) + 1))[:size]
    return random.Random(rel).randbytes(size)


def directories() -> List[str]:
    out = {""}
    for rel in FILES:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            out.add("/".join(parts[:i]))
    return sorted(out)


def make_corpus(source):
    """Write the corpus into the (empty or absent) directory ``source``."""
    source = Path(source)
    for d in directories():
        (source / d).mkdir(parents=True, exist_ok=True)
        os.chmod(source / d, 0o755)
    for rel, (_, mode) in FILES.items():
        (source / rel).write_bytes(content(rel))
        os.chmod(source / rel, mode)


def vf(*args) -> str:
    """Run the verityfuse CLI of this interpreter; returns stdout, raises on failure."""
    r = subprocess.run([sys.executable, "-m", "verityfuse.cli", *map(str, args)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"verityfuse {' '.join(map(str, args))}: exit {r.returncode}: {r.stderr}")
    return r.stdout


def seal_share(source, keydir) -> dict:
    """Host, trusted build step: key pair, seal with a signed manifest kept in the
    share, measure it.  Returns the mount parameters the reader trusts."""
    source, keydir = Path(source), Path(keydir)
    keydir.mkdir(parents=True, exist_ok=True)
    vf("keygen", keydir / "key.pem", keydir / "pub.pem")
    manifest = source / "manifest.json"
    vf("seal", source, "--manifest", manifest, "--sign-key", keydir / "key.pem")
    pinned = vf("measure-manifest", manifest).strip()
    return {"manifest": "manifest.json", "pub": str(keydir / "pub.pem"), "digest": pinned}


def mount_args(source, trust: dict) -> List[str]:
    return ["--manifest", str(Path(source) / trust["manifest"]), "--trust-key", trust["pub"],
            "--manifest-digest", trust["digest"]]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def expected(source) -> dict:
    """What the reader must see, computed on the host before any attack."""
    source = Path(source)
    rels = list(FILES)
    digests = {}
    for line in vf("digest", *[source / r for r in rels]).splitlines():
        d, path = line.split(" ", 1)
        digests[os.path.relpath(path, source)] = d
    files = {}
    for rel in rels:
        data = (source / rel).read_bytes()
        st = os.lstat(source / rel)
        files[rel] = {
            "size": st.st_size, "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
            "mtime": st.st_mtime_ns // 10**9, "sha256": sha(data), "digest": digests[rel],
            "blocks": [sha(data[o:o + BS]) for o in range(0, len(data), BS)],
        }
    dirs = {}
    for d in directories():
        prefix = d + "/" if d else ""
        dirs[d] = sorted({r[len(prefix):].split("/")[0] for r in rels if r.startswith(prefix)})
    return {"files": files, "dirs": dirs}


# -- the reader's side -----------------------------------------------------------

class Failed(AssertionError):
    """A check saw something other than the documented refusal."""


FORGET_SETTLE = 0.5


def drop_caches(settle: float = FORGET_SETTLE):
    """Drop page cache, dentries and inodes, so that the next access reaches the daemon.

    The kernel queues a FORGET for every inode it evicts; the pause lets the daemon
    process them before the next lookup, so that it really forgets what it held
    for those inodes (e.g. verified tree blocks), instead of racing the lookup."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    time.sleep(settle)


@dataclass
class Ctx:
    mnt: Path                      # the verified mount
    source: Path                   # the share as the reader sees it (only to unblock a FIFO)
    exp: dict
    log: Callable[[], str]         # the daemon's log so far
    drop_caches: Callable[[], None] = drop_caches
    state: dict = field(default_factory=dict)
    log_mark: int = 0

    def p(self, rel) -> Path:
        return self.mnt / rel

    def mark_log(self):
        self.log_mark = len(self.log())

    def new_log(self) -> str:
        return self.log()[self.log_mark:]

    def identify(self, data: bytes, offset: int = 0) -> str:
        """Whose bytes are these?  (For failure messages.)"""
        h = sha(data)
        for rel, f in self.exp["files"].items():
            if offset == 0 and h == f["sha256"]:
                return f"the bytes of {rel}"
            if offset % BS == 0 and len(data) == BS and offset // BS < len(f["blocks"]) \
                    and f["blocks"][offset // BS] == h:
                return f"block {offset // BS} of {rel}"
        return "bytes of no listed file"


def errname(e: int) -> str:
    return errno.errorcode.get(e, str(e))


def attempt_read(path) -> Tuple[str, int, Optional[bytes]]:
    """("ok", 0, data), ("open", errno, None) or ("read", errno, None)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return "open", e.errno, None
    try:
        return "ok", 0, read_fd(fd)
    except OSError as e:
        return "read", e.errno, None
    finally:
        os.close(fd)


def read_fd(fd) -> bytes:
    chunks, off = [], 0
    while True:
        b = os.pread(fd, 1 << 20, off)
        if not b:
            return b"".join(chunks)
        chunks.append(b)
        off += len(b)


def expect_intact(ctx: Ctx, rel: str):
    where, err, data = attempt_read(ctx.p(rel))
    if where != "ok":
        raise Failed(f"{rel}: {where} failed with {errname(err)}, expected its original bytes")
    if sha(data) != ctx.exp["files"][rel]["sha256"]:
        raise Failed(f"{rel}: read {len(data)} bytes ({ctx.identify(data)}), expected its original bytes")


def expect_eio(ctx: Ctx, rel: str, at=("open", "read")) -> str:
    """Opening and reading ``rel`` must fail with EIO (``at``: where it may fail)."""
    where, err, data = attempt_read(ctx.p(rel))
    if where == "ok":
        raise Failed(f"{rel}: read {len(data)} bytes ({ctx.identify(data)}), expected EIO")
    if err != errno.EIO:
        raise Failed(f"{rel}: {where} failed with {errname(err)}, expected EIO")
    if where not in at:
        raise Failed(f"{rel}: EIO at {where}, expected EIO at {' or '.join(at)}")
    return f"{rel}: EIO at {where}"


def expect_eio_after_drop(ctx: Ctx, rel: str, fd: int):
    """Reading open ``fd`` (taken: closed here) from its start, once caches are dropped
    so that the read reaches the daemon, must fail with EIO."""
    try:
        ctx.drop_caches()
        try:
            data = read_fd(fd)
        except OSError as e:
            if e.errno != errno.EIO:
                raise Failed(f"{rel}: read failed with {errname(e.errno)}, expected EIO")
        else:
            raise Failed(f"{rel}: read {len(data)} bytes ({ctx.identify(data)}), expected EIO")
    finally:
        os.close(fd)


def expect_logged(ctx: Ctx, rel: str):
    if rel not in ctx.new_log():
        raise Failed(f"the daemon's log does not name {rel} since the attack")


def expect_manifest_stat(ctx: Ctx, rel: str, what=("type", "mode", "uid", "gid", "size", "mtime")):
    f = ctx.exp["files"][rel]
    try:
        st = os.lstat(ctx.p(rel))
    except OSError as e:
        raise Failed(f"{rel}: lstat failed with {errname(e.errno)}, expected the manifest's metadata")
    got = {"type": stat.S_IFMT(st.st_mode), "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
           "size": st.st_size, "mtime": st.st_mtime_ns // 10**9}
    want = dict(f, type=stat.S_IFREG)
    bad = [f"{k} {oct(got[k]) if k in ('mode', 'type') else got[k]} != "
           f"{oct(want[k]) if k in ('mode', 'type') else want[k]}" for k in what if got[k] != want[k]]
    if bad:
        raise Failed(f"{rel}: stat shows {', '.join(bad)} (the manifest's)")


def blockwise(ctx: Ctx, rel: str, bad_blocks) -> str:
    """Read ``rel`` block by block (caches dropped): ``bad_blocks`` must give EIO,
    every other block its original bytes."""
    f = ctx.exp["files"][rel]
    bad_blocks = set(bad_blocks)
    fd = os.open(ctx.p(rel), os.O_RDONLY | os.O_CLOEXEC)
    problems = []
    try:
        for i, h in enumerate(f["blocks"]):
            try:
                b = os.pread(fd, BS, i * BS)
                got = None
            except OSError as e:
                b, got = None, e.errno
            if i in bad_blocks:
                if got != errno.EIO:
                    problems.append(f"block {i}: " + (f"{errname(got)}" if got else
                                    f"read {len(b)} bytes ({ctx.identify(b, i * BS)})") + ", expected EIO")
            elif got is not None:
                problems.append(f"block {i}: {errname(got)}, expected its original bytes")
            elif sha(b) != h:
                problems.append(f"block {i}: {ctx.identify(b, i * BS)}, expected its original bytes")
    finally:
        os.close(fd)
    if problems:
        raise Failed(f"{rel}: " + "; ".join(problems[:6]) +
                     (f"; ... {len(problems) - 6} more" if len(problems) > 6 else ""))
    return f"{rel}: blocks {sorted(bad_blocks)[0]}..{sorted(bad_blocks)[-1]} EIO, others intact"


# -- host actions ----------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def exchange(a, b):
    """renameat2(RENAME_EXCHANGE): the two names swap inodes atomically."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(a))


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ 0xFF]))


def tree_object(source, digest_text: str) -> Path:
    """The store's tree object named by an fs-verity digest (protocol/store-format.md)."""
    alg, hexd = digest_text.split(":")
    return Path(source) / ".verityfuse" / "objects" / alg / hexd[:2] / hexd


def leaf_tree_offset(size: int, k: int) -> int:
    """Offset in the Merkle tree (root level first) of leaf-level tree block ``k``."""
    n = -(-size // BS)
    levels = []
    while True:
        n = -(-n // HASHES_PER_BLOCK)
        levels.append(n)
        if n == 1:
            break
    return (sum(levels[1:]) + k) * BS


# -- the attacks -----------------------------------------------------------------

@dataclass(frozen=True)
class Attack:
    name: str
    doc: str
    touches: Tuple[str, ...]                   # listed files whose reads change
    host: Callable[[Path, dict], None]
    check: Callable[[Ctx], Optional[str]]
    prepare: Optional[Callable[[Ctx], None]] = None
    # Files whose integrity failure ``check`` reads (an EIO from the daemon: in manifest
    # mode every refusal to serve a listed file's bytes is one), so a measured mount
    # records an IntegrityViolation for each; ``may_violate``: files ``check`` reads
    # where either outcome is allowed (their original bytes or EIO).
    violates: Tuple[str, ...] = ()
    may_violate: Tuple[str, ...] = ()


ATTACKS: List[Attack] = []


def attack(name, touches, host, check, prepare=None, violates=(), may_violate=()):
    ATTACKS.append(Attack(name, " ".join((check.__doc__ or "").split()), tuple(touches), host, check,
                          prepare, tuple(violates), tuple(may_violate)))


def expected_violations() -> Tuple[Dict[str, str], Dict[str, str]]:
    """After every attack ran on one mount: ({path: attack} the measured mount must record
    an IntegrityViolation for, {path: attack} it may).  No attack-free check reads a
    tampered file (``check_read_all`` excludes what the attacks touched)."""
    must = {p: a.name for a in ATTACKS for p in a.violates}
    may = {p: a.name for a in ATTACKS for p in a.may_violate}
    return must, may


# flipped data byte ------------------------------------------------------------
def _flip_host(src, exp):
    flip_byte(src / "flip/data.bin", 2 * BS + 100)


def _flip_check(ctx):
    """A flipped data byte: EIO on the read of that block, the other blocks read fine."""
    ctx.drop_caches()
    out = blockwise(ctx, "flip/data.bin", [2])
    expect_logged(ctx, "flip/data.bin")
    return out


attack("flipped-data-byte", ["flip/data.bin"], _flip_host, _flip_check, violates=["flip/data.bin"])


# consistent re-seal ------------------------------------------------------------
def _reseal_host(src, exp):
    p = src / "reseal/config"
    p.write_bytes(bytes(b ^ 0x5A for b in p.read_bytes()))  # same size, other bytes
    vf("seal", src, p)                                      # store and index now agree with it


def _reseal_check(ctx):
    """Content changed and re-sealed (data, tree and index agree): EIO."""
    ctx.drop_caches()
    out = expect_eio(ctx, "reseal/config")
    expect_logged(ctx, "reseal/config")
    return out


attack("consistent-reseal", ["reseal/config"], _reseal_host, _reseal_check, violates=["reseal/config"])


# swap while the reader holds one open -------------------------------------------
def _swap_open_prepare(ctx):
    fd = os.open(ctx.p("swap-open/a.bin"), os.O_RDONLY | os.O_CLOEXEC)
    ctx.state["fd"] = fd
    os.pread(fd, BS, 0)


def _swap_host(pair):
    def host(src, exp):
        exchange(src / pair[0], src / pair[1])
    return host


def _swap_open_check(ctx):
    """Two listed files swapped while the reader holds one open: the open fd reads its
    original bytes (or EIO), never the other's; fresh opens give EIO."""
    fd = ctx.state.pop("fd")
    a, b = "swap-open/a.bin", "swap-open/b.bin"
    try:
        ctx.drop_caches()
        try:
            data = read_fd(fd)
            if sha(data) != ctx.exp["files"][a]["sha256"]:
                raise Failed(f"{a}: the fd opened before the swap read {ctx.identify(data)}")
            held = "held fd: original bytes"
        except OSError as e:
            if e.errno != errno.EIO:
                raise Failed(f"{a}: the fd opened before the swap: {errname(e.errno)}, "
                             "expected its original bytes or EIO")
            held = "held fd: EIO"
    finally:
        os.close(fd)
    ctx.drop_caches()
    outs = [expect_eio(ctx, a), expect_eio(ctx, b)]
    expect_logged(ctx, a)
    return "; ".join([held] + outs)


attack("swap-held-open", ["swap-open/a.bin", "swap-open/b.bin"],
       _swap_host(("swap-open/a.bin", "swap-open/b.bin")), _swap_open_check, prepare=_swap_open_prepare,
       violates=["swap-open/a.bin", "swap-open/b.bin"])


# swap while the reader has both cached -------------------------------------------
def _swap_cached_prepare(ctx):
    fds = {}
    try:
        for rel in ("swap-cached/a.bin", "swap-cached/b.bin"):
            fds[rel] = os.open(ctx.p(rel), os.O_RDONLY | os.O_CLOEXEC)
            read_fd(fds[rel])
    finally:
        ctx.state["fds"] = fds


def _swap_cached_check(ctx):
    """Two listed files swapped while both are in the reader's page cache: without
    dropping caches reads give the original bytes; after dropping them, EIO; never
    the other file's bytes."""
    fds = ctx.state.pop("fds")
    notes = []
    try:
        for rel, fd in fds.items():  # no drop: the cached pages, through the fds held open
            try:
                data = read_fd(fd)
            except OSError as e:
                raise Failed(f"{rel}: cached read through an fd held open: {errname(e.errno)}, "
                             "expected the original bytes")
            if sha(data) != ctx.exp["files"][rel]["sha256"]:
                raise Failed(f"{rel}: cached read through an fd held open gave {ctx.identify(data)}")
        notes.append("held fds: original bytes")
        time.sleep(ATTR_TIMEOUT)  # the names are looked up again, the pages stay cached
        for rel in fds:  # no drop, fresh opens: original bytes from the cache, or EIO
            where, err, data = attempt_read(ctx.p(rel))
            if where == "ok" and sha(data) != ctx.exp["files"][rel]["sha256"]:
                raise Failed(f"{rel}: fresh open without dropping caches read {ctx.identify(data)}")
            if where != "ok" and err != errno.EIO:
                raise Failed(f"{rel}: fresh open without dropping caches: {where} {errname(err)}")
            notes.append(f"{rel} fresh, cached: " + ("original bytes" if where == "ok" else f"EIO at {where}"))
    finally:
        for fd in fds.values():
            os.close(fd)
    ctx.drop_caches()
    notes += [expect_eio(ctx, rel) for rel in fds]
    expect_logged(ctx, "swap-cached/a.bin")
    return "; ".join(notes)


attack("swap-both-cached", ["swap-cached/a.bin", "swap-cached/b.bin"],
       _swap_host(("swap-cached/a.bin", "swap-cached/b.bin")), _swap_cached_check, prepare=_swap_cached_prepare,
       violates=["swap-cached/a.bin", "swap-cached/b.bin"])


# hard link over a listed path ----------------------------------------------------
def _hardlink_host(src, exp):
    tmp = src / "hardlink/.tmp"
    os.link(src / "hardlink/other.bin", tmp)
    os.rename(tmp, src / "hardlink/victim.bin")


def _hardlink_check(ctx):
    """Another listed file hard-linked over P: EIO when P is read, never the other's
    bytes; the other file still reads fine."""
    ctx.drop_caches()
    out = expect_eio(ctx, "hardlink/victim.bin")
    expect_intact(ctx, "hardlink/other.bin")
    expect_logged(ctx, "hardlink/victim.bin")
    return out


attack("hardlink-over", ["hardlink/victim.bin"], _hardlink_host, _hardlink_check,
       violates=["hardlink/victim.bin"])


# rename between lookup and open ----------------------------------------------------
def _rename_prepare(ctx):
    os.stat(ctx.p("rename/victim.bin"))  # the lookup; the open comes after the host acted


def _rename_host(src, exp):
    os.rename(src / "rename/other.bin", src / "rename/victim.bin")


def _rename_check(ctx):
    """Another listed file renamed over P between the reader's lookup and its open:
    reads that reach the daemon (caches dropped after the open) give EIO; what the
    page cache still holds are P's own verified bytes."""
    fd = os.open(ctx.p("rename/victim.bin"), os.O_RDONLY | os.O_CLOEXEC)
    expect_eio_after_drop(ctx, "rename/victim.bin", fd)
    expect_logged(ctx, "rename/victim.bin")
    return "EIO"


attack("rename-between-lookup-and-open", ["rename/victim.bin", "rename/other.bin"],
       _rename_host, _rename_check, prepare=_rename_prepare, violates=["rename/victim.bin"])


# symlink at a listed file (absolute target) -----------------------------------------
def _outside(src) -> Path:
    """A directory beside the share, at the same absolute path for host and guest
    (the guest's root is the host's /)."""
    d = Path(src).parent / "outside"
    d.mkdir(exist_ok=True)
    return d


def _symlink_file_host(src, exp):
    rel = "symlink-file/target.bin"
    target = _outside(src) / "target.bin"
    shutil.copyfile(src / rel, target)  # the very bytes the manifest lists
    os.unlink(src / rel)
    os.symlink(str(target), src / rel)


def _symlink_file_check(ctx):
    """A symlink (absolute target) in place of a listed file: EIO at open, never the
    target's bytes; stat still shows the manifest's regular file."""
    ctx.drop_caches()
    out = expect_eio(ctx, "symlink-file/target.bin", at=("open",))
    expect_manifest_stat(ctx, "symlink-file/target.bin", ("type", "size"))
    return out


attack("symlink-at-file", ["symlink-file/target.bin"], _symlink_file_host, _symlink_file_check,
       violates=["symlink-file/target.bin"])


# symlink at a directory above a listed file ("../..") ---------------------------------
def _symlink_dir_host(src, exp):
    stash = src / ".stash"
    stash.mkdir(exist_ok=True)
    os.rename(src / "symlink-dir/x/y", stash / "y")      # the original files, moved aside
    os.symlink("../../.stash/y", src / "symlink-dir/x/y")


def _symlink_dir_check(ctx):
    """A symlink ("../../.stash/y") in place of a directory above a listed file: EIO
    at open, never the target's bytes."""
    ctx.drop_caches()
    out = expect_eio(ctx, "symlink-dir/x/y/file.bin", at=("open",))
    expect_manifest_stat(ctx, "symlink-dir/x/y/file.bin", ("type", "size"))
    return out


attack("symlink-at-directory", ["symlink-dir/x/y/file.bin"], _symlink_dir_host, _symlink_dir_check,
       violates=["symlink-dir/x/y/file.bin"])


# truncation to a block boundary with a reader open --------------------------------
TRUNC = 2 * BS


def _truncate_prepare(ctx):
    fd = os.open(ctx.p("truncate/file.bin"), os.O_RDONLY | os.O_CLOEXEC)
    ctx.state["fd"] = fd
    read_fd(fd)


def _truncate_host(src, exp):
    os.truncate(src / "truncate/file.bin", TRUNC)


def _truncate_check(ctx):
    """P truncated to a block boundary while a reader has it open: st_size stays the
    manifest's; after dropping caches, reads past the cut give EIO, never a short EOF."""
    rel = "truncate/file.bin"
    f = ctx.exp["files"][rel]
    fd = ctx.state.pop("fd")
    try:
        ctx.drop_caches()
        time.sleep(ATTR_TIMEOUT)
        for what, st in (("fstat", os.fstat(fd)), ("stat", os.stat(ctx.p(rel)))):
            if st.st_size != f["size"]:
                raise Failed(f"{rel}: {what} st_size {st.st_size}, expected the manifest's {f['size']}")
        for i in range(TRUNC // BS):  # before the cut: intact
            b = os.pread(fd, BS, i * BS)
            if sha(b) != f["blocks"][i]:
                raise Failed(f"{rel}: block {i}, before the cut, gave {ctx.identify(b, i * BS)}")
        try:
            b = os.pread(fd, BS, TRUNC)
        except OSError as e:
            if e.errno != errno.EIO:
                raise Failed(f"{rel}: read past the cut: {errname(e.errno)}, expected EIO")
        else:
            raise Failed(f"{rel}: read past the cut returned {len(b)} bytes"
                         + (" (a clean EOF)" if not b else f" ({ctx.identify(b, TRUNC)})")
                         + ", expected EIO")
    finally:
        os.close(fd)
    expect_logged(ctx, rel)
    return f"{rel}: size kept, head intact, EIO past the cut"


attack("truncate-reader-open", ["truncate/file.bin"], _truncate_host, _truncate_check,
       prepare=_truncate_prepare, violates=["truncate/file.bin"])


# an added file ----------------------------------------------------------------------
ADDED = ("backdoor.sh", "added/backdoor.conf")


def _added_host(src, exp):
    for rel in ADDED:
        (src / rel).write_bytes(b"#!/bin/sh\necho owned\n")
    vf("seal", src, *[src / rel for rel in ADDED])  # sealed, but not in the manifest


def _added_check(ctx):
    """Files the host added (and sealed): invisible, stat gives ENOENT, not listed."""
    ctx.drop_caches()
    time.sleep(ATTR_TIMEOUT)
    for rel in ADDED:
        parent, name = os.path.split(rel)
        if name in os.listdir(ctx.p(parent)):
            raise Failed(f"{rel}: listed in {parent or '/'}")
        try:
            os.lstat(ctx.p(rel))
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise Failed(f"{rel}: stat gave {errname(e.errno)}, expected ENOENT")
        else:
            raise Failed(f"{rel}: stat succeeded, expected ENOENT")
    expect_intact(ctx, "added/keep.txt")
    return "added files invisible"


attack("added-file", [], _added_host, _added_check)


# a deleted file ---------------------------------------------------------------------
def _deleted_host(src, exp):
    os.unlink(src / "deleted/gone.bin")


def _deleted_check(ctx):
    """A listed file the host deleted: still listed and stat-able, open gives EIO."""
    rel = "deleted/gone.bin"
    ctx.drop_caches()
    time.sleep(ATTR_TIMEOUT)
    if "gone.bin" not in os.listdir(ctx.p("deleted")):
        raise Failed(f"{rel}: no longer listed")
    expect_manifest_stat(ctx, rel)
    return expect_eio(ctx, rel, at=("open",))


attack("deleted-file", ["deleted/gone.bin"], _deleted_host, _deleted_check, violates=["deleted/gone.bin"])


# a changed mode (and owner and mtime) --------------------------------------------------
def _mode_host(src, exp):
    p = src / "mode/tool.sh"
    os.chmod(p, 0o777)
    os.chown(p, 1234, 1234)
    os.utime(p, (1_000_000_000, 1_000_000_000))


def _mode_check(ctx):
    """chmod 777, chown and utime on the host change nothing in the reader's stat;
    the content still reads fine."""
    ctx.drop_caches()
    time.sleep(ATTR_TIMEOUT)
    expect_manifest_stat(ctx, "mode/tool.sh")
    expect_intact(ctx, "mode/tool.sh")
    return "mode, owner, mtime as the manifest's"


attack("changed-mode", ["mode/tool.sh"], _mode_host, _mode_check)


# a corrupted tree object ---------------------------------------------------------------
TREE_LEAF = 1  # covers data blocks 128..255


def _tree_host(src, exp):
    for rel in ("tree/big.bin", "tree/cold.bin"):
        f = exp["files"][rel]
        flip_byte(tree_object(src, f["digest"]),
                  TREE_OFFSET + leaf_tree_offset(f["size"], TREE_LEAF) + 17)


def _tree_check(ctx):
    """A flipped byte in a leaf block of P's tree object: EIO for exactly the data
    blocks it covers when that block is verified after the attack (a cold file);
    a file read before keeps its verified tree blocks and reads its original bytes
    or EIO, never others."""
    ctx.drop_caches()
    lo = TREE_LEAF * HASHES_PER_BLOCK
    out = blockwise(ctx, "tree/cold.bin", range(lo, lo + HASHES_PER_BLOCK))
    expect_logged(ctx, "tree/cold.bin")
    where, err, data = attempt_read(ctx.p("tree/big.bin"))
    if where == "ok" and sha(data) != ctx.exp["files"]["tree/big.bin"]["sha256"]:
        raise Failed(f"tree/big.bin: read {len(data)} bytes ({ctx.identify(data)})")
    if where != "ok" and err != errno.EIO:
        raise Failed(f"tree/big.bin: {where} failed with {errname(err)}, expected EIO or its bytes")
    return out


attack("corrupted-tree-object", ["tree/big.bin", "tree/cold.bin"], _tree_host, _tree_check,
       violates=["tree/cold.bin"], may_violate=["tree/big.bin"])


# a FIFO in place of a listed file ---------------------------------------------------------
def _fifo_host(src, exp):
    p = src / "fifo/file.bin"
    os.unlink(p)
    os.mkfifo(p)


def _fifo_check(ctx):
    """A FIFO in place of a listed file: EIO at open, without blocking."""
    rel = "fifo/file.bin"
    ctx.drop_caches()
    result = {}

    def reader():
        result["r"] = attempt_read(ctx.p(rel))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(FIFO_TIMEOUT)
    if t.is_alive():
        # Unblock it: a writer opening the FIFO lets a blocked reader's open return.
        # If the mount shows the FIFO, the reader waits in this kernel's pipe code
        # (FUSE leaves special files to the client); if the daemon blocked opening
        # it in the share, the writer must open it there.
        for where in (ctx.p(rel), ctx.source / rel):
            try:
                os.close(os.open(where, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
            except OSError:
                pass
        t.join(FIFO_TIMEOUT)
        raise Failed(f"{rel}: open blocked for {FIFO_TIMEOUT:.0f} s, expected EIO at once")
    where, err, data = result["r"]
    if where == "ok":
        raise Failed(f"{rel}: read {len(data)} bytes, expected EIO at open")
    if err != errno.EIO or where != "open":
        raise Failed(f"{rel}: {where} failed with {errname(err)}, expected EIO at open")
    return f"{rel}: EIO at open"


attack("fifo-at-file", ["fifo/file.bin"], _fifo_host, _fifo_check, violates=["fifo/file.bin"])


# files of one block ---------------------------------------------------------------------
def _one_flip_host(src, exp):
    flip_byte(src / "one-block/flip.txt", 1000)


def _eio_logged(ctx, rel: str, at) -> str:
    """After the caches are dropped, ``rel`` fails with EIO ``at`` open or read, and the
    daemon's log names it."""
    ctx.drop_caches()
    out = expect_eio(ctx, rel, at=at)
    expect_logged(ctx, rel)
    return out


def _one_flip_check(ctx):
    """A flipped byte in a file of one block, sealed without a store object: EIO at
    open (no descriptor the manifest's digest vouches for can be had; the log says what
    digest its bytes give), never its bytes."""
    return _eio_logged(ctx, "one-block/flip.txt", ("open",))


attack("one-block-flipped", ["one-block/flip.txt"], _one_flip_host, _one_flip_check,
       violates=["one-block/flip.txt"])


def _object_of_one_block(src, exp, rel: str) -> bytes:
    """The object an older seal, or a seal into a format-2 store, keeps of the file of
    one block ``rel`` (a header and its descriptor), made from its sealed bytes."""
    from verityfuse import merkle, store_object, treebuild
    desc = treebuild.one_block_descriptor(merkle.Params(), (src / rel).read_bytes())
    assert merkle.format_digest(merkle.SHA256, desc.digest) == exp["files"][rel]["digest"]
    return store_object.object_head(desc)


def _one_with_object_host(src, exp):
    rel = "one-block/with-object.txt"
    obj = tree_object(src, exp["files"][rel]["digest"])
    assert not obj.exists(), obj  # sealing writes none
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(_object_of_one_block(src, exp, rel))
    flip_byte(src / rel, 1000)


def _one_with_object_check(ctx):
    """A flipped byte in a file of one block that has its store object (a store of an
    older seal, or of format 2): the open succeeds (the object is read) and the read
    gives EIO, as on ext4."""
    return _eio_logged(ctx, "one-block/with-object.txt", ("read",))


attack("one-block-flipped-with-object", ["one-block/with-object.txt"], _one_with_object_host,
       _one_with_object_check, violates=["one-block/with-object.txt"])


def _plant_object(src, exp, rel: str):
    obj = tree_object(src, exp["files"][rel]["digest"])
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(b"VFSTREE1 planted by the host")


def _one_planted_host(src, exp):
    _plant_object(src, exp, "one-block/planted.txt")


def _one_planted_check(ctx):
    """A bogus store object planted for a file of one block: the file reads back intact,
    its one block hashing to the manifest's digest (the manifest vouches for it; the
    store adds nothing a file of one block needs, and is not read)."""
    ctx.drop_caches()
    expect_intact(ctx, "one-block/planted.txt")
    return "one-block/planted.txt: its original bytes"


attack("one-block-object-planted", ["one-block/planted.txt"], _one_planted_host,
       _one_planted_check)


def _one_both_host(src, exp):
    _plant_object(src, exp, "one-block/both.txt")
    flip_byte(src / "one-block/both.txt", 7)


def _one_both_check(ctx):
    """A file of one block flipped, and a bogus object planted for it: EIO at open (no
    descriptor the manifest's digest vouches for can be had), never its bytes."""
    return _eio_logged(ctx, "one-block/both.txt", ("open",))


attack("one-block-flipped-object-planted", ["one-block/both.txt"], _one_both_host,
       _one_both_check, violates=["one-block/both.txt"])


def _one_held_prepare(ctx):
    fd = os.open(ctx.p("one-block/held.txt"), os.O_RDONLY | os.O_CLOEXEC)
    ctx.state["fd"] = fd
    read_fd(fd)  # opened and read: its descriptor was made from its bytes at this open


def _one_held_host(src, exp):
    flip_byte(src / "one-block/held.txt", 3000)


def _one_held_check(ctx):
    """A file of one block changed while a reader holds it open (its descriptor made at
    that open, from the bytes then): once its pages are dropped, the read gives EIO."""
    rel = "one-block/held.txt"
    expect_eio_after_drop(ctx, rel, ctx.state.pop("fd"))
    expect_logged(ctx, rel)
    return f"{rel}: EIO at read"


attack("one-block-changed-while-open", ["one-block/held.txt"], _one_held_host, _one_held_check,
       prepare=_one_held_prepare, violates=["one-block/held.txt"])


# -- checks without an attack ----------------------------------------------------------

# Files no check reads before the attack that corrupts their tree: the daemon keeps
# verified tree blocks (keyed by digest, as the kernel keeps verified pages), so
# corruption of a block it verified earlier is caught only once that block leaves
# its cache; a cold file's blocks are verified fresh.
COLD = {"tree/cold.bin"}


def check_read_all(ctx, exclude=()):
    """Every listed file reads back byte-identical (caches dropped first)."""
    ctx.drop_caches()
    bad = []
    exclude = set(exclude) | COLD
    for rel in ctx.exp["files"]:
        if rel in exclude:
            continue
        try:
            expect_intact(ctx, rel)
        except Failed as e:
            bad.append(str(e))
    if bad:
        raise Failed("; ".join(bad))
    return f"{len(ctx.exp['files']) - len(exclude)} files identical"


def check_listing(ctx):
    """Every directory lists exactly the manifest's names (no manifest.json, no store)."""
    bad = []
    for d, names in ctx.exp["dirs"].items():
        got = sorted(os.listdir(ctx.p(d)))
        if got != names:
            extra, missing = sorted(set(got) - set(names)), sorted(set(names) - set(got))
            bad.append(f"/{d}: extra {extra} missing {missing}")
    if bad:
        raise Failed("; ".join(bad))
    return f"{len(ctx.exp['dirs'])} directories"


def check_metadata(ctx):
    """stat of every listed file gives the manifest's type, mode, owner, size, mtime."""
    bad = []
    for rel in ctx.exp["files"]:
        try:
            expect_manifest_stat(ctx, rel)
        except Failed as e:
            bad.append(str(e))
    for d in ctx.exp["dirs"]:
        if not stat.S_ISDIR(os.lstat(ctx.p(d)).st_mode):
            bad.append(f"/{d}: not a directory")
    if bad:
        raise Failed("; ".join(bad))
    return f"{len(ctx.exp['files'])} files"


def check_fsverity_measure(ctx):
    """`fsverity measure` on the mount prints each file's manifest digest."""
    rels = list(ctx.exp["files"])
    r = subprocess.run(["fsverity", "measure", *[str(ctx.p(x)) for x in rels]],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise Failed(f"fsverity measure: exit {r.returncode}: {r.stderr.strip()[:300]}")
    got = r.stdout.splitlines()
    want = [f"{ctx.exp['files'][x]['digest']} {ctx.p(x)}" for x in rels]
    if got != want:
        diff = [f"{g!r} != {w!r}" for g, w in zip(got, want) if g != w][:3]
        raise Failed(f"fsverity measure: {len(got)} lines for {len(want)} files; {diff}")
    return f"{len(rels)} digests agree"


def check_lsattr(ctx):
    """`lsattr` on the mount shows the V flag on every listed file."""
    rels = list(ctx.exp["files"])
    r = subprocess.run(["lsattr", *[str(ctx.p(x)) for x in rels]], capture_output=True, text=True)
    if r.returncode != 0:
        raise Failed(f"lsattr: exit {r.returncode}: {r.stderr.strip()[:300]}")
    lines = r.stdout.splitlines()
    noflag = [ln for ln in lines if "V" not in ln.split(" ", 1)[0]]
    if len(lines) != len(rels) or noflag:
        raise Failed(f"lsattr: {len(lines)} lines for {len(rels)} files; without V: {noflag[:3]}")
    return f"{len(rels)} files with V"


def check_read_only(ctx):
    """Writes through the mount give EROFS: create, open for write, mkdir, chmod, unlink."""
    victim = ctx.p("readonly/victim.txt")
    attempts = [
        ("create", lambda: os.close(os.open(ctx.p("readonly/new"), os.O_WRONLY | os.O_CREAT, 0o644))),
        ("open for write", lambda: os.close(os.open(victim, os.O_WRONLY))),
        ("mkdir", lambda: os.mkdir(ctx.p("readonly/newdir"))),
        ("chmod", lambda: os.chmod(victim, 0o600)),
        ("unlink", lambda: os.unlink(victim)),
    ]
    bad = []
    for what, fn in attempts:
        try:
            fn()
        except OSError as e:
            if e.errno != errno.EROFS:
                bad.append(f"{what}: {errname(e.errno)}")
        else:
            bad.append(f"{what}: succeeded")
    if bad:
        raise Failed("expected EROFS; " + "; ".join(bad))
    return "EROFS"


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Ctx], Optional[str]]
    touches: Tuple[str, ...] = ()


BASELINE: List[Check] = [
    Check("read-all", check_read_all),
    Check("listing", check_listing),
    Check("metadata", check_metadata),
    Check("fsverity-measure", check_fsverity_measure),
    Check("lsattr", check_lsattr),
    Check("read-only", check_read_only, ("readonly/victim.txt",)),
]

FINAL = "untouched"   # after all attacks: every untouched file reads back identical

CHECK_NAMES = [c.name for c in BASELINE] + [a.name for a in ATTACKS] + [FINAL]
