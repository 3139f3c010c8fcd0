"""The remote verifier of ``make e2e``, run on the host after the guest finished.

The guest wrote a TPM quote over PCR 23 (with the host's nonce), its attestation
key and verityfuse's event log to the control share.  The verifier replays the
log against the quote with ``verityfuse attest replay`` and appraises it: the
mount event names the pinned manifest, and the integrity violations name
exactly the files whose tampering the guest read (tests/manifest_attacks.py
says which attacks produce one).  ``tpm2_checkquote`` checks the quote a second
way, independently of verityfuse.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import plan
from plan import ma

PCR = 23
# The AK as `tpm2_readpublic -f pem` writes it (ak.pub beside it is the TPM2B_PUBLIC).
AK_PUBLIC = "ak.pem"

CHECKS = ["attest-replay", "attest-mount-event", "attest-violations", "quote-checkquote",
          "attest-unmount-event"]

Result = Tuple[str, bool, str]


def run(cmd: List[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def replay_command(ev: Path, nonce: str, trust: dict) -> List[str]:
    cmd = [sys.executable, "-m", "verityfuse.cli", "attest", "replay", str(ev / plan.EVENT_LOG),
           "--quote", str(ev / "quote.msg"), "--signature", str(ev / "quote.sig"),
           "--ak-public", str(ev / AK_PUBLIC), "--nonce", nonce, "--pcr", str(PCR),
           "--expect-manifest", trust["digest"], "--allow-violations", "--json"]
    if "sequence" in trust:
        cmd += ["--min-sequence", str(trust["sequence"])]
    return cmd


def log_events(log: Path) -> List[dict]:
    """The events as the log's own lines say (domain, operation, content), for when
    the replay printed none."""
    out = []
    for line in log.read_text().splitlines()[1:]:  # after INIT/<alg> <hex>
        parts = line.split(" ", 2)
        if len(parts) == 3:
            try:
                content = json.loads(parts[2])
            except ValueError:
                content = parts[2]
            out.append({"domain": parts[0], "operation": parts[1], "content": content})
    return out


def content_of(event: dict):
    c = event.get("content")
    if isinstance(c, str):
        try:
            return json.loads(c)
        except ValueError:
            return c
    return c


def check_mount_event(events: List[dict], trust: dict) -> str:
    mounts = [content_of(e) for e in events if e.get("operation") == "MountManifest"]
    if len(mounts) != 1:
        raise ma.Failed(f"{len(mounts)} MountManifest events, expected 1: {mounts[:3]}")
    c = mounts[0]
    values = list(c.values()) if isinstance(c, dict) else [c]
    if trust["digest"] not in values:
        raise ma.Failed(f"the MountManifest event names no {trust['digest']}: {json.dumps(c)[:300]}")
    if isinstance(c, dict) and "sequence" in trust and c.get("sequence") != trust["sequence"]:
        raise ma.Failed(f"the MountManifest event's sequence is {c.get('sequence')!r}, "
                        f"the manifest's {trust['sequence']}")
    return f"names the pinned {trust['digest'][:23]}..." + \
        (f", sequence {c['sequence']}" if isinstance(c, dict) and "sequence" in c else "")


def check_violations(events: List[dict]) -> str:
    must, may = ma.expected_violations()
    seen = {}
    dup = []
    for e in events:
        if e.get("operation") != "IntegrityViolation":
            continue
        c = content_of(e)
        path = str(c.get("path", "")).lstrip("/") if isinstance(c, dict) else repr(c)
        if path in seen:
            dup.append(path)
        seen[path] = c.get("offset") if isinstance(c, dict) else None
    problems = []
    missing = sorted(set(must) - set(seen))
    extra = sorted(set(seen) - set(must) - set(may))
    if missing:
        problems.append("missing " + ", ".join(f"{p} ({must[p]})" for p in missing))
    if extra:
        problems.append(f"unexpected {extra}")
    if dup:
        problems.append(f"more than one event for {sorted(set(dup))}")
    if problems:
        raise ma.Failed("; ".join(problems) + f"; seen {sorted(seen)}")
    maybe = sorted(set(seen) & set(may))
    return (f"{len(seen)} files, each once, as the attacks predict"
            + (f" (incl. optional {maybe})" if maybe else "") + ": "
            + ", ".join(f"{p}@{seen[p]}" for p in sorted(seen)))


NOT_LIVE = ("no measured mount is live at the end of the log: every MountManifest is followed "
            "by its UnmountManifest")


def check_unmount_event(after: Path, nonce: str, trust: dict, before: List[dict]) -> str:
    """The quote taken after the unmount: its log replays to it, extends the first quote's
    events by exactly one UnmountManifest of the pinned manifest at the mount's mount point,
    and `--expect-mounted` fails for that reason alone."""
    if not (after / "quote.msg").exists():
        raise ma.Failed(f"no evidence in {after} (the guest took no quote after the unmount)")
    r = run(replay_command(after, nonce, trust) + ["--expect-mounted"])
    try:
        report = json.loads(r.stdout)
    except ValueError:
        raise ma.Failed(f"exit {r.returncode}: {(r.stderr or r.stdout).strip()[:300]}") from None
    failures = report["appraisal"]["failures"]
    if r.returncode != 1 or not report["match"]["ok"] or failures != [NOT_LIVE]:
        raise ma.Failed(f"exit {r.returncode}, match {report['match']['ok']}, failures "
                        f"{failures}: expected 1, a match, and only '{NOT_LIVE}'")
    events = report["events"]
    if [e["line"] for e in events[:-1]] != [e["line"] for e in before]:
        raise ma.Failed(f"the log after the unmount is not the first quote's {len(before)} "
                        f"events and one more ({len(events)} events)")
    mounts = [e["content"] for e in before if e["operation"] == "MountManifest"]
    last = events[-1]
    want = {"version": 1, "manifest": trust["digest"],
            "mountpoint": mounts[0]["mountpoint"] if mounts else None}
    if (last["operation"], last["content"]) != ("UnmountManifest", want) or report["mounted"]:
        raise ma.Failed(f"last event {last['operation']} {json.dumps(last['content'])[:200]}, "
                        f"mounted {report['mounted']}: expected UnmountManifest {want}")
    return (f"{len(events)} events replay to the second quote; the last is the "
            f"UnmountManifest of {trust['digest'][:23]}... at {want['mountpoint']}; "
            f"--expect-mounted fails as it must")


def verify(ev: Path, nonce: str, trust: dict, after: Optional[Path] = None,
           nonce_after: str = "") -> List[Result]:
    results: List[Result] = []
    if not (ev / "quote.msg").exists():
        return [(name, False, f"no evidence in {ev} (the guest took no quote)") for name in CHECKS]
    r = run(replay_command(ev, nonce, trust))
    replayed: Optional[dict] = None
    try:
        replayed = json.loads(r.stdout)
    except ValueError:
        pass
    if r.returncode == 0 and isinstance(replayed, dict):
        n = len(replayed.get("events", []))
        results.append(("attest-replay", True, f"{n} events replay to the quoted PCR {PCR}; "
                        "nonce, signature, manifest and sequence accepted"))
    else:
        appraisal = replayed.get("appraisal") if isinstance(replayed, dict) else None
        failures = appraisal.get("failures") if isinstance(appraisal, dict) else None
        why = "; ".join(map(str, failures)) if failures else (r.stderr or r.stdout).strip()
        results.append(("attest-replay", False, f"exit {r.returncode}: {why[:400]}"))
    if isinstance(replayed, dict) and isinstance(replayed.get("events"), list):
        events, source = replayed["events"], ""
    else:
        events, source = log_events(ev / plan.EVENT_LOG), " (events read from the log itself)"
    if r.returncode != 0:
        source += " (a log the quote does not vouch for: the replay failed)"
    for name, fn in (("attest-mount-event", lambda: check_mount_event(events, trust)),
                     ("attest-violations", lambda: check_violations(events))):
        try:
            results.append((name, True, fn() + source))
        except ma.Failed as e:
            results.append((name, False, str(e) + source))
    r = run(["tpm2_checkquote", "-u", str(ev / AK_PUBLIC), "-m", str(ev / "quote.msg"),
             "-s", str(ev / "quote.sig"), "-f", str(ev / "pcrs.out"), "-g", "sha256", "-q", nonce])
    results.append(("quote-checkquote", r.returncode == 0,
                    "tpm2_checkquote: signature, nonce and PCR digest verify" if r.returncode == 0
                    else f"tpm2_checkquote: exit {r.returncode}: {r.stderr.strip()[:300]}"))
    if after is not None:
        try:
            results.append(("attest-unmount-event", True,
                            check_unmount_event(after, nonce_after, trust, events)))
        except (ma.Failed, KeyError, TypeError, IndexError) as e:
            results.append(("attest-unmount-event", False, f"{type(e).__name__}: {e}"))
    return results
