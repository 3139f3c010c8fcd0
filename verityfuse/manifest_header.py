"""The manifest payload's header line: format, version, sequence, expiry (pure, stdlib).

    {"expires":"2027-01-01T00:00:00Z","format":"verityfuse-manifest","sequence":7,"version":2}

``sequence`` is the manifest's version number, raised by every `seal --manifest`:
a guest (``--min-sequence``) or a remote verifier refuses a manifest older than
the newest it knows of, so that a key that signed an old manifest cannot be
replayed forever.  ``expires`` bounds how long a manifest stays usable at all.
Both are inside the signed payload, so only the signer sets them.

Every number must be an exact JSON integer (``2.0`` and ``true`` are not ``2``):
one tree with the same header has exactly one payload and one digest.  Times
have one spelling too, ``YYYY-MM-DDTHH:MM:SSZ`` (RFC 3339, UTC, whole seconds).
"""

from __future__ import annotations

import calendar
import json
import re
import time
from dataclasses import dataclass
from typing import Optional

from .errors import ManifestError

FORMAT = "verityfuse-manifest"
VERSION = 2
KEYS = ("format", "version", "sequence", "expires")
# The largest integer an RFC 8785 (JSON) number holds exactly: a measured mount records the
# sequence in an attestation event (measure_event.MAX_INT), so every manifest can be measured.
MAX_SEQUENCE = (1 << 53) - 1
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
TIME_RANGE = (0, calendar.timegm((9999, 12, 31, 23, 59, 59)))  # 1970 to 9999: one spelling each
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
CONVERT_HINT = ("re-create it from the source tree with `verityfuse seal SOURCE --manifest M "
                "--sign-key KEY.pem` (version 2 records every directory, file and symlink)")


@dataclass(frozen=True)
class Header:
    sequence: int = 0               # 0: written before sequences existed
    expires: Optional[int] = None   # Unix seconds (UTC); None: never


# -- times ------------------------------------------------------------------------

def format_time(t: int) -> str:
    return time.strftime(TIME_FORMAT, time.gmtime(t))


def parse_time(text: str) -> int:
    """Unix seconds of ``YYYY-MM-DDTHH:MM:SSZ``; ValueError for anything else (an
    offset, fractions, a day or second that does not exist, a year outside 1970-9999)."""
    if type(text) is not str or not _TIME.fullmatch(text):
        raise ValueError(f"{text!r} is not a UTC time YYYY-MM-DDTHH:MM:SSZ")
    try:
        t = calendar.timegm(time.strptime(text, TIME_FORMAT))
    except ValueError:
        raise ValueError(f"{text!r} is not a valid time") from None
    if not TIME_RANGE[0] <= t <= TIME_RANGE[1] or format_time(t) != text:  # e.g. second 60
        raise ValueError(f"{text!r} is not a valid time between 1970 and 9999")
    return t


def parse_expiry(text: str, now: int) -> Optional[int]:
    """`seal --expires WHEN`: a duration from ``now`` (``90m``, ``12h``, ``30d``, ``2w``,
    ``3600s``), a time ``YYYY-MM-DDTHH:MM:SSZ``, or ``never`` (None)."""
    if text == "never":
        return None
    m = re.fullmatch(r"([0-9]{1,12})([smhdw])", text)
    t = now + int(m.group(1)) * _UNITS[m.group(2)] if m else None
    if t is None:
        try:
            t = parse_time(text)
        except ValueError:
            if _TIME.fullmatch(text):
                raise  # the right shape, but no such time: say so
            raise ValueError(f"{text!r} is neither a duration (90m, 12h, 30d, 2w) nor a UTC time "
                             f"YYYY-MM-DDTHH:MM:SSZ nor 'never'") from None
    if t <= now:
        raise ValueError(f"{format_time(t)} is not in the future (now {format_time(now)})")
    if t > TIME_RANGE[1]:
        raise ValueError(f"{text!r} ends after 9999")
    return t


# -- the header line ------------------------------------------------------------------

def line(header: Header) -> str:
    """The header line (without its newline): keys sorted, no spaces; ``sequence``
    and ``expires`` only when set, so a header without them reads as before."""
    head = {"format": FORMAT, "version": VERSION}
    if header.sequence:
        head["sequence"] = header.sequence
    if header.expires is not None:
        head["expires"] = format_time(header.expires)
    return json.dumps(head, sort_keys=True, separators=(",", ":"))


def no_duplicates(pairs):
    """json's object_pairs_hook that refuses a key given twice (one JSON text, one meaning)."""
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def parse(text: str, where: str, legacy: bool = False) -> Header:
    """The header of payload ``where`` from its first line; ManifestError says what is wrong.
    ``legacy``: a version 1 header (no sequence) is sequence 0 rather than an error."""
    try:
        head = json.loads(text, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"{where}: line 1 (header): invalid JSON: {e}") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise ManifestError(f"{where}: not a {FORMAT} document")
    version = head.get("version")
    if type(version) is not int:
        raise ManifestError(f"{where}: header: version must be a JSON integer, not {version!r}")
    if version == 1 and legacy:
        return Header()
    if version == 1:
        raise ManifestError(f"{where}: manifest format version 1 lists file digests only and "
                            f"cannot describe the tree a mount serves; {CONVERT_HINT}")
    if version != VERSION:
        raise ManifestError(f"{where}: unsupported manifest version {version!r} "
                            f"(this verityfuse reads version {VERSION})")
    unknown = sorted(k for k in head if k not in KEYS)
    if unknown:
        raise ManifestError(f"{where}: header: unknown key {unknown[0]!r} (a header has "
                            f"{', '.join(KEYS)})")
    sequence = head.get("sequence", 0)
    if type(sequence) is not int or not 0 <= sequence <= MAX_SEQUENCE:
        raise ManifestError(f"{where}: header: sequence must be a JSON integer in "
                            f"[0, {MAX_SEQUENCE}], not {sequence!r}")
    expires = None
    if "expires" in head:  # null included: a header has no two ways to say "never"
        try:
            expires = parse_time(head["expires"])
        except ValueError as e:
            raise ManifestError(f"{where}: header: expires: {e}") from None
    return Header(sequence, expires)


# -- freshness ------------------------------------------------------------------------

def check_fresh(where: str, header: Header, min_sequence: int = 0,
                now: Optional[float] = None):
    """Refuse a rolled-back (sequence below ``min_sequence``) or expired manifest.
    Only for an authenticated payload: the values are the signer's."""
    if header.sequence < min_sequence:
        raise ManifestError(f"{where}: manifest sequence {header.sequence} is older than the "
                            f"minimum {min_sequence}: a rollback?")
    now = int(time.time() if now is None else now)
    if header.expires is not None and now >= header.expires:
        raise ManifestError(f"{where}: manifest expired at {format_time(header.expires)} "
                            f"(now {format_time(now)})")
