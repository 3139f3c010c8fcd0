"""What a mount does after it finds tampering: tell the verifier, and (optionally) stop.

In manifest mode the first integrity failure of each listed file extends one
``IntegrityViolation`` event (manifest digest, path, offset) into the mount's
measurement register, so every later quote shows that this guest saw tampering.
Bounded: one event per manifest path, and the paths are the manifest's own (never a
name the host chose), so a flood of failing reads costs at most one extend per file.

``on_corruption`` follows dm-verity's choice between carrying on and stopping:
``eio`` (default) fails the damaged blocks only, as the kernel does; ``refuse`` answers
EIO to every open after the first violation, so a workload never runs on a tree known to
be under attack.  A violation that cannot be measured also stops the mount's opens: a
verifier could no longer see what happened (fail closed).

Pure: no pyfuse3, no trio; ``record`` blocks (a TPM extend), so the caller runs it off
the request thread.
"""

from __future__ import annotations

import logging
import threading
from typing import Optional, Set

from .logs import escape

log = logging.getLogger("verityfuse")

MODES = ("eio", "refuse")


class Tripwire:
    def __init__(self, manifest_digest: Optional[str], measurer=None, mode: str = "eio"):
        if mode not in MODES:
            raise ValueError(f"on_corruption: {mode!r} is not one of {', '.join(MODES)}")
        self.manifest_digest = manifest_digest
        self.measurer = measurer  # None: nothing to extend (no --measure)
        self.mode = mode
        self.tripped = False      # a violation was seen (or could not be measured)
        self.measured = 0         # IntegrityViolation events extended
        self.unmeasured = 0       # ... and those that failed to extend
        self._seen: Set[str] = set()
        self._lock = threading.Lock()

    @property
    def refusing(self) -> bool:
        """Whether opens are answered EIO from now on."""
        return self.tripped and (self.mode == "refuse" or self.unmeasured > 0)

    def first_time(self, path: str) -> bool:
        """Mark ``path`` as violated; True the first time only (cheap, on the request thread)."""
        with self._lock:
            if not self.tripped and self.mode == "refuse":
                log.warning("integrity violation (%s): on_corruption=refuse, every open fails "
                            "with EIO from now on", escape(path))
            self.tripped = True
            if path in self._seen:
                return False
            self._seen.add(path)
            return self.measurer is not None

    def record(self, path: str, offset: Optional[int]) -> None:
        """Extend the violation of ``path`` (after ``first_time`` said so).  Never raises:
        a failure is logged and stops the mount's opens."""
        from . import measure_event
        from .measure_registers import failure_text

        try:
            self.measurer.record(
                measure_event.integrity_violation(self.manifest_digest or "", path, offset))
        except Exception as e:  # MeasureError, or any other: never a daemon's end
            why = failure_text(e)
            with self._lock:
                self.unmeasured += 1
            log.error("cannot measure the integrity violation of %s: %s; refusing every open "
                      "from now on (a verifier could not see it)", escape(path), escape(why))
            return
        with self._lock:
            self.measured += 1
        log.warning("integrity violation of %s measured into %s", escape(path),
                    self.measurer.register.name)

    def snapshot(self) -> dict:
        register = getattr(self.measurer, "register", None)  # (the status never fails)
        with self._lock:
            return {"on_corruption": self.mode, "tripped": self.tripped,
                    "register": getattr(register, "name", None),
                    "event_log": getattr(self.measurer, "log_path", None),
                    "violations_measured": self.measured, "violations_unmeasured": self.unmeasured,
                    "refusing_opens": self.refusing}
