"""Regenerate protocol/vectors/attestation.json from the reference implementation.

    python protocol/make_attestation_vectors.py > protocol/vectors/attestation.json

"names": a file name's bytes (hex) and its encoded form in Content.  "events": an event's
arguments, its log line and the digest each algorithm extends (H(line)).  "logs": a whole log
text and the register value it replays to.  tests/test_attest.py recomputes every digest and
extend with hashlib alone, so the vectors do not merely agree with the code that made them.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from verityfuse import measure_event as me  # noqa: E402

M1 = "sha256:" + "4f1c5f5a0b9e6d2c3b8a7f6e5d4c3b2a19081726354453627180918a7b6c5d4e"
M2 = "sha256:" + "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
KEY = "8e1b0a6c2f4d3e5b7a9c1d0f2e4b6a8c0d2f4e6a8b0c2d4f6e8a0b2c4d6f8e0a"

NAMES = [b"plain/name-1.txt", b"a b", b"line\nfeed", "caf\u00e9".encode(), b"\xff\xfe not utf-8",
         b'quote" percent% backslash\\', b"tab\tdel\x7f"]

EVENTS = [
    ("mount, signed", "mount_manifest",
     dict(manifest_digest=M1, key_id=KEY, sequence=7, policy="min_sequence=7,on_corruption=eio,trust=key", mountpoint="/srv/app")),
    ("mount, pinned digest (no key), space in the mount point", "mount_manifest",
     dict(manifest_digest=M2, key_id=None, sequence=0, policy="min_sequence=0,on_corruption=refuse,trust=pinned", mountpoint="/mnt/my app")),
    ("violation at a block", "integrity_violation",
     dict(manifest_digest=M1, path="bin/tool", offset=8192)),
    ("violation, no block (metadata), non-ASCII name", "integrity_violation",
     dict(manifest_digest=M1, path="etc/caf\u00e9 menu\n.txt", offset=None)),
    ("unmount of the signed mount", "unmount_manifest",
     dict(manifest_digest=M1, mountpoint="/srv/app")),
]

COCO = me.Event("github.com/confidential-containers", "PullImage",
                {}, raw='{"digest":"sha256:' + "0c" * 32 + '","image":"alpine"}')


def event(fn, args):
    return getattr(me, fn)(**args)


def main():
    out = {"domain": me.DOMAIN, "names": [], "events": [], "logs": []}
    for raw in NAMES:
        out["names"].append({"bytes": raw.hex(),
                             "encoded": me.encode_name(raw.decode("utf-8", "surrogateescape"))})
    for desc, fn, args in EVENTS:
        e = event(fn, args)
        out["events"].append({"name": desc, "function": fn, "args": args, "line": e.line(),
                              "digest": {alg: me.event_digest(alg, e).hex() for alg in me.ALGS}})
    evs = [event(fn, args) for _, fn, args in EVENTS]
    for alg, init, events, desc in (
            ("sha256", bytes(32), evs[:4], "TPM PCR 23 from a fresh boot: two mounts, two violations"),
            ("sha256", bytes(32), [evs[0], evs[2], evs[4]], "a mount, a violation, its unmount"),
            ("sha384", bytes(48), evs[:1], "TDX RTMR3 from zero: one mount"),
            ("sha256", bytes(32), [evs[0], COCO, evs[2]], "merged with a CoCo PullImage event"),
            ("sha256", bytes(range(32)), evs[1:2], "non-zero INIT (the verifier must decide)")):
        text = "".join(line + "\n" for line in [me.init_line(alg, init)] + [e.line() for e in events])
        out["logs"].append({"name": desc, "algorithm": alg, "text": text,
                            "register": me.replay(alg, init, events).hex()})
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
