"""Measured-mount events in the Attestation Agent event log (AAEL) text format.  Pure:
stdlib, and manifest_header's JSON hook that refuses a duplicate key.

The format is confidential-containers/trustee ``kbs/docs/confidential-containers-eventlog.md``
(the "RAW" storage of AAEL); protocol/attestation.md is the full rule, with vectors:

- the log is LF-terminated lines; the first is ``INIT/<alg> <hex>``, the register's value
  when the log was started (it is *not* extended: only events are);
- then one ``<Domain> <Operation> <Content>`` line per event, single spaces between fields;
- each event extends the register with ``H(line)``: the line's ASCII bytes, without its LF,
  hashed with the register's algorithm; ``new = H(old || H(line))``.

Our Content is canonical JSON (RFC 8785, as the spec requires) whose strings never need a JSON
escape: every string is percent-encoded over its UTF-8 bytes (Linux names: surrogateescape)
except the bytes 0x21-0x7e other than ``"``, ``%`` and ``\\``.  So the line is printable
ASCII with no space inside a field, RFC 8785 and Python's ``json.dumps(sort_keys=True,
separators=(",", ":"))`` give the same bytes, and any file name (spaces, newlines, non-UTF-8)
has exactly one encoding.  Event.content holds the encoded strings: what is hashed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import re

from .manifest_header import no_duplicates

DOMAIN = "github.com/verityfuse/verityfuse"
ALGS = {"sha256": 32, "sha384": 48, "sha512": 64}
SCHEMA_VERSION = 1
OP_MOUNT = "MountManifest"
OP_VIOLATION = "IntegrityViolation"
OP_UNMOUNT = "UnmountManifest"
# RFC 8785 numbers are IEEE doubles: integers above 2**53 would not survive a JCS verifier.
MAX_INT = 2**53 - 1
_SAFE = frozenset(range(0x21, 0x7F)) - {ord('"'), ord("%"), ord("\\")}
_ENCODED = re.compile(r"(?:[\x21\x23-\x24\x26-\x5b\x5d-\x7e]|%[0-9A-F]{2})*")
_FIELD = re.compile(r"[\x21-\x7e]+")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")  # a manifest digest (measure-manifest)
_KEY_ID = re.compile(r"[0-9a-f]{64}")  # SHA-256 of the raw Ed25519 public key
_POLICY = re.compile(r"min_sequence=(0|[1-9][0-9]*),on_corruption=(eio|refuse),"
                     r"trust=(key|pinned|pinned\+key)")
_SCHEMAS = {
    OP_MOUNT: {"version", "manifest", "key_id", "sequence", "policy", "mountpoint"},
    OP_VIOLATION: {"version", "manifest", "path", "offset"},
    OP_UNMOUNT: {"version", "manifest", "mountpoint"},
}


class EventLogError(ValueError):
    """A malformed log or event; the message names the line and what is wrong."""


def encode_name(text: str) -> str:
    """A string (a path, a key id...) as it goes into Content: see the module docstring."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ValueError(f"{text!r} is not a file name (it has a lone surrogate)") from None
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)


def decode_name(text: str) -> str:
    """encode_name's inverse (for display); raises ValueError on a non-canonical encoding."""
    if not _ENCODED.fullmatch(text):
        raise ValueError(f"{text!r} is not a canonical encoded name")
    raw = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "%":
            raw.append(int(text[i + 1:i + 3], 16))
            i += 3
        else:
            raw.append(ord(text[i]))
            i += 1
    name = bytes(raw).decode("utf-8", "surrogateescape")
    if encode_name(name) != text:  # e.g. "%41" for "A": one name, one encoding
        raise ValueError(f"{text!r} escapes a character that needs no escape")
    return name


def canonical_json(content: dict) -> str:
    """RFC 8785 text of a content object whose strings are already encoded names."""
    _check_value(content, "content")
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    assert _FIELD.fullmatch(text), text  # _check_value admits nothing else
    return text


def _check_value(v, where: str):
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str) or not _ENCODED.fullmatch(k) or not k:
                raise ValueError(f"{where}: key {k!r} is not an encoded name")
            _check_value(x, f"{where}.{k}")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _check_value(x, f"{where}[{i}]")
    elif isinstance(v, str):
        if not _ENCODED.fullmatch(v):
            raise ValueError(f"{where}: {v!r} is not an encoded name (use encode_name)")
    elif isinstance(v, bool) or v is None:
        pass
    elif isinstance(v, int):
        if not -MAX_INT <= v <= MAX_INT:
            raise ValueError(f"{where}: {v} is outside the integers RFC 8785 keeps exact")
    else:
        raise ValueError(f"{where}: {type(v).__name__} has no canonical form here")


@dataclasses.dataclass(frozen=True)
class Event:
    domain: str
    operation: str
    content: dict
    # Content exactly as read from a log, for another domain's events (their text is what was
    # hashed, canonical or not); None for ours, whose text is canonical_json(content).
    raw: str | None = None

    def line(self) -> str:
        """The event's log line, without its LF: the bytes that are hashed."""
        for what, v in (("domain", self.domain), ("operation", self.operation)):
            if not _FIELD.fullmatch(v):
                raise ValueError(f"event {what} {v!r} must be printable ASCII without spaces")
        content = self.raw if self.raw is not None else canonical_json(self.content)
        if not content or not all(0x20 <= ord(c) <= 0x7E for c in content):
            raise ValueError(f"event content {content!r} must be printable ASCII")
        return f"{self.domain} {self.operation} {content}"


def _digest_text(manifest_digest: str) -> str:
    if not isinstance(manifest_digest, str) or not _DIGEST.fullmatch(manifest_digest):
        raise ValueError(f"manifest digest {manifest_digest!r} is not sha256:<64 hex digits>")
    return manifest_digest


def _count(v, what: str, optional: bool = False):
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_INT:
        raise ValueError(f"{what} must be an integer from 0 to {MAX_INT}, not {v!r}")
    return v


def _text(v, what: str) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"{what} must be a non-empty string, not {v!r}")
    return encode_name(v)


def _policy(policy, key_id: str | None, sequence: int) -> str:
    """protocol/attestation.md's ``min_sequence=N,on_corruption=M,trust=T``, consistent with
    the event: a key id exactly when a key verified the manifest, and a sequence the mount
    accepted.  One event, one meaning: the writer cannot say what the verifier refuses."""
    _text(policy, "policy")
    m = _POLICY.fullmatch(policy)
    if not m:
        raise ValueError(f"policy {policy!r} is not min_sequence=N,on_corruption=eio|refuse,"
                         f"trust=key|pinned|pinned+key")
    min_sequence = _count(int(m.group(1)), "the policy's min_sequence")
    trust = m.group(3)
    if ("key" in trust) != (key_id is not None):
        raise ValueError(f"trust={trust}, but " + ("no key id is given" if key_id is None
                                                   else "a key id is given"))
    if sequence < min_sequence:
        raise ValueError(f"sequence {sequence} is below the policy's min_sequence "
                         f"{min_sequence}: the mount would have refused the manifest")
    return policy


def _mountpoint(mountpoint: str) -> str:
    """The mount point as events name it (encoded); ValueError unless absolute and
    normalized."""
    if not isinstance(mountpoint, str) or not mountpoint.startswith("/"):
        raise ValueError(f"mount point {mountpoint!r} must be an absolute path")
    # One mount point, one spelling.  normpath keeps a leading "//" (POSIX leaves its
    # meaning to the system; on Linux it is "/"), so that empty component is refused here.
    normal = "/" + posixpath.normpath(mountpoint).lstrip("/")
    if normal != mountpoint:
        raise ValueError(f"mount point {mountpoint!r} is not normalized ({normal})")
    return encode_name(mountpoint)


def mount_manifest(manifest_digest: str, key_id: str | None, sequence: int, policy: str,
                   mountpoint: str) -> Event:
    """The event a manifest mount extends before it serves anything; ValueError for what
    protocol/attestation.md's MountManifest does not allow."""
    encoded_mountpoint = _mountpoint(mountpoint)
    if key_id is not None and (not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id)):
        raise ValueError(f"key id {key_id!r} is not 64 lowercase hex digits (the SHA-256 of "
                         f"the raw Ed25519 public key)")
    sequence = _count(sequence, "sequence")
    return Event(DOMAIN, OP_MOUNT, {
        "version": SCHEMA_VERSION, "manifest": _digest_text(manifest_digest),
        "key_id": key_id, "sequence": sequence, "policy": _policy(policy, key_id, sequence),
        "mountpoint": encoded_mountpoint})


def unmount_manifest(manifest_digest: str, mountpoint: str) -> Event:
    """The event a measured mount extends once it has stopped serving (the kernel's mount
    is gone): the same manifest and mount point as its MountManifest."""
    return Event(DOMAIN, OP_UNMOUNT, {
        "version": SCHEMA_VERSION, "manifest": _digest_text(manifest_digest),
        "mountpoint": _mountpoint(mountpoint)})


def integrity_violation(manifest_digest: str, path: str, offset: int | None) -> Event:
    """The event a mount extends at the first integrity failure of a file."""
    return Event(DOMAIN, OP_VIOLATION, {
        "version": SCHEMA_VERSION, "manifest": _digest_text(manifest_digest),
        "path": _text(path, "path"), "offset": _count(offset, "offset", optional=True)})


def _size(alg: str) -> int:
    if alg not in ALGS:
        raise ValueError(f"unknown hash algorithm {alg!r} (use one of {', '.join(ALGS)})")
    return ALGS[alg]


def event_digest(alg: str, event: Event) -> bytes:
    """What an event extends: H(line), the line's ASCII bytes without its LF."""
    _size(alg)
    return hashlib.new(alg, event.line().encode("ascii")).digest()


def extend(alg: str, old: bytes, digest: bytes) -> bytes:
    """A register extend: H(old || digest)."""
    n = _size(alg)
    if len(old) != n or len(digest) != n:
        raise ValueError(f"{alg} extend needs two {n}-byte values, got {len(old)} and {len(digest)}")
    return hashlib.new(alg, old + digest).digest()


def init_line(alg: str, value: bytes) -> str:
    n = _size(alg)
    if len(value) != n:
        raise ValueError(f"an INIT/{alg} value has {n} bytes, not {len(value)}")
    return f"INIT/{alg} {value.hex()}"


def replay(alg: str, init: bytes, events: list[Event]) -> bytes:
    value = init
    for e in events:
        value = extend(alg, value, event_digest(alg, e))
    return value


def _parse_init(line: str) -> tuple[str, bytes]:
    m = re.fullmatch(r"INIT/([a-z0-9]+) ([0-9a-fA-F]+)", line)
    if not m:
        raise EventLogError("line 1: expected 'INIT/<sha256|sha384|sha512> <hex>', "
                            f"got {line[:80]!r}")
    alg, hexval = m.groups()
    if alg not in ALGS:
        raise EventLogError(f"line 1: unknown hash algorithm {alg!r} (sha256, sha384 or sha512)")
    if len(hexval) != 2 * ALGS[alg]:
        raise EventLogError(f"line 1: an INIT/{alg} value has {2 * ALGS[alg]} hex digits, "
                            f"not {len(hexval)}")
    return alg, bytes.fromhex(hexval)


def _parse_ours(n: int, operation: str, text: str) -> Event:
    if operation not in _SCHEMAS:
        raise EventLogError(f"line {n}: unknown {DOMAIN} operation {operation!r}")
    try:
        content = json.loads(text)
    except ValueError as e:
        raise EventLogError(f"line {n}: {operation} content is not JSON: {e}") from None
    except RecursionError:  # nested deeper than the parser's stack
        raise EventLogError(f"line {n}: {operation} content is nested too deeply") from None
    if not isinstance(content, dict) or set(content) != _SCHEMAS[operation]:
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise EventLogError(f"line {n}: {operation} content must have exactly the keys "
                            f"{sorted(_SCHEMAS[operation])}, has {keys}")
    if content["version"] != SCHEMA_VERSION:
        raise EventLogError(f"line {n}: {operation} schema version {content['version']!r} "
                            f"is not {SCHEMA_VERSION} (a newer verityfuse wrote it?)")
    try:
        if operation == OP_MOUNT:
            key_id = content["key_id"]
            want = mount_manifest(content["manifest"], None if key_id is None else decode_name(key_id),
                                  content["sequence"], decode_name(content["policy"]),
                                  decode_name(content["mountpoint"]))
        elif operation == OP_UNMOUNT:
            want = unmount_manifest(content["manifest"], decode_name(content["mountpoint"]))
        else:
            want = integrity_violation(content["manifest"], decode_name(content["path"]),
                                       content["offset"])
        canonical = canonical_json(want.content)
    except (ValueError, TypeError, AttributeError) as e:
        raise EventLogError(f"line {n}: {operation}: {e}") from None
    if canonical != text:
        raise EventLogError(f"line {n}: {operation} content is not canonical: expected "
                            f"{canonical}, got {text}")
    return want


def parse_log(text: str) -> tuple[str, bytes, list[Event]]:
    """A whole log: (algorithm, INIT value, events).  Strict: any malformed line is an error;
    other domains' events are kept verbatim (their content is hashed as written)."""
    if not text:
        raise EventLogError("line 1: the log is empty (no INIT line)")
    if not text.endswith("\n"):
        raise EventLogError(f"line {text.count(chr(10)) + 1}: the last line has no line feed "
                            f"(a torn or truncated write?)")
    lines = text[:-1].split("\n")
    alg, init = _parse_init(lines[0])
    events = []
    for n, line in enumerate(lines[1:], start=2):
        bad = next((c for c in line if not 0x20 <= ord(c) <= 0x7E), None)
        if bad is not None:
            raise EventLogError(f"line {n}: character {bad!r} is not printable ASCII")
        if line.startswith("INIT/"):
            raise EventLogError(f"line {n}: an INIT line is only allowed as line 1")
        parts = line.split(" ", 2)
        if len(parts) != 3 or not all(parts):
            raise EventLogError(f"line {n}: expected '<domain> <operation> <content>' separated "
                                f"by single spaces, got {line[:80]!r}")
        domain, operation, content = parts
        if domain == DOMAIN:
            events.append(_parse_ours(n, operation, content))
            continue
        events.append(Event(domain, operation, strict_object(content) or {}, raw=content))
    return alg, init, events


def _refuse(what):
    raise ValueError(f"{what} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is beyond a double")
    return value


def _in_double(text: str) -> int:
    value = int(text)  # (more than 4300 digits: ValueError, Python's own limit)
    try:
        float(value)
    except OverflowError:  # JSON.parse reads it as Infinity
        raise ValueError(f"an integer of {len(text)} digits is beyond a double") from None
    return value


def strict_object(text: str) -> dict | None:
    """Another domain's content as a JSON object every parser reads alike, or None (it is
    kept raw): no duplicate key (first-wins and last-wins parsers would differ), no NaN
    or Infinity, no number beyond a double (neither is JSON), no lone surrogate escape
    (``"\\ud800"``: jq and serde refuse the report that holds it, Go reads U+FFFD, which
    can make two keys one)."""
    try:
        doc = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=_refuse,
                         parse_float=_finite, parse_int=_in_double)
        if not isinstance(doc, dict):
            return None
        json.dumps(doc, ensure_ascii=False).encode("utf-8")  # a lone surrogate cannot encode
    except (ValueError, RecursionError):  # (UnicodeEncodeError is a ValueError)
        return None
    return doc
