"""Mount options: every setting of `verityfuse mount` as a `-o` option (pure).

mount(8), fstab and systemd pass one comma-separated option string; this
module splits it into verityfuse's own settings and the FUSE/kernel options,
in a fixed order (the same command line gives the same mount options every
time), and refuses nonsense with a message naming the option.

    verityfuse SOURCE MNT -o ro,allow_other,policy=require,manifest=/p/m.json,...
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NoReturn, Optional, Tuple

# Options of mount(8), fstab and systemd that are not for the filesystem.
IGNORED = {"_netdev", "nofail", "noauto", "auto", "defaults", "user", "users", "nouser",
           "owner", "group", "comment", "x-mount.mkdir"}
IGNORED_PREFIXES = ("x-", "comment=")
# Options the daemon always gives libfuse; a user's value for these wins.
BUILTIN = (("default_permissions", None), ("subtype", "verityfuse"))


class OptionError(ValueError):
    pass


class MountError(Exception):
    """A mount refused before anything was mounted; the message says why."""


@dataclass
class Settings:
    """What `verityfuse mount` needs beyond SOURCE and MOUNTPOINT."""

    store: Optional[str] = None
    policy: str = "enforce"
    manifest: Optional[str] = None
    trust_key: List[str] = field(default_factory=list)
    manifest_digest: Optional[str] = None
    min_sequence: int = 0                # refuse a manifest with a lower sequence (a rollback)
    trust_cert: List[str] = field(default_factory=list)
    require_signatures: bool = False
    cache_size: Optional[int] = None     # MiB
    readahead_kb: int = 1024
    log_file: Optional[str] = None
    measure: Optional[str] = None        # register spec: tpm[:PCR], rtmr[:N], file:[ALG:]PATH
    event_log: Optional[str] = None      # default: measure.default_log_path(register)
    on_corruption: str = "eio"           # eio | refuse (tripwire.MODES)
    max_handles_per_uid: Optional[int] = None  # default: inodes.default_max_handles_per_uid
    debug: bool = False
    foreground: bool = False
    fuse: List[Tuple[str, Optional[str]]] = field(default_factory=list)  # ordered, deduplicated
    remount: bool = False
    # oci:// sources (oci_source): how to reach the registry; nothing it says is trusted.
    plain_http: bool = False
    registry_ca: Optional[str] = None
    registry_auth: Optional[str] = None  # a file holding USER:PASSWORD
    registry_timeout: float = 10.0       # seconds per request
    cache_dir: Optional[str] = None      # verified data blocks on disk, not in memory
    given: List[str] = field(default_factory=list)  # daemon settings named in -o


# libfuse's answer to an option it does not know (it names the option on stderr first).
_UNKNOWN_OPTION = "fuse_session_new() failed"


def reason(e: Exception) -> str:
    """An error as a user reads it: an OSError without Python's "[Errno N]"."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror if e.filename is None else f"{e.strerror}: {e.filename}"
    return str(e)


def refuse(source: str, mountpoint: str, why: str) -> NoReturn:
    """Raise a mount's failure: an option libfuse refused is a usage error (OptionError:
    mount(8)'s "incorrect invocation"), anything else a failed mount (MountError)."""
    if why == _UNKNOWN_OPTION:
        raise OptionError(f"cannot mount '{source}' on '{mountpoint}': an option neither "
                          f"verityfuse nor libfuse knows (libfuse names it above)")
    raise MountError(f"cannot mount '{source}' on '{mountpoint}': {why}")


def positive_int(text: str, name: str) -> int:
    try:
        n = int(text, 10)
    except ValueError:
        raise OptionError(f"{name}: {text!r} is not an integer") from None
    if n <= 0:
        raise OptionError(f"{name}: must be a positive integer, not {n}")
    return n


def non_negative_int(text: str, name: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text, name)


# The kernel's readahead window, written to the mount's bdi as given: 64 MiB is far past
# any use (reads come 1 MiB at a time), where any count was taken (~93 TiB, exit 0).
MAX_READAHEAD_KB = 65536


MAX_REGISTRY_TIMEOUT = 3600  # seconds: beyond what a timer takes (10**10 overflowed one)


def registry_timeout(text: str, name: str) -> int:
    n = positive_int(text, name)
    if n > MAX_REGISTRY_TIMEOUT:
        raise OptionError(f"{name}: at most {MAX_REGISTRY_TIMEOUT} seconds, not {n}")
    return n


def readahead_kb(text: str, name: str) -> int:
    n = non_negative_int(text, name)
    if n > MAX_READAHEAD_KB:
        raise OptionError(f"{name}: at most {MAX_READAHEAD_KB} KiB, not {n}")
    return n


def _policy(v: str) -> str:
    if v not in ("enforce", "require"):
        raise OptionError(f"policy: {v!r} is not enforce or require")
    return v


def _measure(v: str) -> str:
    if v.split(":", 1)[0] not in ("tpm", "rtmr", "file"):
        raise OptionError(f"measure: {v!r} is not tpm[:PCR], rtmr[:N] or file:[ALG:]PATH")
    return v


def _on_corruption(v: str) -> str:
    if v not in ("eio", "refuse"):
        raise OptionError(f"on_corruption: {v!r} is not eio or refuse")
    return v


def _digest(v: str) -> str:
    from .errors import ManifestError
    from .manifest import pinned_digest
    try:
        return pinned_digest(v)
    except ManifestError as e:
        raise OptionError(f"manifest_digest: {e}") from None


# name -> (Settings attribute, parser or None for a flag)
VALUED: Dict[str, Tuple[str, Callable[[str], object]]] = {
    "store": ("store", str), "policy": ("policy", _policy), "manifest": ("manifest", str),
    "manifest_digest": ("manifest_digest", _digest), "log_file": ("log_file", str),
    "measure": ("measure", _measure), "event_log": ("event_log", str),
    "on_corruption": ("on_corruption", _on_corruption),
    "cache_size": ("cache_size", lambda v: positive_int(v, "cache_size")),
    "readahead_kb": ("readahead_kb", lambda v: readahead_kb(v, "readahead_kb")),
    "min_sequence": ("min_sequence", lambda v: non_negative_int(v, "min_sequence")),
    "registry_ca": ("registry_ca", str), "registry_auth": ("registry_auth", str),
    "cache": ("cache_dir", str),
    "registry_timeout": ("registry_timeout", lambda v: float(registry_timeout(v, "registry_timeout"))),
    "max_handles_per_uid": ("max_handles_per_uid",
                            lambda v: positive_int(v, "max_handles_per_uid")),
}
REPEATED = {"trust_key": "trust_key", "trust_cert": "trust_cert"}
FLAGS = {"require_signatures": "require_signatures", "debug": "debug", "foreground": "foreground",
         "plain_http": "plain_http"}


def attr_of(name: str) -> str:
    """The Settings attribute daemon option ``name`` sets."""
    return VALUED[name][0] if name in VALUED else REPEATED.get(name) or FLAGS[name]


def daemon_settings(s: Settings) -> Dict[str, object]:
    """Every daemon option's value in ``s``, as JSON values: what the daemon was started
    with (`verityfuse status` reports it), which a remount may give again, never change."""
    out: Dict[str, object] = {}
    for name in (*VALUED, *REPEATED, *FLAGS):
        v = getattr(s, attr_of(name))
        out[name] = list(v) if isinstance(v, list) else v
    return out


def absolute_paths(s: Settings) -> Settings:
    """``s`` with every path made absolute against the current directory: the daemon
    moves to / before it opens the store, the register and the event log (it must not
    keep a directory busy), where a relative path would name a file under / instead."""
    def ab(path: Optional[str]) -> Optional[str]:
        return os.path.abspath(path) if path else path

    measure = s.measure
    if measure and measure.startswith("file:"):  # read by the one parser of register specs
        from .measure_registers import FileRegister, MeasureError, open_register
        try:
            register = open_register(measure)  # a FileRegister's path is absolute
        except MeasureError:
            register = None  # a bad spec: check() refuses it, saying why
        if isinstance(register, FileRegister):
            measure = f"file:{register.alg}:{register.path}"
    return dataclasses.replace(
        s, store=ab(s.store), manifest=ab(s.manifest), log_file=ab(s.log_file),
        event_log=ab(s.event_log), measure=measure, registry_ca=ab(s.registry_ca),
        registry_auth=ab(s.registry_auth), cache_dir=ab(s.cache_dir),
        trust_key=[os.path.abspath(k) for k in s.trust_key],
        trust_cert=[os.path.abspath(c) for c in s.trust_cert])


def split(options: str) -> List[str]:
    return [o for o in options.split(",") if o]


def parse(groups: List[str], settings: Optional[Settings] = None) -> Settings:
    """Apply ``-o`` groups (in order; a later value wins) onto ``settings``."""
    s = settings or Settings()
    fuse: Dict[str, Optional[str]] = dict(s.fuse)
    for group in groups:
        for opt in split(group):
            name, eq, value = opt.partition("=")
            name = name.replace("-", "_") if name in _UNDERSCORED else name
            if name in IGNORED or opt.startswith(IGNORED_PREFIXES):
                pass  # fstab and systemd options: accepted, nothing to do
            elif name == "remount":
                s.remount = True
            elif name in VALUED:
                if not eq or not value:
                    raise OptionError(f"{name}: needs a value ({name}=...)")
                attr, conv = VALUED[name]
                setattr(s, attr, conv(value))
                s.given.append(name)
            elif name in REPEATED:
                if not eq or not value:
                    raise OptionError(f"{name}: needs a value ({name}=...)")
                getattr(s, REPEATED[name]).append(value)
                s.given.append(name)
            elif name in FLAGS:
                if eq:
                    raise OptionError(f"{name}: takes no value")
                setattr(s, FLAGS[name], True)
                s.given.append(name)
            else:  # for libfuse and the kernel: ro, allow_other, fsname=..., max_read=...
                for other in ("ro", "rw") if name in ("ro", "rw") else (name,):
                    fuse.pop(other, None)  # the last of ro/rw wins, as for mount(8)
                fuse[name] = value if eq else None
    s.fuse = list(fuse.items())
    return s


_UNDERSCORED = {"trust-key", "trust-cert", "manifest-digest", "log-file", "cache-size",
                "readahead-kb", "require-signatures", "event-log", "on-corruption", "min-sequence",
                "plain-http", "registry-ca", "registry-auth", "registry-timeout",
                "max-handles-per-uid"}


def escape_value(value: str) -> str:
    """An option value as libfuse reads it back: it splits an option string at commas
    and takes a backslash as "the next character is literal".  Unescaped, a SOURCE
    named "x,allow_other" would inject allow_other into the mount."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def ascii_name(name: str) -> str:
    """``name`` for pyfuse3, which hands libfuse its options as ASCII (any other character
    failed the mount of a SOURCE such as /srv/café): its other bytes as \\xNN."""
    if name.isascii():
        return name
    return "".join(chr(b) if b < 0x80 else f"\\x{b:02x}" for b in os.fsencode(name))


def fuse_options(s: Settings, fsname: str) -> List[str]:
    """The options given to libfuse, in a fixed order: built-ins first, then the
    user's in the order given; a user's fsname= or subtype= replaces the built-in."""
    user = dict(s.fuse)
    out = []
    for name, value in BUILTIN + (("fsname", escape_value(ascii_name(fsname))),):
        if name not in user:
            out.append(name if value is None else f"{name}={value}")
    out += [n if v is None else f"{n}={v}" for n, v in s.fuse]
    return out


def read_only(s: Settings) -> bool:
    return any(name == "ro" for name, _ in s.fuse)
