"""Signed manifests: the envelope, Ed25519 keys, authentication (format in
protocol/manifest-format.md; the payload itself is manifest_tree's).

The signature covers the exact payload bytes, which the envelope carries
base64-encoded, so no JSON canonicalization is ever needed to verify.  The
manifest digest (SHA-256 of the payload) is the one value a remote verifier
pins.  Nothing of the payload is parsed before it is authenticated, and the
envelope around it is parsed only once the payload string has been cut out:
an unauthenticated file costs a small multiple of its size, however crafted.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import manifest_header, manifest_tree, merkle, wholefile
from .errors import ManifestError

ENVELOPE_FORMAT = "verityfuse-signed-manifest"
ENVELOPE_VERSION = 1
MAX_BYTES = 64 << 20        # a manifest larger than this is refused unread
MAX_ENVELOPE_REST = 1 << 16  # the envelope without its payload: format, version, signatures
_PAYLOAD = re.compile(rb'"payload"\s*:\s*"')


@dataclass(frozen=True)
class Manifest:
    tree: manifest_tree.Tree
    digest: str  # sha256:<hex> of the payload
    key_id: Optional[str] = None    # the trusted key that verified it (hex); None: pinned only
    sequence: int = 0               # the header's (manifest_header)
    expires: Optional[int] = None   # Unix seconds, UTC; None: never


def manifest_digest(payload: bytes) -> str:
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def pinned_digest(text: str) -> str:
    """A ``--manifest-digest`` value: ``sha256:<hex>``, or ``@FILE`` holding it (its first
    word, as ``verityfuse measure-manifest M > FILE`` writes it).  ManifestError if bad."""
    where = "manifest digest"
    if text.startswith("@"):
        where = text[1:]
        words = _read_limited(where, 4096, "digest file").decode("ascii", "replace").split()
        if not words:
            raise ManifestError(f"{where}: empty, no manifest digest in it")
        text = words[0]
    try:
        alg, _ = merkle.parse_digest(text)
    except ValueError as e:
        raise ManifestError(f"{where}: {e}") from None
    if alg.name != "sha256":
        raise ManifestError(f"{where}: a manifest digest is sha256:<hex>, not {alg.name}")
    return text


# -- keys ---------------------------------------------------------------------

def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _read_limited(path: str, limit: int, what: str) -> bytes:
    try:
        data = wholefile.read_regular(path, limit, what=path)
    except wholefile.TooLarge as e:  # refused on its fstat size, unread
        raise ManifestError(f"{path}: {what} larger than {limit} bytes ({e.strerror}): "
                            f"refused unread") from None
    except OSError as e:
        raise ManifestError(f"{path}: {e.strerror}") from None
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
    """A new key pair in two new files; FileExistsError (naming the file) when either
    name is taken, by anything, a dangling symlink included: a key is never overwritten."""
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    wholefile.atomic_write(private_path, pem, 0o600, replace=False)
    wholefile.atomic_write(public_path, key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), 0o644,
        replace=False)
    return key


# -- the envelope ---------------------------------------------------------------

def signatures(payload, key: Ed25519PrivateKey) -> list:
    """The envelope's ``signatures`` list for ``payload`` (bytes or any buffer)."""
    return [{"algorithm": "ed25519", "key_id": key_id(key.public_key()),
             "signature": base64.b64encode(key.sign(payload)).decode()}]


_CUT = '"payload": ""'


def envelope_text(sigs: list):
    """The envelope's bytes before and after the base64 payload (manifest_writer
    streams the payload between them)."""
    text = json.dumps({"format": ENVELOPE_FORMAT, "version": ENVELOPE_VERSION, "payload": "",
                       "signatures": sigs}, indent=1) + "\n"
    head, _, tail = text.partition(_CUT)
    return (head + _CUT[:-1]).encode(), ('"' + tail).encode()


def sign(payload: bytes, key: Optional[Ed25519PrivateKey]) -> bytes:
    """The manifest file: the payload and its signature (none without a key:
    such a manifest is usable only with a pinned digest)."""
    head, tail = envelope_text([] if key is None else signatures(payload, key))
    return head + base64.b64encode(payload) + tail


def read_envelope(path: str):
    """(envelope dict without its payload, payload bytes) of a manifest file, not yet
    authenticated.  Memory: a few times the file size at most."""
    data = _read_limited(path, MAX_BYTES, "manifest")
    m = _PAYLOAD.search(data)
    start = m.end() if m else -1
    end = data.find(b'"', start) if m else -1
    if end < 0:
        raise ManifestError(f"{path}: not a {ENVELOPE_FORMAT} file (no base64 payload)")
    rest = data[:start] + data[end:]
    if len(rest) > MAX_ENVELOPE_REST:
        raise ManifestError(f"{path}: the envelope holds {len(rest)} bytes besides its payload, "
                            f"more than {MAX_ENVELOPE_REST}")
    try:
        env = json.loads(rest.decode("utf-8"), object_pairs_hook=manifest_header.no_duplicates)
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 at byte {e.start}") from None
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(env, dict) or env.get("format") != ENVELOPE_FORMAT:
        raise ManifestError(f"{path}: not a {ENVELOPE_FORMAT} file")
    if env.get("payload") != "":  # the one we cut out was not the envelope's own
        raise ManifestError(f"{path}: malformed envelope (payload)")
    if type(env.get("version")) is not int or env["version"] != ENVELOPE_VERSION:  # 1.0, true: no
        raise ManifestError(f"{path}: unsupported envelope version {env.get('version')!r}")
    return env, _b64(data[start:end], f"{path}: payload")


def _b64(text, where: str) -> bytes:
    try:
        if isinstance(text, (str, bytes)):
            return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    raise ManifestError(f"{where}: invalid base64")


def check_signatures(path: str, env: dict, payload: bytes, trust_keys: List[Ed25519PublicKey]
                     ) -> str:
    """The hex id of the first trusted key whose signature verifies; ManifestError if none."""
    sigs = env.get("signatures")
    if not isinstance(sigs, list) or not sigs:
        raise ManifestError(f"{path}: no signatures")
    trusted = {key_id(k): k for k in trust_keys}
    seen = []
    for n, s in enumerate(sigs):
        if not isinstance(s, dict) or s.get("algorithm") != "ed25519":
            raise ManifestError(f"{path}: signatures[{n}]: unsupported or missing algorithm")
        kid = str(s.get("key_id"))
        seen.append(kid[:16])
        key = trusted.get(kid)
        if key is None:
            continue
        raw = _b64(s.get("signature"), f"{path}: signatures[{n}]")
        try:
            key.verify(raw, payload)
            return kid
        except InvalidSignature:
            raise ManifestError(f"{path}: signature by trusted key {kid[:16]}... does not verify: "
                                f"the manifest was altered") from None
    raise ManifestError(f"{path}: not signed by a trusted key (signed by key ids "
                        f"{', '.join(seen) or 'none'}...; trusted: "
                        f"{', '.join(k[:16] for k in trusted)}...)")


def _authenticate(path: str, trust_keys: Sequence[Ed25519PublicKey],
                  pinned_digest: Optional[str]):
    if not trust_keys and not pinned_digest:
        raise ManifestError("a manifest must be authenticated: give a trusted key or a pinned digest")
    env, payload = read_envelope(path)
    if pinned_digest is not None and manifest_digest(payload) != pinned_digest:
        raise ManifestError(f"{path}: manifest digest {manifest_digest(payload)} is not the pinned "
                            f"{pinned_digest}")
    kid = check_signatures(path, env, payload, list(trust_keys)) if trust_keys else None
    return payload, kid


def authenticate(path: str, trust_keys: Sequence[Ed25519PublicKey] = (),
                 pinned_digest: Optional[str] = None) -> bytes:
    """The payload of ``path``, once it is signed by one of ``trust_keys`` and/or
    its digest equals ``pinned_digest`` (at least one must be given)."""
    return _authenticate(path, trust_keys, pinned_digest)[0]


def load(path: str, trust_keys: Sequence[Ed25519PublicKey] = (), pinned_digest: Optional[str] = None,
         min_sequence: int = 0, now: Optional[float] = None) -> Manifest:
    """Read, authenticate, check freshness, then parse a signed manifest.

    Freshness (after authentication: the header is the signer's word only once
    the signature or pin holds, and before the entries cost anything): a
    sequence below ``min_sequence`` is refused as a rollback, and an expired
    manifest always (``now``: Unix seconds, default the clock)."""
    payload, kid = _authenticate(path, trust_keys, pinned_digest)
    header = manifest_tree.parse_header(payload, path)
    manifest_header.check_fresh(path, header, min_sequence, now)
    tree = manifest_tree.parse_payload(payload, path)
    return Manifest(tree, manifest_digest(payload), kid, header.sequence, header.expires)
