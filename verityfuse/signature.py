"""fs-verity built-in signatures: detached DER PKCS#7 over struct
fsverity_formatted_digest, as `fsverity sign` writes them, verified in
userspace against trusted X.509 certificates.

The kernel's errnos (fs/verity/signature.c): EBADMSG for a signature that does
not parse, ENOKEY when no trusted certificate signed it, EKEYREJECTED when the
trusted signer's signature is not over this file's digest.

cryptography cannot verify PKCS#7, so asn1crypto parses the SignedData and
cryptography checks the signature itself.
"""

from __future__ import annotations

import errno
import hashlib
from typing import Callable, Dict, Iterable, List

from asn1crypto import cms
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from . import merkle
from .errors import Errno

_HASHES: Dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


def load_certificates(paths: Iterable[str]) -> List[x509.Certificate]:
    certs = []
    for p in paths:
        with open(p, "rb") as f:
            data = f.read(1 << 20)
        try:
            certs.extend(x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data
                         else [x509.load_der_x509_certificate(data)])
        except ValueError as e:
            raise Errno(errno.EINVAL, f"{p}: not an X.509 certificate: {e}") from None
    return certs


def _signed_data(sig: bytes):
    try:
        info = cms.ContentInfo.load(sig, strict=True)
        if info["content_type"].native != "signed_data":
            raise ValueError("not PKCS#7 SignedData")
        sd = info["content"]
        signers = list(sd["signer_infos"])
        if not signers:
            raise ValueError("no signers")
        parsed = []
        for si in signers:
            sid = si["sid"]
            if sid.name != "issuer_and_serial_number":
                raise ValueError("signer not identified by issuer and serial number")
            attrs = si["signed_attrs"]
            parsed.append(dict(
                issuer=sid.chosen["issuer"].dump(),
                serial=sid.chosen["serial_number"].native,
                digest_alg=si["digest_algorithm"]["algorithm"].native,
                signature=si["signature"].native,
                attrs=attrs if attrs.native else None,
            ))
        return parsed
    except (ValueError, TypeError, KeyError) as e:
        raise Errno(errno.EBADMSG, f"malformed PKCS#7 signature: {e}") from None


def verify(sig: bytes, alg: merkle.HashAlg, digest: bytes, trusted: List[x509.Certificate]) -> None:
    """Raise Errno unless ``sig`` is a valid signature of this fs-verity digest by a trusted cert."""
    content = merkle.formatted_digest(alg, digest)
    signers = _signed_data(sig)
    rejected = False
    for s in signers:
        h = _HASHES.get(s["digest_alg"])
        if h is None:
            raise Errno(errno.EBADMSG, f"unsupported digest algorithm {s['digest_alg']}")
        for cert in trusted:
            if cert.serial_number != s["serial"] or cert.issuer.public_bytes() != s["issuer"]:
                continue
            data = content
            if s["attrs"] is not None:
                # Signed attributes: the signature covers them (as a SET), and
                # they carry the content's digest.
                md = [a["values"][0].native for a in s["attrs"] if a["type"].native == "message_digest"]
                if md != [hashlib.new(s["digest_alg"], content).digest()]:
                    rejected = True
                    continue
                data = b"\x31" + s["attrs"].dump()[1:]
            key = cert.public_key()
            try:
                if isinstance(key, rsa.RSAPublicKey):
                    key.verify(s["signature"], data, padding.PKCS1v15(), h())
                elif isinstance(key, ec.EllipticCurvePublicKey):
                    key.verify(s["signature"], data, ec.ECDSA(h()))
                else:
                    raise Errno(errno.EBADMSG, f"unsupported key type {type(key).__name__}")
                return
            except (InvalidSignature, UnsupportedAlgorithm):
                rejected = True
    if rejected:
        raise Errno(errno.EKEYREJECTED, "signature does not match this file's digest")
    raise Errno(errno.ENOKEY, "signature is not by a trusted certificate")
