"""``make e2e``'s results: what the guest reported (ctl/results), the host's verifier's
checks, and the summary with the logs worth reading when something failed."""

from __future__ import annotations

import json
from pathlib import Path

import plan
import verifier


def read_results(ctl: Path) -> dict:
    """The guest's results so far, by check name (a torn last line is skipped)."""
    out = {}
    try:
        for line in (ctl / "results").read_text().splitlines():
            try:
                r = json.loads(line)
                out[r["check"]] = r
            except ValueError:
                pass
    except FileNotFoundError:
        pass
    return out


def summary(res: dict, host, host_errors: dict, failure, logs, trailer: str) -> int:
    """Print every check (guest's, then the verifier's ``host``) with PASS/FAIL, and the
    tails of ``logs`` ((path, lines, what)) when anything failed; the exit status."""
    for name, ok, detail in host:
        res[name] = {"ok": ok, "detail": detail}
    names = plan.GUEST_CHECKS + verifier.CHECKS
    print("\ne2e summary (checks in the guest on the virtio-fs share, then the verifier's):")
    failed = []
    for name in names:
        r = res.get(name)
        if r is None:
            status, detail = "FAIL", "no result (missing)"
        else:
            status, detail = ("PASS" if r["ok"] else "FAIL"), r["detail"]
        if name in host_errors:
            status, detail = "FAIL", f"host action failed: {host_errors[name]}; {detail}"
        if status == "FAIL":
            failed.append(name)
        print(f"  {status}  {name:32} {detail[:200]}")
    if failure:
        print(f"\ne2e: {failure}")
    if failed or failure:
        for path, n, what in logs:
            tail(path, n, what)
    print(f"\ne2e: {len(names) - len(failed)}/{len(names)} checks passed; {trailer}")
    return 1 if failed or failure else 0


def tail(path: Path, n: int, what: str):
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        print(f"\n--- {what}: {path} does not exist")
        return
    print(f"\n--- {what} ({path}), last {min(n, len(lines))} of {len(lines)} lines:")
    for line in lines[-n:]:
        print("    " + line)
