"""What the host (e2e/run.py) and the guest (e2e/guest.py) of ``make e2e`` agree on:
the checks the guest reports, the steps where the host acts, and the files on
the control share ("ctl")."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import manifest_attacks as ma  # noqa: E402

# The steps where the guest writes ready-<n> and waits for the host's done-<n>:
# each attack, then the host putting back the older signed manifest.
ROLLBACK = "rollback"
STEPS = [a.name for a in ma.ATTACKS] + [ROLLBACK]

# The guest's checks, in the order it reports them.
GUEST_CHECKS = ["tpm", "mount"] + ma.CHECK_NAMES + ["quote", "quote-after-unmount",
                                                    "rollback-refused"]

NONCE = "nonce"          # ctl/nonce: the verifier's nonce, hex, for the quote
EVIDENCE = "attest"      # ctl/attest/: quote.msg, quote.sig, pcrs.out, ak.pub, ak.pem, events.log
NONCE_AFTER = "nonce-after"      # ctl/nonce-after: another nonce, for a quote after the unmount
EVIDENCE_AFTER = "attest-after"  # ctl/attest-after/: that quote's evidence
EVENT_LOG = "events.log"
