"""`verityfuse doctor` (and `--version -v`): what this machine gives verityfuse.

Native hashing, the ioctl shim, libfuse, and whether the running kernel
forwards fs-verity ioctls to FUSE servers: found by a real probe (a tiny
mount, one FS_IOC_MEASURE_VERITY) when it can be run, else from the version.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import importlib.util
import os
import platform
import shutil
import signal
import stat
import tempfile

from . import __version__, fsutil, jsonout, merkle, uapi


def _hashing() -> dict:
    out = {"native": merkle.NATIVE}
    info = getattr(merkle._hashblocks, "info", None)
    if merkle.NATIVE and info is not None:
        out.update(info())
    return out


def _shim() -> dict:
    spec = importlib.util.find_spec("verityfuse._fuseshim")
    if spec is None or not spec.origin:
        return {"built": False, "why": "not built (no compiler or libfuse3 headers at install)"}
    try:
        ctypes.CDLL(spec.origin)
    except OSError as e:
        return {"built": True, "loads": False, "why": str(e)}
    return {"built": True, "loads": True, "path": spec.origin}


def _libfuse() -> str:
    try:
        lib = ctypes.CDLL("libfuse3.so.3")
        lib.fuse_pkgversion.restype = ctypes.c_char_p
        return lib.fuse_pkgversion().decode()
    except (OSError, AttributeError):
        return "not found"


def _kernel_forwards(release: str, can_probe: bool) -> dict:
    """fs-verity ioctls reach FUSE servers since Linux 6.10 (commit 9fe2a036a23c)."""
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
        by_version = (major, minor) >= (6, 10)
    except ValueError:
        by_version = None
    if not can_probe:
        return {"forwards": by_version, "how": "from the kernel version (6.10+)"}
    from .testing import VerifiedMount

    # The probe's daemon is a child that goes with this process (VerifiedMount), and a
    # SIGTERM unwinds as Ctrl-C does: the mount goes before its directory, never after.
    old = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with tempfile.TemporaryDirectory(prefix="verityfuse-doctor-") as d:
            src, mnt = os.path.join(d, "src"), os.path.join(d, "mnt")
            os.mkdir(src)
            os.mkdir(mnt)
            with open(os.path.join(src, "f"), "wb") as f:
                f.write(b"probe")
            try:
                m = VerifiedMount(src, mnt, log_file=os.path.join(d, "log"))
            except RuntimeError:  # FuseUnavailable too
                return {"forwards": by_version,
                        "how": "from the kernel version (the probe mount failed)"}
            try:
                fd = os.open(os.path.join(mnt, "f"), os.O_RDONLY)
                try:
                    fcntl.ioctl(fd, uapi.FS_IOC_MEASURE_VERITY, bytearray(4 + 64))
                    forwards = True
                except OSError as e:
                    forwards = e.errno == errno.ENODATA  # our daemon answered: not verity
                finally:
                    os.close(fd)
            finally:
                m.unmount()
    finally:
        signal.signal(signal.SIGTERM, old)
    return {"forwards": forwards, "how": "probed: FS_IOC_MEASURE_VERITY on a test mount"}


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _device() -> dict:
    path = "/dev/fuse"
    try:
        st = os.stat(path)
    except OSError as e:
        return {"ok": False, "why": f"{path}: {e.strerror} (load the fuse module: modprobe fuse)"}
    if not stat.S_ISCHR(st.st_mode):
        return {"ok": False, "why": f"{path} is not a character device"}
    if not os.access(path, os.R_OK | os.W_OK):
        return {"ok": False, "why": f"{path} is not readable and writable by this user "
                                     f"(mode {stat.S_IMODE(st.st_mode):o})"}
    return {"ok": True}


def _fusermount() -> dict:
    """Unprivileged mounts go through fusermount3, which must be setuid root."""
    path = shutil.which("fusermount3")
    if path is None:
        return {"ok": os.geteuid() == 0, "why": "fusermount3 not found (Debian: apt install fuse3); "
                "root mounts without it, users cannot"}
    st = os.stat(path)
    setuid = bool(st.st_mode & stat.S_ISUID) and st.st_uid == 0
    return {"ok": setuid or os.geteuid() == 0, "path": path, "setuid_root": setuid}


def _allow_other() -> dict:
    """allow_other for a non-root mounter needs user_allow_other in /etc/fuse.conf."""
    try:
        with open("/etc/fuse.conf") as f:
            on = any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except OSError:
        on = False
    return {"user_allow_other": on}


def _helper() -> dict:
    from . import helper_link

    link = os.path.join("/sbin", helper_link.HELPER_NAME)  # where mount(8) looks
    try:
        mine = helper_link.own_helper()
    except helper_link.HelperError:
        mine = None
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return {"installed": False, "own_helper": mine}
    except OSError:
        return {"installed": True, "target": None, "ours": False, "own_helper": mine}
    return {"installed": True, "target": target, "ours": target == mine, "own_helper": mine}


def _measurement() -> dict:
    """Which registers `mount --measure` could extend here (nothing is extended)."""
    from .measure_registers import TDX_MEASUREMENTS

    tss = importlib.util.find_spec("tpm2_pytss") is not None
    tpm_dev = os.path.exists("/dev/tpmrm0")
    rtmr = os.path.exists(os.path.join(TDX_MEASUREMENTS, "rtmr3:sha384"))
    return {"tpm": {"device": "/dev/tpmrm0" if tpm_dev else None, "tpm2_pytss": tss,
                    "usable": tpm_dev and tss},
            "rtmr": {"interface": TDX_MEASUREMENTS if rtmr else None, "usable": rtmr},
            "file": {"usable": True}}


def report() -> dict:
    release = platform.release()
    shim = _shim()
    can_probe = (os.geteuid() == 0 and os.path.exists("/dev/fuse") and shim.get("loads", False)
                 and shutil.which("fusermount3") is not None)
    return {"version": __version__, "python": platform.python_version(), "kernel": release,
            "hashing": _hashing(), "native_open": fsutil.native_sys is not None,
            "ioctl_shim": shim, "libfuse": _libfuse(),
            "kernel_fsverity_ioctls": _kernel_forwards(release, can_probe),
            "mounting": {"dev_fuse": _device(), "fusermount3": _fusermount(),
                         "allow_other": _allow_other(), "helper": _helper()},
            "measurement": _measurement()}


def run(json_out: bool = False) -> int:
    r = report()
    if json_out:
        jsonout.emit(r)
        return 0
    h, shim, k = r["hashing"], r["ioctl_shim"], r["kernel_fsverity_ioctls"]
    hashing = (("native: " + ", ".join(f"{a} {v}" for a, v in h.items() if a != "native"))
               if h["native"] else "hashlib (the native module is not built: slower, same bytes)")
    rows = [("verityfuse", r["version"]), ("python", r["python"]), ("kernel", r["kernel"]),
            ("hashing", hashing.rstrip(": ")),
            ("open path", "native system calls" if r["native_open"] else
             "ctypes (the native module is not built: slower, same calls)"),
            ("ioctl shim", "loads" if shim.get("loads") else f"unavailable: {shim.get('why')}"),
            ("libfuse", r["libfuse"]),
            ("fs-verity ioctls via FUSE",
             {True: "forwarded", False: "not forwarded", None: "unknown"}[k["forwards"]]
             + f" ({k['how']})")]
    rows += _mount_rows(r["mounting"]) + _measure_rows(r["measurement"])
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{width}}  {b}")
    return 0


def _mount_rows(m: dict) -> list:
    dev, fm, h = m["dev_fuse"], m["fusermount3"], m["helper"]
    if not h["installed"]:
        helper = "not installed (verityfuse install-helper, for mount -t fuse.verityfuse)"
    elif h["ours"]:
        helper = f"/sbin/mount.fuse.verityfuse -> {h['target']} (this installation)"
    elif h["target"] is None:  # a file, not a link: install-helper leaves it without --force
        helper = ("/sbin/mount.fuse.verityfuse is a file, not a link (another package's "
                  "helper?); verityfuse install-helper --force replaces it")
    else:
        helper = (f"/sbin/mount.fuse.verityfuse -> {h['target']}: NOT this installation's "
                  f"({h['own_helper'] or 'none'}); verityfuse install-helper replaces it")
    return [("/dev/fuse", "usable" if dev["ok"] else f"UNUSABLE: {dev['why']}"),
            ("fusermount3", fm.get("why") or f"{fm['path']}" + (", setuid root" if fm["setuid_root"]
                                                                 else ", NOT setuid root: users "
                                                                      "cannot mount")),
            ("allow_other for users", "allowed (user_allow_other in /etc/fuse.conf)"
             if m["allow_other"]["user_allow_other"] else "root only (no user_allow_other in "
             "/etc/fuse.conf)"),
            ("mount(8) helper", helper)]


def _measure_rows(m: dict) -> list:
    tpm, rtmr = m["tpm"], m["rtmr"]
    if tpm["usable"]:
        t = "usable (--measure tpm: /dev/tpmrm0, PCR 23)"
    else:
        t = "unavailable: " + "; ".join(w for w, bad in (
            ("no /dev/tpmrm0 (no TPM, or no kernel resource manager)", not tpm["device"]),
            ("tpm2-pytss not installed (pip install verityfuse[tpm])", not tpm["tpm2_pytss"]))
            if bad)
    return [("measure: TPM", t),
            ("measure: TDX RTMR", "usable (--measure rtmr: RTMR 3)" if rtmr["usable"]
             else "unavailable (not a TDX guest with the TSM measurement interface)"),
            ("measure: file", "usable (--measure file:PATH, an emulated register)")]
