"""The verifier's replay: recompute a register from an event log, compare it with a register
value or a TPM quote, and appraise the events (`verityfuse attest replay`, docs/attestation.md).

``replay(...)`` returns a report (the --json object) and the exit status: 0 only when the log
matches AND every expectation holds, 1 when something does not (the report says what).
"""

from __future__ import annotations

import dataclasses
import os

from . import measure_event as me
from . import tpm_quote

MAX_LOG = 64 << 20
REPORT_SCHEMA = 1


class InputError(Exception):
    """An input file cannot be read (exit status 2)."""


@dataclasses.dataclass
class Expectations:
    manifests: list[str] = dataclasses.field(default_factory=list)  # empty: any manifest
    keys: list[str] = dataclasses.field(default_factory=list)  # empty: any key (or none)
    min_sequence: int | None = None
    allow_violations: bool = False
    allow_init: bytes | None = None  # a non-zero INIT value the verifier accounts for
    mounted: bool = False  # a measured mount is still served at the log's end


@dataclasses.dataclass
class QuoteFiles:
    message: str
    signature: str
    ak_public: str
    nonce: bytes
    pcr: int = 23


def read_input(path: str, limit: int, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror}") from None
    if len(data) > limit:
        raise InputError(f"{what} {path} is larger than {limit} bytes")
    return data


def _event_json(n: int, alg: str, e: me.Event) -> dict:
    # Another domain's content: null where its JSON is not what every parser reads alike.
    content = e.content if e.raw is None else me.strict_object(e.raw)
    return {"index": n, "domain": e.domain, "operation": e.operation, "content": content,
            "line": e.line(), "digest": me.event_digest(alg, e).hex()}


def live_mounts(events: list[me.Event]) -> tuple[list[tuple[int, me.Event]], list[str]]:
    """The MountManifest events (with their event numbers) that no UnmountManifest of the
    same manifest and mount point follows, in log order: what the log says is served at
    its end (unless a daemon was killed outright, which records nothing); and a failure
    for each UnmountManifest that ends no live mount (no daemon writes one)."""
    live: list[tuple[int, me.Event]] = []
    problems: list[str] = []
    for n, e in enumerate(events, 1):
        if e.domain != me.DOMAIN:
            continue
        if e.operation == me.OP_MOUNT:
            live.append((n, e))
        elif e.operation == me.OP_UNMOUNT:
            c = e.content
            ended = next((k for k in range(len(live) - 1, -1, -1)  # the latest such mount
                          if (live[k][1].content["manifest"], live[k][1].content["mountpoint"])
                          == (c["manifest"], c["mountpoint"])), None)
            if ended is None:
                problems.append(f"event #{n} UnmountManifest of {c['mountpoint']} (manifest "
                                f"{c['manifest']}) ends no mount the log shows there")
            else:
                del live[ended]
    return live, problems


def appraise(alg: str, init: bytes, events: list[me.Event], exp: Expectations
             ) -> tuple[list[str], list[str], list[tuple[int, me.Event]]]:
    """(failures, warnings) of a log that replays correctly, against the expectations, and
    the mounts live at its end (live_mounts)."""
    failures: list[str] = []
    warnings: list[str] = []
    if any(init):
        if exp.allow_init is None:
            failures.append(f"INIT value {init.hex()} is not zero: the register held a value "
                            f"before this log started and the events that made it are not in "
                            f"this log (--allow-init {init.hex()} accepts it if another log "
                            f"accounts for them)")
        elif exp.allow_init != init:
            failures.append(f"INIT value {init.hex()} is not the one --allow-init accepts "
                            f"({exp.allow_init.hex()})")
        else:
            warnings.append(f"INIT value {init.hex()} is not zero (accepted by --allow-init)")
    elif exp.allow_init is not None and exp.allow_init != init:
        failures.append(f"INIT value is zero, not the {exp.allow_init.hex()} --allow-init expects")
    mounts = [(n, e) for n, e in enumerate(events, 1)
              if e.domain == me.DOMAIN and e.operation == me.OP_MOUNT]
    if (exp.manifests or exp.keys or exp.min_sequence is not None) and not mounts:
        failures.append("no MountManifest event: the log records no measured mount")
    for n, e in mounts:
        c = e.content
        if exp.manifests and c["manifest"] not in exp.manifests:
            failures.append(f"event #{n} MountManifest of {c['mountpoint']} names manifest "
                            f"{c['manifest']}, which is not an expected one "
                            f"({', '.join(exp.manifests)})")
        if exp.keys and c["key_id"] not in exp.keys:
            signer = ("no key (a pinned digest)" if c["key_id"] is None
                      else f"key {c['key_id']}")
            failures.append(f"event #{n} MountManifest of {c['mountpoint']} was verified by "
                            f"{signer}, not an expected one ({', '.join(exp.keys)})")
        if exp.min_sequence is not None and c["sequence"] < exp.min_sequence:
            failures.append(f"event #{n} MountManifest of {c['mountpoint']} has sequence "
                            f"{c['sequence']}, below --min-sequence {exp.min_sequence} "
                            f"(an older manifest: a rollback?)")
    live, problems = live_mounts(events)
    # Under an accepted non-zero INIT the mount an unmount ends may be in the earlier log.
    (warnings if any(init) and exp.allow_init == init else failures).extend(problems)
    if exp.mounted and not live:
        failures.append("no measured mount is live at the end of the log: " +
                        ("every MountManifest is followed by its UnmountManifest" if mounts
                         else "the log records no measured mount"))
    for n, e in enumerate(events, 1):
        if e.domain == me.DOMAIN and e.operation == me.OP_VIOLATION:
            c = e.content
            offset = "" if c["offset"] is None else f" at offset {c['offset']}"
            msg = (f"event #{n} IntegrityViolation: {c['path']}{offset} failed verification "
                   f"under manifest {c['manifest']}")
            (warnings if exp.allow_violations else failures).append(msg)
    return failures, warnings, live


def _quote_json(q: tpm_quote.Quote) -> dict:
    return {"pcr": q.pcr, "pcr_digest": q.pcr_digest.hex(), "signature": q.signature,
            "hash": q.hash, "nonce": q.nonce.hex(), "signer": q.signer.hex(),
            "ak_format": q.ak_format, "ak_name": q.ak_name.hex() if q.ak_name else None,
            "clock": q.clock, "reset_count": q.reset_count, "restart_count": q.restart_count,
            "safe": q.safe, "firmware": q.firmware}


def replay(log_path: str, exp: Expectations, register: bytes | None = None,
           quote: QuoteFiles | None = None) -> tuple[dict, int]:
    """The report and exit status (0 or 1); InputError for a file that cannot be read.
    ``register`` or ``quote``, not both: the log is matched against one."""
    if (register is None) == (quote is None):
        raise ValueError("replay: give a register value or a quote, not both or neither")
    report: dict = {"schema": REPORT_SCHEMA, "log": log_path, "algorithm": None, "init": None,
                    "replayed": None, "events": [], "mounted": [], "match": None,
                    "appraisal": {"pass": False, "failures": [], "warnings": []}, "result": "fail"}
    data = read_input(log_path, MAX_LOG, "event log")
    qdata = None
    if quote is not None:
        qdata = tuple(read_input(p, tpm_quote.MAX_FILE, w) for p, w in (
            (quote.message, "quote message"), (quote.signature, "quote signature"),
            (quote.ak_public, "AK public key")))
    failures = report["appraisal"]["failures"]
    try:
        alg, init, events = me.parse_log(data.decode("ascii"))
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        failures.append(f"log rejected: line {line}: byte 0x{data[e.start]:02x} at offset "
                        f"{e.start} is not ASCII")
        return report, 1
    except me.EventLogError as e:
        failures.append(f"log rejected: {e}")
        return report, 1
    value = me.replay(alg, init, events)
    report.update(algorithm=alg, init=init.hex(), replayed=value.hex(),
                  events=[_event_json(n, alg, e) for n, e in enumerate(events, 1)])
    match: dict = {"source": None, "ok": False, "error": None}
    if register is not None:
        match.update(source="register", register=register.hex())
        if len(register) != len(value):
            match["error"] = (f"--register has {len(register)} bytes, a {alg} register "
                              f"{len(value)}")
        elif register != value:
            match["error"] = (f"register mismatch: the log replays to {value.hex()}, the "
                              f"register holds {register.hex()} (an event was removed, changed "
                              f"or added, or the log is another register's)")
        else:
            match["ok"] = True
    elif quote is not None and qdata is not None:
        match.update(source="quote", quote=None)
        if alg != "sha256":
            match["error"] = (f"the log is {alg}, but a TPM quote covers a PCR of the SHA-256 "
                              f"bank: this is not a TPM PCR's log")
        else:
            try:
                q = tpm_quote.verify_quote(qdata[0], qdata[1], qdata[2], quote.nonce, quote.pcr,
                                           value)
                match.update(ok=True, quote=_quote_json(q))
            except tpm_quote.QuoteError as e:
                match["error"] = f"quote rejected: {e}"
    report["match"] = match
    if match["error"]:
        failures.append(match["error"])
    more, warnings, live = appraise(alg, init, events, exp)
    failures.extend(more)
    report["mounted"] = [{"index": n, "manifest": e.content["manifest"],
                          "mountpoint": e.content["mountpoint"]} for n, e in live]
    report["appraisal"]["warnings"] = warnings
    # Not only the expectations: a reader of appraisal.pass alone must not take a log that
    # does not match its register or quote (a replayed quote, another AK) for a pass.
    ok = bool(match["ok"]) and not failures
    report["appraisal"]["pass"] = ok
    report["result"] = "pass" if ok else "fail"
    return report, 0 if ok else 1


def _describe(e: dict) -> str:
    if e["domain"] == me.DOMAIN:
        order = ("manifest", "key_id", "sequence", "policy", "mountpoint", "path", "offset")
        fields = " ".join(f"{k}={'-' if e['content'][k] is None else e['content'][k]}"
                          for k in order if k in e["content"])
        return f"{e['operation']} {fields}"
    # Another domain's event, printable ASCII as the parser checked, marked as such: its
    # line is whatever that component wrote, and could read like one of ours.
    return f"[other domain] {e['line']}"


def human(report: dict) -> str:
    """The report as text: names stay in their escaped (encoded) form, one event a line."""
    out = []
    if report["algorithm"] is not None:
        zero = " (zero)" if not any(bytes.fromhex(report["init"])) else " (NOT zero)"
        out.append(f"log {os.fsdecode(report['log'])!r}: {report['algorithm']}, INIT "
                   f"{report['init']}{zero}, {len(report['events'])} event(s)")
        out += [f"  #{e['index']} {_describe(e)}" for e in report["events"]]
        out.append(f"replayed {report['algorithm']}: {report['replayed']}")
        out += [f"mounted at the end of the log: {m['mountpoint']} manifest={m['manifest']} "
                f"(event #{m['index']})" for m in report["mounted"]]
    m = report["match"]
    if m and m["ok"] and m["source"] == "register":
        out.append("register: matches the replayed log")
    elif m and m["ok"]:
        q = m["quote"]
        out.append(f"quote: PCR {q['pcr']} matches the replayed log; {q['signature']}/{q['hash']} "
                   f"signature by the AK verifies; nonce {q['nonce']} matches (TPM clock "
                   f"{q['clock']}, resets {q['reset_count']}, restarts {q['restart_count']})")
    out += [f"WARNING: {w}" for w in report["appraisal"]["warnings"]]
    out += [f"FAIL: {f}" for f in report["appraisal"]["failures"]]
    out.append(f"result: {report['result'].upper()}")
    return "\n".join(out)
