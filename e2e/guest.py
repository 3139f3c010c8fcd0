"""The guest side of ``make e2e``: runs inside the Linux guest, started by
e2e/guest-init.sh, with the repository's own venv (the guest's root is the
host's / over virtio-fs).

It mounts the virtio-fs share with verityfuse in manifest mode (pinned digest,
trusted key, --policy require), runs the checks of tests/manifest_attacks.py
that need no attack, then for each attack: does the attack's ``prepare``,
writes ``ready-<n>`` to the control share, waits for the host's ``done-<n>``,
runs the check and appends a result line (JSON) to ``results``.  At the end it
checks that every untouched file reads back identical, unmounts, and copies
the daemon's log to the control share.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import manifest_attacks as ma  # noqa: E402
from verityfuse.testing import VerifiedMount  # noqa: E402

SHARE = Path("/run/e2e/share")  # the untrusted virtio-fs share (tag "share")
CTL = Path("/run/e2e/ctl")      # steps and results (tag "ctl")
MNT = Path("/run/e2e/mnt")      # the verified view


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
    # What the guest image trusts: the public key and the pinned manifest digest.
    trust = json.loads((run / "trust.json").read_text())
    # What the host computed before any attack: the oracle for the checks.
    exp = json.loads((CTL / "expected.json").read_text())
    m = None
    try:
        t0 = time.monotonic()
        try:
            m = VerifiedMount(SHARE, MNT, policy="require", extra_args=ma.mount_args(SHARE, trust),
                              timeout=args.step_timeout)
        except Exception as e:
            results.add("mount", False, f"{type(e).__name__}: {e}", time.monotonic() - t0)
            return 1
        results.add("mount", True, f"mounted in {time.monotonic() - t0:.1f} s", time.monotonic() - t0)
        # Under TCG the daemon is ~40x slower: give it longer to process the FORGETs.
        ctx = ma.Ctx(mnt=MNT, source=SHARE, exp=exp, log=m.log,
                     drop_caches=lambda: ma.drop_caches(settle=1.0))
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
            put(f"ready-{n}", a.name + "\n")
            done = wait_for(CTL / f"done-{n}", args.step_timeout).strip()
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
        return 0
    finally:
        if m is not None:
            code = m.unmount()
            print(f"e2e-guest: verityfuse exited with {code}", flush=True)
            (CTL / "verityfuse.log").write_text(m.log())
        put("finished", "\n")


if __name__ == "__main__":
    sys.exit(main())
