"""Command line for checking a tree offline: `verify` (every sealed file against its
tree, in seal_pool's worker processes) and `verify --manifest` (SOURCE against a
trusted manifest: the host's gate before a share ships).

``--json`` prints one JSON object per line (protocol/cli-json.md); the human
output is unchanged without it.
"""

from __future__ import annotations

import os
import sys

from .cli_seal import EXIT_ERROR, EXIT_USAGE, error, no_source_dir, open_store
from .errors import IntegrityError
from .jsonout import emit, shown, shown_text, warning


def _failure_json(e: Exception) -> dict:
    from .sealing import describe_failure

    out = {"error": describe_failure(e)}
    if isinstance(e, IntegrityError):
        out.update(offset=e.offset, expected=e.expected.hex(), actual=e.actual.hex(), what=e.what)
    return out


def load_trusted_manifest(args):
    """The manifest of ``--manifest``, authenticated by ``--trust-key`` and/or
    ``--manifest-digest`` (one of them is required), fresh (not expired)."""
    from . import manifest

    keys = [manifest.load_public_key(k) for k in args.trust_key or ()]
    return manifest.load(args.manifest, keys, args.manifest_digest)


def cmd_verify_manifest(args) -> int:
    """verify SOURCE --manifest M: every listed entry against the manifest, then what is
    unlisted; the same report shape and exit codes as verify."""
    from .errors import VerityError
    from .manifest_check import check_tree

    if not args.trust_key and not args.manifest_digest:
        error("--manifest needs --trust-key or --manifest-digest: a manifest is checked only "
              "once it is authenticated")
        return EXIT_USAGE
    if no_source_dir(args):
        return EXIT_ERROR
    try:
        m = load_trusted_manifest(args)
    except (VerityError, OSError) as e:
        error(str(e))
        return EXIT_ERROR
    counts = dict.fromkeys(("ok", "corrupt", "differs", "missing", "unlisted", "error"), 0)

    def skipped(rel: str):  # as seal warns of it: no manifest lists it, a mount hides it
        warning(f"skipping {os.path.normpath(os.path.join(args.source, rel))}: not a "
                f"directory, regular file or symlink")

    with open_store(args, objects_only=True) as store:
        for res in check_tree(args.source, m.tree, store, skip=(store.path, args.manifest),
                              threads=args.threads, skipped=skipped):
            counts[res.status] += 1
            name = os.path.normpath(os.path.join(args.source, res.path))
            if args.json:
                obj = {"file": name, "status": res.status}
                if res.digest:
                    obj["digest"] = res.digest
                if res.error is not None and res.status == "corrupt":
                    obj.update(_failure_json(res.error))
                elif res.message:
                    obj["error"] = res.message
                emit(obj)
            elif res.status != "ok":
                print(f"{res.status.upper()} {shown(name)}: {shown_text(res.message)}")
            elif args.verbose:
                print(f"OK {res.digest or ''} {shown(name)}".replace("OK  ", "OK "))
    failed = sum(n for k, n in counts.items() if k != "ok")
    listed = sum(n for k, n in counts.items() if k != "unlisted")
    if args.json:
        emit({"summary": dict(counts, manifest=m.digest, sequence=m.sequence, entries=listed,
                              ok=not failed)})
    else:
        print(f"{counts['ok']} of {listed} manifest entries match ({m.digest}, sequence "
              f"{m.sequence})" + "".join(f", {counts[k]} {k}" for k in counts
                                         if k != "ok" and counts[k]), file=sys.stderr)
    return EXIT_ERROR if failed else 0


def cmd_verify(args) -> int:
    if args.manifest:
        return cmd_verify_manifest(args)
    if args.trust_key or args.manifest_digest:
        error("--trust-key and --manifest-digest need --manifest")
        return EXIT_USAGE
    if no_source_dir(args):
        return EXIT_ERROR
    from .seal_pool import in_order
    from .sealing import StaleCount, describe_failure, verify_file, walk_files
    from .source_dir import SourceDir
    from .verifier import ONE_PASS_CACHE_BYTES, TreeBlockCache

    cache = TreeBlockCache(ONE_PASS_CACHE_BYTES)
    counts = dict(sealed=0, corrupt=0, unsealed=0, unreadable=0)
    reached = StaleCount()
    with open_store(args, create=False) as store, SourceDir(args.source) as src:
        def check(rel, here):  # in seal_pool's workers, files of any size
            return verify_file(store, src, rel, cache)

        def report(name, status, digest=None, error=None):
            if status != "ok":
                counts["unreadable" if status == "error" else status] += 1
            if args.json:
                obj = {"file": name, "status": status}
                if digest:
                    obj["digest"] = digest
                if error is not None:
                    obj.update(_failure_json(error))
                emit(obj)
            elif error is not None:
                print(f"{status.upper()} {shown(name)}: {shown_text(describe_failure(error))}")
            elif status == "unsealed" and (args.strict or args.verbose):
                print(f"UNSEALED {shown(name)}")
            elif status == "ok" and args.verbose:
                print(f"OK {digest} {shown(name)}")

        unlistable_dirs = []  # directories that could not be listed: nothing under them verified
        files = walk_files(src, store, unreadable=lambda rel, e: unlistable_dirs.append((rel, e)))
        for rel, res, _ in in_order(files, check, args.threads, abandon=lambda res: None,
                                    command="verify", done="verified"):
            assert res is not None  # verify_file reports every OSError in its result
            reached.add(res)
            if res.sealed:
                counts["sealed"] += 1
            report(os.path.join(args.source, rel), res.status,
                   res.entry.digest_text if res.entry is not None else None, res.error)
        for rel, e in unlistable_dirs:
            report(src.full(rel), "error", error=e)
        stale = reached.of(store)
    nothing = counts["sealed"] == 0 and not counts["unreadable"]
    # Nothing sealed reached: stale counts every entry.  None at all is a manifest seal's
    # store: the error says where its trees are checked.
    no_index = nothing and stale == 0
    failed = nothing or counts["corrupt"] or counts["unreadable"] or (args.strict and counts["unsealed"])
    if args.json:
        emit({"summary": dict(counts, intact=counts["sealed"] - counts["corrupt"],
                              stale_entries=stale, strict=args.strict, ok=not failed)})
    else:
        print(f"{counts['sealed'] - counts['corrupt']} of {counts['sealed']} sealed files intact"
              + (f", {counts['unsealed']} unsealed" if counts["unsealed"] else "")
              + (f", {counts['unreadable']} unreadable" if counts["unreadable"] else ""),
              file=sys.stderr)
        if stale and unlistable_dirs:  # the entries of what was under them are among these
            print(f"{stale} index entries name no file found under {args.source} (files "
                  f"removed or replaced, or under a directory that could not be listed)",
                  file=sys.stderr)
        elif stale:
            print(f"{stale} index entries name no file under {args.source} (files removed or "
                  f"replaced; harmless)", file=sys.stderr)
    if nothing:
        error(f"nothing was verified: no sealed file under '{args.source}'"
              + (" (its store has no index entry: a store `seal --manifest` wrote is checked "
                 "with `verify --manifest M`; `seal --manifest --local` indexes the files too)"
                 if no_index else ""))
    return EXIT_ERROR if failed else 0
