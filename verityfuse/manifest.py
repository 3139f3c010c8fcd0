"""Signed manifests: path -> fs-verity digest, signed with Ed25519 (format in
protocol/manifest-format.md).

The signature covers the exact payload bytes, which the envelope carries
base64-encoded, so no JSON canonicalization is ever needed to verify.  The
manifest digest (SHA-256 of the payload) is the one value a remote verifier
pins.  Everything here is pure; malformed input raises ManifestError with a
message that says what is wrong and where.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import merkle
from .errors import VerityError
from .store import normalize_relpath, parse_digest

FORMAT = "verityfuse-manifest"
ENVELOPE_FORMAT = "verityfuse-signed-manifest"
VERSION = 1
MAX_BYTES = 64 << 20       # a manifest larger than this is refused unread
MAX_PATH_BYTES = 4096


class ManifestError(VerityError):
    errno = errno.EINVAL


@dataclass(frozen=True)
class Entry:
    path: str
    alg: merkle.HashAlg
    digest: bytes
    block_size: int
    salt: bytes

    @property
    def digest_text(self) -> str:
        return merkle.format_digest(self.alg, self.digest)


@dataclass(frozen=True)
class Manifest:
    entries: Dict[str, Entry]
    payload: bytes

    @property
    def digest(self) -> str:
        return manifest_digest(self.payload)


def manifest_digest(payload: bytes) -> str:
    return "sha256:" + hashlib.sha256(payload).hexdigest()


# -- keys ---------------------------------------------------------------------

def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _read_limited(path: str, limit: int, what: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ManifestError(f"{path}: {what} larger than {limit} bytes")
    return data


def load_private_key(path: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read_limited(path, 1 << 16, "key"), password=None)
    except (ValueError, TypeError) as e:
        raise ManifestError(f"{path}: not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ManifestError(f"{path}: an Ed25519 key is needed, this is {type(key).__name__}")
    return key


def load_public_key(path: str) -> Ed25519PublicKey:
    """A PEM public key (`openssl pkey -pubout`), or the public half of a private key."""
    data = _read_limited(path, 1 << 16, "key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as e:
            raise ManifestError(f"{path}: not a PEM public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ManifestError(f"{path}: an Ed25519 key is needed, this is {type(key).__name__}")
    return key


def generate_key(private_path: str, public_path: str):
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    with open(public_path, "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return key


# -- writing ------------------------------------------------------------------

def make_payload(entries: Iterable[Entry]) -> bytes:
    files = []
    for e in sorted(entries, key=lambda e: e.path):
        files.append({"path": e.path, "digest": e.digest_text, "block_size": e.block_size,
                      "salt": e.salt.hex()})
    doc = {"format": FORMAT, "version": VERSION, "files": files}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(payload: bytes, key: Optional[Ed25519PrivateKey]) -> bytes:
    """The manifest file: the payload and its signature (none without a key:
    such a manifest is usable only with a pinned digest)."""
    sigs = [] if key is None else [
        {"algorithm": "ed25519", "key_id": key_id(key.public_key()),
         "signature": base64.b64encode(key.sign(payload)).decode()}]
    envelope = {"format": ENVELOPE_FORMAT, "version": VERSION,
                "payload": base64.b64encode(payload).decode(), "signatures": sigs}
    return json.dumps(envelope, indent=1).encode() + b"\n"


# -- reading ------------------------------------------------------------------

def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ManifestError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _json(data: bytes, where: str):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{where}: not UTF-8 at byte {e.start}") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except ManifestError as e:
        raise ManifestError(f"{where}: {e}") from None
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"{where}: invalid JSON: {e}") from None


def _b64(text, where: str) -> bytes:
    if not isinstance(text, str):
        raise ManifestError(f"{where}: expected a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ManifestError(f"{where}: invalid base64") from None


def parse_payload(payload: bytes, where: str = "manifest") -> Dict[str, Entry]:
    doc = _json(payload, where)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ManifestError(f"{where}: not a {FORMAT} document")
    if doc.get("version") != VERSION:
        raise ManifestError(f"{where}: unsupported manifest version {doc.get('version')!r} "
                            f"(this verityfuse reads version {VERSION})")
    files = doc.get("files")
    if not isinstance(files, list):
        raise ManifestError(f"{where}: 'files' must be a list")
    entries: Dict[str, Entry] = {}
    for n, f in enumerate(files):
        at = f"{where}: files[{n}]"
        if not isinstance(f, dict) or set(f) != {"path", "digest", "block_size", "salt"}:
            raise ManifestError(f"{at}: expected exactly path, digest, block_size, salt")
        path = f["path"]
        if not isinstance(path, str) or not path or "\0" in path or len(path.encode()) > MAX_PATH_BYTES:
            raise ManifestError(f"{at}: invalid path {path!r}")
        try:
            if path.startswith("/") or normalize_relpath(path) != path:
                raise ValueError
        except ValueError:
            raise ManifestError(f"{at}: path {path!r} must be relative and normalized "
                                f"(no '/', '.', '..' components)") from None
        try:
            alg, digest = parse_digest(f["digest"]) if isinstance(f["digest"], str) else (None, None)
            if alg is None:
                raise ValueError("digest must be a string")
            salt = bytes.fromhex(f["salt"]) if isinstance(f["salt"], str) else None
            if salt is None or not isinstance(f["block_size"], int) or isinstance(f["block_size"], bool):
                raise ValueError("block_size must be an integer and salt a hex string")
            merkle.Params(alg, f["block_size"], salt)
        except (ValueError, VerityError) as e:
            raise ManifestError(f"{at} ({path}): {e}") from None
        if path in entries:
            raise ManifestError(f"{at}: path {path!r} listed twice")
        entries[path] = Entry(path, alg, digest, f["block_size"], salt)
    return entries


def read_envelope(path: str):
    """(envelope dict, payload bytes) of a manifest file, not yet authenticated."""
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise ManifestError(f"{path}: {e.strerror}") from None
    if size > MAX_BYTES:
        raise ManifestError(f"{path}: {size} bytes, larger than the {MAX_BYTES}-byte limit")
    env = _json(_read_limited(path, MAX_BYTES, "manifest"), path)
    if not isinstance(env, dict) or env.get("format") != ENVELOPE_FORMAT:
        raise ManifestError(f"{path}: not a {ENVELOPE_FORMAT} file")
    if env.get("version") != VERSION:
        raise ManifestError(f"{path}: unsupported envelope version {env.get('version')!r}")
    return env, _b64(env.get("payload"), f"{path}: payload")


def _check_signatures(path: str, env: dict, payload: bytes, trust_keys: List[Ed25519PublicKey]):
    sigs = env.get("signatures")
    if not isinstance(sigs, list) or not sigs:
        raise ManifestError(f"{path}: no signatures")
    trusted = {key_id(k): k for k in trust_keys}
    seen = []
    for n, s in enumerate(sigs):
        if not isinstance(s, dict) or s.get("algorithm") != "ed25519":
            raise ManifestError(f"{path}: signatures[{n}]: unsupported or missing algorithm")
        kid = s.get("key_id")
        seen.append(str(kid)[:16])
        key = trusted.get(kid)
        if key is None:
            continue
        try:
            key.verify(_b64(s.get("signature"), f"{path}: signatures[{n}]"), payload)
            return
        except InvalidSignature:
            raise ManifestError(f"{path}: signature by trusted key {kid[:16]}... does not verify: "
                                f"the manifest was altered") from None
    raise ManifestError(f"{path}: not signed by a trusted key (signed by key ids "
                        f"{', '.join(seen)}...; trusted: {', '.join(k[:16] for k in trusted)}...)")


def load(path: str, trust_keys: List[Ed25519PublicKey] = (), pinned_digest: Optional[str] = None
         ) -> Manifest:
    """Read, authenticate and parse a signed manifest.

    Authentic means: signed by one of ``trust_keys``, and/or its digest equals
    ``pinned_digest``.  At least one of the two must be given.
    """
    if not trust_keys and not pinned_digest:
        raise ManifestError("a manifest must be authenticated: give a trusted key or a pinned digest")
    env, payload = read_envelope(path)
    if pinned_digest is not None and manifest_digest(payload) != pinned_digest:
        raise ManifestError(f"{path}: manifest digest {manifest_digest(payload)} is not the pinned "
                            f"{pinned_digest}")
    if trust_keys:
        _check_signatures(path, env, payload, list(trust_keys))
    return Manifest(parse_payload(payload, path), payload)
