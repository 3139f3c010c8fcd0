"""What a measured mount does beyond serving (no pyfuse3/trio): the MountManifest event
recorded once the mount exists, the Tripwire that measures integrity violations, the
UnmountManifest event once it no longer serves, and the files the daemon writes (which
must not lie under its own mount point)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .logs import escape
from .mountopts import MountError, Settings

if TYPE_CHECKING:
    from .mount_trust import Trust

log = logging.getLogger("verityfuse")


def measure_mount(mountpoint: str, s: Settings, trust: "Trust"):
    """A measured mount records its MountManifest event once it is mounted and before it
    serves anything (a failed extend fails the mount: closed, as an image pull is);
    returns the mount's Tripwire, which measures violations into the same register and
    log.  ``serve`` has checked that a measured mount has a manifest."""
    from .tripwire import Tripwire

    m = trust.manifest
    if not s.measure or m is None:
        return Tripwire(m.digest if m else None, None, s.on_corruption)
    from . import measure_event
    from .measure import Measurer
    from .measure_registers import MeasureError, open_register

    # protocol/attestation.md: what authenticated the manifest and what the mount enforces.
    trust_by = "+".join(w for w, on in (("pinned", s.manifest_digest), ("key", s.trust_key)) if on)
    policy = (f"min_sequence={s.min_sequence or 0},on_corruption={s.on_corruption},"
              f"trust={trust_by}")
    try:
        register = open_register(s.measure)
        measurer = Measurer(register, s.event_log)
        measurer.record(measure_event.mount_manifest(m.digest, m.key_id, m.sequence, policy,
                                                     mountpoint))
    except MeasureError as e:
        raise MountError(f"refusing to mount: the measurement failed ({e})") from None
    log.info("measured manifest %s (sequence %d) into %s; event log %s", m.digest, m.sequence,
             register.name, measurer.log_path)
    return Tripwire(m.digest, measurer, s.on_corruption)


def measure_unmount(mountpoint: str, tripwire) -> None:
    """A measured mount whose kernel mount is gone records its UnmountManifest event, so
    that a quote taken later shows the manifest no longer served there.  Never raises
    (the mount is gone either way): a failure is logged, and the log and the register
    still agree (Measurer.record)."""
    if tripwire.measurer is None:
        return
    from . import measure_event
    from .measure_registers import failure_text

    digest, register = tripwire.manifest_digest, tripwire.measurer.register.name
    try:
        tripwire.measurer.record(measure_event.unmount_manifest(digest, mountpoint))
    except Exception as e:  # MeasureError, or any other: the daemon still ends cleanly
        log.error("cannot measure the unmount of manifest %s from %s into %s: %s (a verifier "
                  "replaying the log takes it for still mounted)", digest, escape(mountpoint),
                  register, escape(failure_text(e)))
        return
    log.info("measured the unmount of manifest %s from %s into %s", digest,
             escape(mountpoint), register)


def files_written(s: Settings):
    """(what, path) of each file the daemon writes: its log, a measured mount's event log
    and an emulated register."""
    if s.log_file:
        yield "log file", s.log_file
    if s.measure:
        from .measure import default_log_path
        from .measure_registers import FileRegister, MeasureError, open_register
        try:
            register = open_register(s.measure)
        except MeasureError as e:
            raise MountError(f"refusing to mount: {e}") from None
        yield "event log", s.event_log or default_log_path(register)
        if isinstance(register, FileRegister):
            yield "register file", register.path
