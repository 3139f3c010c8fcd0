"""Command line for remote verifiers: `verityfuse attest replay LOG ...` (docs/attestation.md).

Exit status: 0 the log matches the register or quote and every expectation holds; 1 it does
not (the output says which check failed); 2 usage error or an input file that cannot be read.
"""

from __future__ import annotations

import argparse
import re

from . import measure_event as me
from .jsonout import emit, error

EXIT_USAGE = 2


def _hex(what: str):
    def conv(text: str) -> bytes:
        try:
            if not text or len(text) % 2:
                raise ValueError
            return bytes.fromhex(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}: {text!r} is not an even number of hex "
                                             f"digits") from None
    return conv


def _manifest_digest(text: str) -> str:
    # What a MountManifest can name (measure_event: manifests are sha256-addressed): an
    # expectation of another algorithm would only ever fail, later and less clearly.
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a manifest digest (sha256:<64 "
                                         f"lowercase hex digits>, see measure-manifest)")
    return text


def _key_id(text: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a key id (64 lowercase hex digits: "
                                         f"the SHA-256 of the raw Ed25519 public key)")
    return text


def _int_range(lo: int, hi: int, what: str):
    def conv(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or not lo <= int(text) <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be an integer from {lo} to {hi}")
        return int(text)
    return conv


def cmd_replay(args) -> int:
    # Here, not at the top: it needs cryptography (~20 ms to import), and every other
    # command builds this module's parser.
    from . import attest_replay as ar

    quote_opts = (args.signature, args.ak_public, args.nonce)
    if args.quote is None and any(o is not None for o in quote_opts):
        return _usage("--signature, --ak-public and --nonce go with --quote")
    if args.quote is not None and any(o is None for o in quote_opts):
        return _usage("--quote needs --signature, --ak-public and --nonce")
    if args.register is not None and args.quote is not None:
        # Checking one would pass a log the other does not vouch for: a register value
        # copied from untrusted evidence would stand in for a quote nobody verified.
        return _usage("--register and --quote are two ways to say what the log must match: "
                      "give one")
    if args.pcr is not None and args.quote is None:
        return _usage("--pcr goes with --quote")
    if args.register is None and args.quote is None:
        return _usage("give what the log must match: --register HEX, or --quote with "
                      "--signature, --ak-public and --nonce")
    quote = None
    if args.quote is not None:
        quote = ar.QuoteFiles(args.quote, args.signature, args.ak_public, args.nonce,
                              23 if args.pcr is None else args.pcr)
    exp = ar.Expectations(manifests=list(args.expect_manifest or ()),
                          keys=list(args.expect_key or ()),
                          min_sequence=args.min_sequence, allow_violations=args.allow_violations,
                          allow_init=args.allow_init, mounted=args.expect_mounted)
    try:
        report, status = ar.replay(args.log, exp, register=args.register, quote=quote)
    except ar.InputError as e:
        error(str(e))
        return EXIT_USAGE
    if args.json:
        emit(report)
    else:
        print(ar.human(report), flush=True)
    return status


def _usage(msg: str) -> int:
    error(f"attest replay: {msg}")
    return EXIT_USAGE


def add_commands(sub):
    p = sub.add_parser("attest", help="verifier side of measured mounts (see `attest replay`)")
    asub = p.add_subparsers(dest="attest_command", required=True, metavar="COMMAND")
    r = asub.add_parser(
        "replay", help="replay an event log against a register value or a TPM quote, and "
        "appraise its events",
        description="Recompute the register from LOG, compare it with --register or a TPM "
        "quote, print the events and appraise them. Exit 0 only when the log matches and "
        "every expectation holds; 1 when not; 2 on usage errors or unreadable files.")
    r.add_argument("log", metavar="LOG", help="the event log (AAEL text) the guest kept")
    r.add_argument("--register", type=_hex("--register"), metavar="HEX",
                   help="the register's value, as the verifier got it from trusted evidence")
    r.add_argument("--quote", metavar="quote.msg", help="TPMS_ATTEST from tpm2_quote -m")
    r.add_argument("--signature", metavar="quote.sig", help="TPMT_SIGNATURE from tpm2_quote -s")
    r.add_argument("--ak-public", metavar="ak.pub",
                   help="the trusted AK public key: TPM2B_PUBLIC (tpm2_createak -u) or PEM")
    r.add_argument("--nonce", type=_hex("--nonce"), metavar="HEX",
                   help="the nonce the verifier sent (tpm2_quote -q)")
    r.add_argument("--pcr", type=_int_range(0, 23, "--pcr"),
                   help="the quoted PCR, SHA-256 bank (default 23; with --quote only)")
    r.add_argument("--expect-manifest", type=_manifest_digest, action="append",
                   metavar="sha256:HEX", help="a manifest a mount may serve (repeatable): every "
                   "MountManifest event must name one")
    r.add_argument("--expect-key", type=_key_id, action="append", metavar="KEY_ID",
                   help="a manifest signing key a mount may trust (repeatable): every "
                   "MountManifest event must name one (see `verityfuse keygen`)")
    r.add_argument("--min-sequence", type=_int_range(0, me.MAX_INT, "--min-sequence"),
                   metavar="N", help="every MountManifest event must have sequence >= N")
    r.add_argument("--expect-mounted", action="store_true",
                   help="a measured mount must still be served at the log's end: a "
                   "MountManifest event that no UnmountManifest of its manifest and mount "
                   "point follows")
    r.add_argument("--allow-violations", action="store_true",
                   help="report IntegrityViolation events as warnings, not failures")
    r.add_argument("--allow-init", type=_hex("--allow-init"), metavar="HEX",
                   help="accept a log whose INIT value is HEX (default: only zero)")
    r.add_argument("--json", action="store_true", help="one JSON object (\"schema\": 1)")
    r.set_defaults(func=cmd_replay)
