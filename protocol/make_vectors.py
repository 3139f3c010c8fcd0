"""Regenerate protocol/vectors/fuse_fsverity.json from the reference implementation.

    python protocol/make_vectors.py > protocol/vectors/fuse_fsverity.json

Each vector names a file (fsverity-utils' test pattern of a given size, i.e.
byte i = (i%11 + i%439 + i%1103) & 0xff, sealed with the given parameters and
signature), a request and either the exact reply or the errno.  The tests
replay them and cross-check descriptor and tree payloads with fsverity-utils.
"""

import errno
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from verityfuse import fsverity_op as op, ioctl, merkle  # noqa: E402
from verityfuse.errors import Errno  # noqa: E402


def pattern(n):
    return bytes(((i % 11) + (i % 439) + (i % 1103)) & 0xFF for i in range(n))


FILES = {
    "plain-100": dict(size=100, sealed=None),
    "sha256-4k-100000": dict(size=100000, sealed=dict(alg="sha256", block_size=4096, salt="")),
    "sha512-1k-abcd-signed": dict(size=70000, sealed=dict(alg="sha512", block_size=1024, salt="61626364"),
                                  signature="3082" + "ab" * 20),
    "sha256-4k-empty": dict(size=0, sealed=dict(alg="sha256", block_size=4096, salt="")),
}

E = op.encode_request
REQUESTS = [
    ("get descriptor", "sha256-4k-100000", E(op.OP_GET_DESCRIPTOR, 0, 256)),
    ("get descriptor, 13 bytes at 250 (short at the end)", "sha256-4k-100000", E(op.OP_GET_DESCRIPTOR, 250, 13)),
    ("read whole tree", "sha256-4k-100000", E(op.OP_READ_MERKLE_TREE, 0, 1 << 20)),
    ("read tree, 997 bytes at 997", "sha512-1k-abcd-signed", E(op.OP_READ_MERKLE_TREE, 997, 997)),
    ("read tree past its end", "sha256-4k-100000", E(op.OP_READ_MERKLE_TREE, 1 << 20, 100)),
    ("read tree of an empty file", "sha256-4k-empty", E(op.OP_READ_MERKLE_TREE, 0, 4096)),
    ("read signature", "sha512-1k-abcd-signed", E(op.OP_READ_SIGNATURE, 0, 4096)),
    ("read signature, none given", "sha256-4k-100000", E(op.OP_READ_SIGNATURE, 0, 4096)),
    ("measure, 64-byte buffer", "sha256-4k-100000", E(op.OP_MEASURE, 0, 64)),
    ("measure, sha512 into 32 bytes", "sha512-1k-abcd-signed", E(op.OP_MEASURE, 0, 32)),
    ("measure an empty file", "sha256-4k-empty", E(op.OP_MEASURE, 0, 32)),
    ("measure a non-verity file", "plain-100", E(op.OP_MEASURE, 0, 64)),
    ("descriptor of a non-verity file", "plain-100", E(op.OP_GET_DESCRIPTOR, 0, 256)),
    ("bad version", "sha256-4k-100000", E(op.OP_MEASURE, 0, 64, version=2)),
    ("undefined flag", "sha256-4k-100000", E(op.OP_MEASURE, 0, 64, flags=1)),
    ("unknown op", "sha256-4k-100000", E(99)),
    ("short header", "sha256-4k-100000", E(op.OP_MEASURE)[:20]),
    ("payload on a read", "sha256-4k-100000", E(op.OP_GET_DESCRIPTOR, 0, 256, payload=b"x")),
    ("enable sha256/4096", "plain-100",
     E(op.OP_ENABLE, 0, 128, payload=ioctl.pack_enable(merkle.Params()))),
    ("enable twice", "sha256-4k-100000",
     E(op.OP_ENABLE, 0, 128, payload=ioctl.pack_enable(merkle.Params()))),
    ("enable, hash algorithm 257", "plain-100",
     E(op.OP_ENABLE, 0, 128, payload=ioctl.pack_enable(merkle.Params())[:4] + (257).to_bytes(4, "little")
       + ioctl.pack_enable(merkle.Params())[8:])),
    ("enable, 33-byte salt", "plain-100",
     E(op.OP_ENABLE, 0, 128 + 33, payload=ioctl.pack_enable(merkle.Params())[:12] + (33).to_bytes(4, "little")
       + ioctl.pack_enable(merkle.Params())[16:] + bytes(33))),
    ("enable, size differs from payload", "plain-100",
     E(op.OP_ENABLE, 0, 100, payload=ioctl.pack_enable(merkle.Params()))),
]


def target(name):
    f = FILES[name]
    s = f["sealed"]
    params = None
    if s:
        params = merkle.Params(merkle.hash_alg(s["alg"]), s["block_size"], bytes.fromhex(s["salt"]))
    return op.MemoryTarget(pattern(f["size"]), params, bytes.fromhex(f.get("signature", "")))


def main():
    vectors = []
    for desc, fname, req in REQUESTS:
        v = {"name": desc, "file": fname, "request": req.hex()}
        try:
            v["reply"] = op.handle(req, target(fname)).hex()
        except Errno as e:
            v["errno"] = "EOPNOTSUPP" if e.errno == errno.EOPNOTSUPP else errno.errorcode[e.errno]
        vectors.append(v)
    json.dump({"version": 1, "files": FILES, "vectors": vectors}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
