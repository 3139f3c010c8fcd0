"""The guest side of ``make e2e``: runs inside the Linux guest, started by
e2e/guest-init.sh, with the host's interpreter and this checkout (the guest's
root is the host's / over virtio-fs).

It creates a TPM attestation key, mounts the virtio-fs share with verityfuse in
manifest mode (pinned digest, trusted key, --policy require) measured into PCR 23
(``--measure tpm``), runs the checks of tests/manifest_attacks.py that need no
attack, then for each attack: does the attack's ``prepare``, writes ``ready-<n>``
to the control share, waits for the host's ``done-<n>``, runs the check and
appends a result line (JSON) to ``results``.  Then it checks that every
untouched file reads back identical, quotes PCR 23 with the host's nonce and
copies the quote, the AK and the event log to the control share for the host
(the verifier), unmounts, and quotes again with another nonce (the unmount is
measured: the verifier must see the manifest no longer served).  Last, the host puts back an older signed
manifest, and a mount that requires the current sequence must refuse it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import guest_tpm  # noqa: E402
import plan  # noqa: E402
from plan import ma  # noqa: E402
from verityfuse.testing import VerifiedMount  # noqa: E402

SHARE = Path("/run/e2e/share")  # the untrusted virtio-fs share (tag "share")
CTL = Path("/run/e2e/ctl")      # steps and results (tag "ctl")
MNT = Path("/run/e2e/mnt")      # the verified view
WORK = Path("/run/e2e/tpm")     # the TPM tools' files and the event log (guest memory)


def put(name: str, text: str):
    """Write a control file atomically (the host polls for it)."""
    tmp = CTL / f".{name}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, CTL / name)


class Results:
    def __init__(self):
        self.f = open(CTL / "results", "a")

    def add(self, check: str, ok: bool, detail: str, seconds: float, **extra):
        line = dict(check=check, ok=ok, detail=detail, seconds=round(seconds, 2), **extra)
        self.f.write(json.dumps(line) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        print(f"e2e-guest: {'PASS' if ok else 'FAIL'} {check}: {detail}", flush=True)


def run_check(results: Results, name: str, fn, **extra):
    t0 = time.monotonic()
    try:
        detail = fn() or ""
        ok = True
    except ma.Failed as e:
        ok, detail = False, str(e)
    except Exception as e:  # an unexpected error is a failure too, with its traceback on the console
        traceback.print_exc()
        ok, detail = False, f"error: {type(e).__name__}: {e}"
    results.add(name, ok, detail, time.monotonic() - t0, **extra)
    return ok


def wait_for(path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path.name} from the host after {timeout:.0f} s")
        time.sleep(0.05)
    return path.read_text()


def close_state(ctx):
    for fd in list(ctx.state.pop("fds", {}).values()) + [ctx.state.pop("fd", None)]:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def step(n: int, name: str, timeout: float) -> str:
    """Tell the host to act (step n, ``name``) and wait until it did."""
    put(f"ready-{n}", name + "\n")
    return wait_for(CTL / f"done-{n}", timeout).strip()


def measured_args(trust: dict) -> list:
    return ma.mount_args(SHARE, trust) + ["--measure", "tpm", "--event-log", str(WORK / plan.EVENT_LOG)]


def attacks(results: Results, ctx, timeout: float):
    touched = set()
    for c in ma.BASELINE:
        run_check(results, c.name, lambda: c.run(ctx))
        touched |= set(c.touches)
    for n, a in enumerate(ma.ATTACKS):
        ctx.state = {}
        ctx.mark_log()
        prep_error = None
        if a.prepare:
            try:
                a.prepare(ctx)
            except Exception as e:
                traceback.print_exc()
                prep_error = f"prepare: {type(e).__name__}: {e}"
        done = step(n, a.name, timeout)
        excluded = touched | set(a.touches)

        def check():
            if prep_error:
                raise ma.Failed(prep_error)
            detail = a.check(ctx) or ""
            ma.check_read_all(ctx, exclude=excluded)
            return detail + ("; " if detail else "") + "untouched files identical"

        try:
            run_check(results, a.name, check, host=done)
        finally:
            close_state(ctx)
        touched = excluded
    run_check(results, ma.FINAL, lambda: ma.check_read_all(ctx, exclude=touched))


def rollback(trust: dict, timeout: float) -> str:
    """The host put back the manifest it signed before the current one (same key).
    A mount that trusts the key and requires the current sequence must refuse it,
    naming both sequence numbers; requiring only the old sequence mounts it (so the
    refusal was the sequence's)."""
    if "sequence" not in trust:
        raise ma.Failed(f"the host could not prepare an older manifest: {trust.get('rollback_error')}")
    old, new = trust["old_sequence"], trust["sequence"]
    by_key = ["--manifest", str(SHARE / trust["manifest"]), "--trust-key", trust["pub"]]
    try:
        m = VerifiedMount(SHARE, MNT, policy="require", timeout=timeout,
                          extra_args=by_key + ["--min-sequence", str(new)])
    except RuntimeError as e:
        message = str(e)
    else:
        m.unmount()
        raise ma.Failed(f"the manifest of sequence {old} mounted with --min-sequence {new}")
    first = message.strip().splitlines()[0] if message.strip() else ""
    missing = [str(v) for v in (old, new) if str(v) not in message]
    if missing:
        raise ma.Failed(f"refused, but the message does not name {' and '.join(missing)}: {message[:300]}")
    m = VerifiedMount(SHARE, MNT, policy="require", timeout=timeout,
                      extra_args=by_key + ["--min-sequence", str(old)])
    m.unmount()
    return f"refused ({first[:200]}); with --min-sequence {old} it mounts"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="the host's run directory (read through the root)")
    ap.add_argument("--step-timeout", type=float, default=120)
    args = ap.parse_args()
    run = Path(args.run)
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    put("booted", f"{uptime}\n")
    results = Results()
    # What the guest image trusts: the public key, the pinned manifest digest, the
    # minimum sequence.
    trust = json.loads((run / "trust.json").read_text())
    # What the host computed before any attack: the oracle for the checks.
    exp = json.loads((CTL / "expected.json").read_text())
    m = None
    try:
        try:
            if not run_check(results, "tpm", tpm_ready):
                return 1
            t0 = time.monotonic()
            try:
                m = VerifiedMount(SHARE, MNT, policy="require", extra_args=measured_args(trust),
                                  timeout=args.step_timeout)
            except Exception as e:
                results.add("mount", False, f"{type(e).__name__}: {e}", time.monotonic() - t0)
                return 1
            results.add("mount", True, f"measured mount in {time.monotonic() - t0:.1f} s; PCR 23 = "
                        f"{guest_tpm.read_pcr(WORK)}", time.monotonic() - t0)
            # Under TCG the daemon is ~40x slower: give it longer to process the FORGETs.
            ctx = ma.Ctx(mnt=MNT, source=SHARE, exp=exp, log=m.log,
                         drop_caches=lambda: ma.drop_caches(settle=1.0))
            attacks(results, ctx, args.step_timeout)
            nonce = (CTL / plan.NONCE).read_text().strip()
            run_check(results, "quote", lambda: evidence(nonce))
        finally:
            if m is not None:
                code = m.unmount()
                print(f"e2e-guest: verityfuse exited with {code}", flush=True)
                (CTL / "verityfuse.log").write_text(m.log())
        # The unmount is measured too: a quote taken now shows the manifest no longer served.
        nonce_after = (CTL / plan.NONCE_AFTER).read_text().strip()
        run_check(results, "quote-after-unmount",
                  lambda: evidence(nonce_after, plan.EVIDENCE_AFTER))
        step(len(ma.ATTACKS), plan.ROLLBACK, args.step_timeout)
        run_check(results, "rollback-refused", lambda: rollback(trust, args.step_timeout))
        return 0
    finally:
        put("finished", "\n")


def tpm_ready() -> str:
    guest_tpm.wait_for_device()
    detail = guest_tpm.create_keys(WORK)
    return f"{detail}; PCR 23 before the mount = {guest_tpm.read_pcr(WORK)}"


def evidence(nonce: str, where: str = plan.EVIDENCE) -> str:
    """The quote, the AK and the event log, for the verifier on the host."""
    dest = CTL / where
    detail = guest_tpm.quote(WORK, nonce, dest)
    shutil.copyfile(WORK / plan.EVENT_LOG, dest / plan.EVENT_LOG)
    lines = (dest / plan.EVENT_LOG).read_text().count("\n")
    return f"{detail}; event log of {lines} lines copied"


if __name__ == "__main__":
    sys.exit(main())
