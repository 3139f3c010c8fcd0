"""Memory the host has backed, before every timed pass.

On a VM whose balloon device reports free pages (virtio-balloon's
VIRTIO_BALLOON_F_REPORTING, the default of several hypervisors), memory the
guest frees goes back to the host a couple of seconds later, and the guest's
next first touch of such a page costs the host a fault.  On this project's VM
that was ~9 us a page (populating 18 GiB: 2.8 s a GiB the first time, 0.5 s
the second), and a pass whose page cache happened to get such pages was 2-4x
slower than the same pass on pages the host still backed: reading the 1 GiB
file through verityfuse took 1.2-2.2 s of system time in the daemon's reply
copy instead of 0.2 (`perf`: memcpy into the new page-cache folios), 423-702
MB/s instead of ~2100, and the plain passthrough had such passes too.  Which
pass got them was chance: it widened every min-max and moved medians.

So right before a pass the bench maps and populates ``nbytes`` of anonymous
memory and frees it at once: what the pass then allocates comes from pages the
host backs (freed pages are reused first; they are reported only after a
delay).  It costs ~0.35 s a GiB when the host still backs them, more when it
does not, outside the timed pass; it is bounded by what the kernel says is
available, minus a margin, so it never pushes anything out.
"""

from __future__ import annotations

import glob
import mmap
import os
import time
from typing import Optional

MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)
MARGIN = 2 << 30  # left available to everything else
_REPORTING_BIT = 5  # VIRTIO_BALLOON_F_REPORTING
_BALLOON_ID = 5     # virtio device id of a balloon

WARM = {"bytes": 0, "seconds": 0.0, "passes": 0}


def free_page_reporting() -> str:
    """"on" if a virtio balloon reporting free pages to the host is bound, "off" if a
    balloon is there without it, "no balloon" otherwise."""
    for dev in glob.glob("/sys/bus/virtio/devices/*"):
        try:
            with open(os.path.join(dev, "device")) as f:
                if int(f.read().strip(), 16) != _BALLOON_ID:
                    continue
            with open(os.path.join(dev, "features")) as f:
                bits = f.read().strip()
        except (OSError, ValueError):
            continue
        return "on" if len(bits) > _REPORTING_BIT and bits[_REPORTING_BIT] == "1" else "off"
    return "no balloon"


def available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def warm(nbytes: Optional[int] = None) -> float:
    """Populate and free up to ``nbytes`` (default WARM["bytes"]) of memory; seconds spent."""
    nbytes = WARM["bytes"] if nbytes is None else nbytes
    nbytes = min(nbytes, available() - MARGIN) // mmap.PAGESIZE * mmap.PAGESIZE
    if nbytes <= 0:
        return 0.0
    t0 = time.perf_counter()
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_POPULATE)
    m.close()
    spent = time.perf_counter() - t0
    WARM["seconds"] += spent
    WARM["passes"] += 1
    return spent
