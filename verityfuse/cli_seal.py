"""Command line for offline work on a tree: seal, upgrade-store, and the manifest's
digest and signing keys (measure-manifest, keygen); verify is cli_verify's.

``--json`` prints one JSON object per line (protocol/cli-json.md); the human
output is unchanged without it.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from typing import TYPE_CHECKING, Iterable, Optional

from .jsonout import emit, error, shown, warning
from .seal_progress import Progress

if TYPE_CHECKING:
    from .manifest_header import Header
    from .source_dir import SourceDir
    from .store import Store

EXIT_ERROR = 1
EXIT_USAGE = 2


def no_source_dir(args) -> bool:
    """SOURCE is not a directory: said (before a missing store could be named instead)."""
    if os.path.isdir(args.source):
        return False
    error(f"'{args.source}' is not a directory")
    return True


def open_store(args, create: bool = False, objects_only: bool = False) -> Store:
    # Imported here: every command builds the parser that imports this module, and
    # `digest` (the one timed against fsverity) never needs the store.
    from .store import store_of

    return store_of(args.source, args.store, create=create, objects_only=objects_only)


class _Sealed:
    """What both seal modes print of a sealed file, once its batch is durable: ``add``
    is the batch's callback.  A human line is gathered and written with the rest of its
    batch in one write (``flush``, the batch's; ``write`` before an error or warning
    line keeps their order): not one call and write a file, for up to thousands of
    files.  With --json each record is emitted, unflushed, as it comes."""

    def __init__(self, args, progress: Progress):
        self.json, self.progress = args.json, progress
        self.lines: list = []

    def add(self, digest: str, full: str):
        if self.json:
            self.progress.close()
            emit({"file": full, "digest": digest}, flush=False)
        else:
            self.lines.append(f"{digest} {shown(full)}\n")

    def write(self):
        if self.lines:
            self.progress.close()
            sys.stdout.write("".join(self.lines))
            self.lines.clear()

    def flush(self):
        self.write()
        sys.stdout.flush()

    def failed(self, full: str, why: str, say):
        """A file that could not be sealed: --json's object for it, else ``say``'s line
        (an error, or in a manifest's seal a warning: the seal's summary fails it)."""
        self.write()
        self.progress.close()
        if self.json:
            emit({"file": full, "error": why})
        else:
            say(f"can't seal '{full}': {why}")


def _expand(src: SourceDir, store: Store, rels, unreadable):
    """``rels`` with each directory replaced by the regular files under it (walk_files'
    order, the store excluded; a directory that cannot be listed goes to
    ``unreadable``); anything else as it is (sealing it says what is wrong)."""
    from .sealing import walk_files

    for rel in rels:
        try:
            is_dir = stat.S_ISDIR(src.lstat(rel).st_mode)
        except OSError:
            is_dir = False
        if is_dir:
            yield from walk_files(src, store, rel, unreadable)  # rel is relpath's (normal)
        else:
            yield rel


def _size_of(src: SourceDir, rels):
    """(bytes, files) of the regular files among ``rels``: a progress line's totals."""
    total = count = 0
    for rel in rels:
        try:
            st = src.lstat(rel)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            total, count = total + st.st_size, count + 1
    return total, count


def cmd_seal(args, params, key, rels) -> int:
    from .source_dir import SourceDir

    if args.store and os.path.realpath(args.store) == os.path.realpath(args.source):
        # Its own files would be sealed into it, more each run.
        error(f"the store cannot be SOURCE itself ({args.source}): give another directory, "
              f"or none (SOURCE/.verityfuse)")
        return EXIT_USAGE
    # SOURCE is opened once, before the workers fork: every path is resolved beneath it.
    with open_store(args, create=True) as store, SourceDir(args.source) as src:
        store.cleanup_tmp()
        try:
            return _seal(args, store, src, params, key, rels)
        except BaseException:
            # Interrupted (or failed): the workers and the batch have stopped, and what
            # they staged and no one held (a chunk queued as Ctrl-C came) is ours to remove.
            store.cleanup_tmp(own=True)
            raise


def _seal(args, store, src, params, key, rels) -> int:
    """Seal into ``store`` (or record a manifest): when this returns or raises, its
    workers and its batch have stopped (cmd_seal cleans up after them)."""
    from .seal_pool import in_order
    from .sealing import FileStager
    from .store_batch import Batch

    if args.manifest:
        return seal_manifest(args, store, src, params, key, rels)
    tty = sys.stderr.isatty()
    named = ["."] if rels is None else rels

    def files(unreadable=lambda rel, e: None):
        """The files to seal, walked as they are sealed: memory does not grow with
        their number.  A directory named means every regular file under it."""
        return _expand(src, store, named, unreadable)

    # On a terminal, one walk more for the totals (the store excluded, as sealed).
    total = _size_of(src, files()) if tty else (0, 0)
    progress = Progress(*total)
    failed = 0

    stage_file = FileStager(store, src, params, threads=args.threads,
                            progress=progress if progress.enabled else None)

    def stage(rel, here):
        """In a worker (``here`` False) a small file; here any, with its progress."""
        return stage_file(rel, here)[0]

    def stage_many(rels):
        return [got and got[0] for got in stage_file.many(rels)]

    sealed = _Sealed(args, progress)

    def not_sealed(full, why):
        sealed.failed(full, why, error)

    try:
        with Batch(store, flush=sealed.flush) as batch:
            # Directories that could not be listed (nothing under them sealed): said
            # after the files, as verify does (the walk runs ahead of the results).
            unlistable_dirs: list = []
            walk = files(lambda rel, e: unlistable_dirs.append((rel, e)))

            # A file's line is printed once its batch is durable: a printed digest is
            # a sealed file.
            for rel, done, e in in_order(walk, stage, args.threads,
                                         lambda staged: staged.drop(store),
                                         progress.worker_done if progress.enabled else None,
                                         work_many=stage_many):
                full = src.full(rel)
                if e is not None:
                    failed += 1
                    batch.then(not_sealed, full, e.strerror or str(e))
                    continue
                assert done is not None  # in_order: a result when there is no error
                batch.add(done)
                batch.then(sealed.add, done.digest_text, full)
                if batch.full:
                    batch.commit_soon()
            for rel, e in unlistable_dirs:
                failed += 1
                batch.then(not_sealed, src.full(rel), e.strerror)
    finally:
        progress.close()
    return EXIT_ERROR if failed else 0


class _Previous:
    """The manifest being replaced, as far as it can be read."""

    def __init__(self, path: str):
        from . import manifest, manifest_tree
        from .errors import ManifestError

        self.env: Optional[dict] = None
        self.payload: bytes = b""
        self.header: Optional["Header"] = None
        self.error: Optional[ManifestError] = None
        if not os.path.lexists(path):
            return
        try:
            self.env, self.payload = manifest.read_envelope(path)
            self.header = manifest_tree.parse_header(self.payload, path, legacy=True)
        except ManifestError as e:
            self.error = e

    @property
    def exists(self) -> bool:
        return self.env is not None or self.error is not None


def _next_header(args, key, prev: _Previous):
    """The header of the manifest about to be written: the sequence one above the
    previous manifest's (``--sequence`` must be above it too), its expiry.  Refuses
    what would weaken M by accident: dropping its signature or its expiry."""
    from . import manifest_header
    from .errors import ManifestError

    if prev.error is not None and args.sequence is None:
        raise ManifestError(f"{prev.error}: cannot tell the sequence of the manifest it replaces; "
                            f"give --sequence N, above any sequence published")
    if prev.env is not None and prev.env.get("signatures") and key is None and not args.unsigned:
        raise ManifestError(f"{args.manifest} is signed: give --sign-key KEY.pem to sign the new "
                            f"manifest too, or --unsigned to replace it with an unsigned one")
    old = prev.header
    if args.sequence is None:
        sequence = old.sequence + 1 if old is not None else 1
        if sequence > manifest_header.MAX_SEQUENCE:
            raise ManifestError(f"{args.manifest}: sequence {sequence - 1} cannot be raised")
    elif old is not None and args.sequence <= old.sequence:
        raise ManifestError(f"--sequence {args.sequence} is not above the sequence "
                            f"{old.sequence} of {args.manifest} (a sequence never goes back: "
                            f"remove {args.manifest} first to start again)")
    else:
        sequence = args.sequence
    now = int(time.time())
    if args.expires is not None:
        try:
            expires = manifest_header.parse_expiry(args.expires, now)
        except ValueError as e:
            raise ManifestError(f"--expires: {e}") from None
    elif old is not None and old.expires is not None:
        raise ManifestError(f"{args.manifest} expires (at "
                            f"{manifest_header.format_time(old.expires)}): give --expires WHEN "
                            f"for the new manifest, or --expires never")
    else:
        expires = None
    return manifest_header.Header(sequence, expires)


def seal_manifest(args, store, src, params, key, rels) -> int:
    """Seal and record SOURCE (or update ``rels`` in it) into manifest ``args.manifest``."""
    from . import fsutil, manifest, manifest_header, manifest_tree
    from .manifest_record import ManifestRecorder
    from .manifest_writer import ManifestWriter
    from .store_batch import Batch

    prev = _Previous(args.manifest)
    header = _next_header(args, key, prev)  # refused before anything is hashed
    from .sealing import walk_files

    progress = Progress(*(_size_of(src, walk_files(src, store, unreadable=lambda r, e: None))
                          if sys.stderr.isatty() and (rels is None or "." in rels) else (0, 0)))

    sealed = _Sealed(args, progress)

    def warn(msg):
        sealed.write()
        progress.close()
        warning(msg)  # escaped: it names files of SOURCE

    # M inside SOURCE: its directory's mtime stays what the manifest records of it.
    in_source = fsutil.within(os.path.realpath(os.path.dirname(os.path.abspath(args.manifest))),
                              os.path.realpath(args.source))
    with Batch(store, flush=sealed.flush) as batch, \
            ManifestWriter(args.manifest, header, keep_dir_mtime=in_source) as out:
        rec = ManifestRecorder(src, store, params, batch,
                               skip_paths=[args.manifest, out.payload_path], warn=warn,
                               report=sealed.add, progress=progress, threads=args.threads,
                               not_sealed=lambda full, why: sealed.failed(full, why, warning),
                               local=args.local)
        try:
            if rels is None or "." in rels:
                entries: Iterable[dict] = rec.walk(".")
            else:
                existing = []
                if prev.exists:
                    if prev.error is not None:
                        raise prev.error  # its entries are what we would keep
                    if key is not None and prev.env is not None:
                        # Re-signing must not launder entries this key never vouched for.
                        manifest.check_signatures(args.manifest, prev.env, prev.payload,
                                                  [key.public_key()])
                    existing = list(manifest_tree.iter_entries(prev.payload, args.manifest))
                entries = rec.update(existing, rels)
            for entry in entries:
                out.add(entry)
        finally:
            progress.close()
        batch.commit()  # the manifest names only durable objects
        if rec.failed:
            error(f"manifest {args.manifest} not written: {rec.failed} file(s) could not be sealed")
            return EXIT_ERROR
        out.publish(key)
    digest, entries, files = out.digest, out.entries, out.files
    expires = None if header.expires is None else manifest_header.format_time(header.expires)
    if args.json:
        emit({"manifest": args.manifest, "digest": digest, "entries": entries,
              "files": files, "signed": key is not None, "sequence": header.sequence,
              "expires": expires})
    else:
        print(f"manifest {args.manifest}: {entries} entries ({files} files), {digest}, "
              f"sequence {header.sequence}" + (f", expires {expires}" if expires else "")
              + ("" if key else " (unsigned: mount it with --manifest-digest)"), file=sys.stderr)
    return 0


def cmd_upgrade_store(args) -> int:
    from .store_upgrade import upgrade

    with open_store(args, objects_only=True) as store:
        was = store.version
        if was == 3:
            print(f"store {store.path} is already format 3", file=sys.stderr)
            return 0
        converted, dropped = upgrade(args.source, store,
                                     warning)
    print(f"store {store.path}: format {was} to 3, {converted} entries converted, "
          f"{dropped} dropped", file=sys.stderr)
    return 0


# -- manifests ------------------------------------------------------------

def cmd_measure_manifest(args) -> int:
    """The manifest digest, the one value a remote verifier pins."""
    from . import manifest, manifest_header, manifest_tree

    env, payload = manifest.read_envelope(args.manifest)
    if args.trust_key:  # the signature as a mount checks it, before the payload is parsed
        manifest.check_signatures(args.manifest, env, payload,
                                  [manifest.load_public_key(k) for k in args.trust_key])
    tree = manifest_tree.parse_payload(payload, args.manifest)  # refuse to measure garbage
    digest = manifest.manifest_digest(payload)
    head = tree.header
    expires = None if head.expires is None else manifest_header.format_time(head.expires)
    expired = head.expires is not None and time.time() >= head.expires
    if args.json:
        sigs = env.get("signatures") if isinstance(env.get("signatures"), list) else []
        emit({"manifest": args.manifest, "digest": digest, "entries": len(tree.nodes),
              "files": sum(1 for _ in tree.files()), "sequence": head.sequence,
              "expires": expires, "expired": expired,
              "signatures": [{"algorithm": g.get("algorithm"), "key_id": g.get("key_id")}
                             for g in sigs if isinstance(g, dict)]})
    else:
        print(digest)  # the one line scripts read; the rest on stderr
        print(f"sequence {head.sequence}, " + ("no expiry" if expires is None else
              f"{'expired' if expired else 'expires'} at {expires}"), file=sys.stderr)
    return 0


def cmd_keygen(args) -> int:
    from . import manifest

    if os.path.realpath(args.private) == os.path.realpath(args.public):
        # One of the two would be written and the other refused: half a key pair.
        error(f"the private and public key files are one file ({args.private}, {args.public})")
        return EXIT_USAGE
    try:
        key = manifest.generate_key(args.private, args.public)
    except FileExistsError as e:
        error(f"'{e.filename}' exists; not overwriting a key")
        return EXIT_ERROR
    print(f"ed25519 key {manifest.key_id(key.public_key())}: private {args.private}, "
          f"public {args.public}")
    return 0
