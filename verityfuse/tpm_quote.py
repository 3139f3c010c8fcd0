"""Check a TPM 2.0 quote as `tpm2_quote` writes it, over one PCR, for `attest replay --quote`.

Inputs are the files of `tpm2_quote -c ak.ctx -l sha256:23 -q NONCE -m quote.msg -s quote.sig`:
quote.msg is a marshaled TPMS_ATTEST, quote.sig a TPMT_SIGNATURE (tpm2-tools' default "tss"
format), and the AK public key either as `tpm2_createak -u ak.pub` writes it (TPM2B_PUBLIC,
the default) or as PEM (`-f pem`).  tpm2-pytss unmarshals, `cryptography` checks signatures.

The signature is checked first: until then nothing in quote.msg is trusted.  Then the magic
(TPM_GENERATED_VALUE: only the TPM makes such a message with a restricted key), the type
(a quote), the nonce, the selection (exactly the one PCR, SHA-256 bank) and the PCR digest
against the value the verifier expects (the replayed log).  Trusting the AK itself (that it
is a restricted key of a genuine TPM, e.g. by tpm2_makecredential against the EK certificate)
is the verifier's step before this one; a TPM2B_PUBLIC lets us also check its attributes.
"""

from __future__ import annotations

import dataclasses
import hashlib

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

MAX_FILE = 64 << 10
_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}


class QuoteError(Exception):
    """The quote does not check out; the message names what did not match."""


@dataclasses.dataclass(frozen=True)
class Quote:
    pcr: int
    pcr_digest: bytes
    signature: str        # rsassa, rsapss or ecdsa
    hash: str             # the signature's hash, also the PCR digest's
    nonce: bytes
    signer: bytes         # the AK's qualified name, as the TPM reports it
    ak_format: str        # "tpm2b_public" or "pem"
    ak_name: bytes | None  # from a TPM2B_PUBLIC only
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware: int


def _tss():
    try:
        from tpm2_pytss import constants, types
    except ImportError as e:
        raise QuoteError(f"checking a TPM quote needs tpm2-pytss ({e}): pip install "
                         f"verityfuse[tpm]") from None
    return constants, types


def _unmarshal(cls, data: bytes, what: str):
    try:
        obj, used = cls.unmarshal(data)
    except Exception as e:
        raise QuoteError(f"{what} is not a {cls.__name__}: {e}") from None
    if used != len(data):
        raise QuoteError(f"{what}: {len(data) - used} bytes after the {cls.__name__}")
    return obj


def load_ak_public(data: bytes, what: str = "AK public key"):
    """(public key, format, TPM name or None) from TPM2B_PUBLIC or PEM bytes."""
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm) as e:
            raise QuoteError(f"{what}: not a PEM public key: {e}") from None
        return key, "pem", None
    c, t = _tss()
    pub = _unmarshal(t.TPM2B_PUBLIC, data, f"{what} (neither PEM nor TPM2B_PUBLIC)")
    attrs = int(pub.publicArea.objectAttributes)
    need = {"restricted": c.TPMA_OBJECT.RESTRICTED, "sign": c.TPMA_OBJECT.SIGN_ENCRYPT,
            "fixedtpm": c.TPMA_OBJECT.FIXEDTPM}
    missing = [n for n, bit in need.items() if not attrs & bit]
    if missing:
        try:
            shown = str(pub.publicArea.objectAttributes)
        except ValueError:  # bits the TSS has no name for
            shown = f"0x{attrs:08x}"
        raise QuoteError(f"{what} is not an attestation key: attributes {shown} lack "
                         f"{', '.join(missing)} (only a restricted signing key that never "
                         f"leaves the TPM vouches for a quote)")
    try:  # the TSS raises ValueError for an unknown algorithm in the public area
        key = serialization.load_pem_public_key(pub.publicArea.to_pem())
        name = bytes(pub.get_name())
    except Exception as e:
        raise QuoteError(f"{what}: unsupported key: {e}") from None
    return key, "tpm2b_public", name


def _check_signature(key, sig, message: bytes) -> tuple[str, str]:
    c, t = _tss()
    alg = sig.sigAlg
    if alg == c.TPM2_ALG.RSASSA:
        name, body = "rsassa", sig.signature.rsassa
    elif alg == c.TPM2_ALG.RSAPSS:
        name, body = "rsapss", sig.signature.rsapss
    elif alg == c.TPM2_ALG.ECDSA:
        name, body = "ecdsa", sig.signature.ecdsa
    else:
        raise QuoteError(f"quote signature algorithm {alg} is not supported (rsassa, rsapss, ecdsa)")
    hname = str(body.hash)
    if hname not in _HASHES:
        raise QuoteError(f"quote signature hash {hname} is not accepted (sha256, sha384, sha512)")
    h = _HASHES[hname]
    try:
        if name == "ecdsa":
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise QuoteError(f"the quote has an ECDSA signature, the AK is {_kind(key)}")
            der = encode_dss_signature(int.from_bytes(bytes(body.signatureR), "big"),
                                       int.from_bytes(bytes(body.signatureS), "big"))
            key.verify(der, message, ec.ECDSA(h))
        else:
            if not isinstance(key, rsa.RSAPublicKey):
                raise QuoteError(f"the quote has an RSA signature, the AK is {_kind(key)}")
            pad = (padding.PKCS1v15() if name == "rsassa" else
                   padding.PSS(mgf=padding.MGF1(h), salt_length=padding.PSS.AUTO))
            key.verify(bytes(body.sig), message, pad, h)
    except (InvalidSignature, ValueError):  # ValueError: e.g. a signature of the wrong size
        raise QuoteError(f"the quote's {name}/{hname} signature does not verify with the AK "
                         f"public key (a different AK, or quote.msg/quote.sig changed)") from None
    return name, hname


def _kind(key) -> str:
    return type(key).__name__.lstrip("_")


def _selected(sel) -> list[tuple[str, int]]:
    """(bank, PCR) of every PCR a quote selects, banks named as tpm2-tools names them
    (tpm2-pytss calls SHA-1 "sha")."""
    out = []
    for s in sel.pcrSelections[:sel.count]:
        bitmap = bytes(s.pcrSelect)[:s.sizeofSelect]
        bank = "sha1" if str(s.hash) == "sha" else str(s.hash)
        out += [(bank, 8 * i + j) for i, b in enumerate(bitmap) for j in range(8) if b >> j & 1]
    return out


def verify_quote(message: bytes, signature: bytes, ak_public: bytes, nonce: bytes, pcr: int,
                 pcr_value: bytes) -> Quote:
    """Check everything listed in the module docstring; QuoteError names the first mismatch."""
    c, t = _tss()
    for what, data in (("quote message", message), ("quote signature", signature),
                       ("AK public key", ak_public)):
        if len(data) > MAX_FILE:
            raise QuoteError(f"{what} is larger than {MAX_FILE} bytes")
    key, ak_format, ak_name = load_ak_public(ak_public)
    sig = _unmarshal(t.TPMT_SIGNATURE, signature, "quote signature")
    attest = _unmarshal(t.TPMS_ATTEST, message, "quote message")
    sig_name, hname = _check_signature(key, sig, message)
    if int(attest.magic) != int(c.TPM2_GENERATED.VALUE):
        raise QuoteError(f"quote magic is 0x{int(attest.magic):08x}, not TPM_GENERATED_VALUE "
                         f"0xff544347")
    if attest.type != c.TPM2_ST.ATTEST_QUOTE:
        raise QuoteError(f"the attestation is of type {attest.type}, not a quote")
    got_nonce = bytes(attest.extraData)
    if got_nonce != nonce:
        raise QuoteError(f"quote nonce mismatch: expected {nonce.hex()}, the quote has "
                         f"{got_nonce.hex() or '(none)'} (a replayed or foreign quote)")
    quote = attest.attested.quote
    selected = _selected(quote.pcrSelect)
    if selected != [("sha256", pcr)]:
        shown = ", ".join(f"{a}:{i}" for a, i in selected) or "nothing"
        raise QuoteError(f"the quote selects {shown}; expected exactly sha256:{pcr} "
                         f"(tpm2_quote -l sha256:{pcr})")
    want = hashlib.new(hname, pcr_value).digest()
    got = bytes(quote.pcrDigest)
    if got != want:
        raise QuoteError(f"quoted PCR digest mismatch: PCR {pcr} = {pcr_value.hex()} (the "
                         f"replayed log) gives {want.hex()}, the quote has {got.hex()}")
    ci = attest.clockInfo
    return Quote(pcr=pcr, pcr_digest=got, signature=sig_name, hash=hname, nonce=got_nonce,
                 signer=bytes(attest.qualifiedSigner), ak_format=ak_format, ak_name=ak_name,
                 clock=int(ci.clock), reset_count=int(ci.resetCount),
                 restart_count=int(ci.restartCount), safe=bool(ci.safe),
                 firmware=int(attest.firmwareVersion))
