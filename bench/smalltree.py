"""The container-start tree: many small files a few directories deep, as an image has.

Sizes 0-16 KiB, drawn once per run from a fixed seed: 3% empty files (markers,
``__init__.py``, ``.keep``), the rest log-normal around a 2 KiB median (scripts,
headers, configuration, small modules), clipped to 16 KiB: about three quarters
of the files fit in one 4 KiB block (no tree block: the digest covers the
block), a tenth are over two blocks (one tree block to fetch and verify).  The layout is
``dNN/dNN/dNN/fNNNNN``: 100 files per leaf directory, up to three levels of 10
directories each, deeper than flat but without a huge directory.
"""

from __future__ import annotations

import math
import os
import random

MAX_SIZE = 16 * 1024
PER_DIR = 100


def sizes(count: int, seed: int = 19):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        if rng.random() < 0.03:
            out.append(0)
        else:
            out.append(min(MAX_SIZE, max(1, int(rng.lognormvariate(math.log(2048), 1.1)))))
    return out


def relpaths(count: int):
    """``count`` relative file paths, 100 per leaf directory, three levels of 10."""
    out = []
    for i in range(count):
        leaf = i // PER_DIR
        out.append(os.path.join(f"d{leaf // 100 % 10:02d}", f"d{leaf // 10 % 10:02d}",
                                f"d{leaf % 10:02d}" + ("" if leaf < 1000 else f"-{leaf // 1000}"),
                                f"f{i:06d}"))
    return out


def create(root: str, count: int, seed: int = 19):
    """Write the tree under ``root`` (created); returns (relative paths, their sizes)."""
    names = relpaths(count)
    out_sizes = sizes(count, seed)
    made = set()
    data = os.urandom(MAX_SIZE * 64)  # sliced at random offsets: distinct contents, cheap
    rng = random.Random(seed + 1)
    for rel, size in zip(names, out_sizes):
        d = os.path.dirname(rel)
        if d not in made:
            os.makedirs(os.path.join(root, d), exist_ok=True)
            made.add(d)
        off = rng.randrange(len(data) - MAX_SIZE)
        with open(os.path.join(root, rel), "wb") as f:
            # The first 8 bytes are the file's number, so no two files share a digest
            # (a content-addressed store would otherwise serve them from one object).
            f.write((rng.getrandbits(64).to_bytes(8, "little") + data[off:off + size])[:size])
    return names, out_sizes


def sample(names, fraction: float, seed: int):
    """A random ``fraction`` of ``names`` (at least one), in a random order."""
    rng = random.Random(seed)
    return rng.sample(names, max(1, round(len(names) * fraction)))
