#!/usr/bin/env python3
"""verityfuse as a library: digests, sealing, verifying and verified reads, no FUSE.

    python examples/library.py            # works as any user; needs no mount

Every digest is byte for byte what `fsverity digest` prints, and open_verified()
checks each read exactly as a mount does.
"""

import os
import tempfile

import verityfuse

with tempfile.TemporaryDirectory() as tree:
    with open(os.path.join(tree, "app.bin"), "wb") as f:
        f.write(os.urandom(300_000))
    with open(os.path.join(tree, "config"), "w") as f:
        f.write("db_url = postgres://trusted\n")

    print("digest:", verityfuse.digest(os.path.join(tree, "config")))
    for path, d in sorted(verityfuse.seal(tree).items()):   # trees into tree/.verityfuse
        print(f"sealed {path}: {d}")

    with verityfuse.open_verified(os.path.join(tree, "config")) as f:
        print("verified read:", f.read().decode().strip())

    with open(os.path.join(tree, "app.bin"), "r+b") as f:   # corrupt one byte of block 10
        old = os.pread(f.fileno(), 1, 10 * 4096 + 7)[0]
        os.pwrite(f.fileno(), bytes([old ^ 0xFF]), 10 * 4096 + 7)  # inverted: never the same
    report = verityfuse.verify(tree)
    for r in report:
        print(f"verify {r.path}: {r.status}{': ' + r.message if r.message else ''}")
    with verityfuse.open_verified(os.path.join(tree, "app.bin")) as f:
        print("block 9 reads:", len(f.read_at(9 * 4096, 4096)), "bytes")
        try:
            f.read_at(10 * 4096, 4096)
        except OSError as e:
            print("block 10:", e.strerror, "(as a read on a mount would fail)")
