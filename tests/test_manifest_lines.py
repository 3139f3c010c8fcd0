"""A manifest line is put together by hand (manifest_tree.line_of), for speed; the
format defines it as json.dumps of the entry's fields with separators (",", ":") and
ensure_ascii=False.  These tests hold the two to the same bytes, and a sealed tree's
streamed payload to make_payload's over the same entries."""

import json
import os
import random
import subprocess
import sys

import pytest

from verityfuse import manifest, manifest_tree
from verityfuse.errors import ManifestError

# Characters JSON escapes or that are easy to get wrong: quotes, backslash, every
# control character, DEL, non-ASCII of 2-4 UTF-8 bytes, U+2028/2029 (JSON allows them raw).
ALPHABET = ['"', "\\", "/", "\x7f", "é", "\u2028", "\u2029", "\ufeff", "日", "\U0001f600", "a", " "] \
    + [chr(c) for c in range(0x20)]


def _json(e: dict) -> str:
    return json.dumps([e[k] for k in manifest_tree.FIELDS[e["type"]]], separators=(",", ":"),
                      ensure_ascii=False)


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def _entry(rng: random.Random) -> dict:
    ids = [0, 1, manifest_tree.MAX_ID, rng.randrange(manifest_tree.MAX_ID)]
    e = {"type": rng.choice(["dir", "file", "symlink"]), "path": _text(rng, rng.randrange(1, 40)),
         "mode": rng.randrange(0o10000), "uid": rng.choice(ids), "gid": rng.choice(ids),
         "mtime": rng.choice([0, -1, manifest_tree.TIME_RANGE[0], manifest_tree.TIME_RANGE[1],
                              rng.randrange(-10**18, 10**19)])}
    if e["type"] == "file":
        e.update(size=rng.choice([0, 1, manifest_tree.MAX_SIZE, rng.randrange(1 << 40)]),
                 digest="sha256:" + os.urandom(32).hex(), block_size=rng.choice([1024, 4096, 65536]),
                 salt=os.urandom(rng.randrange(0, 33)).hex())
    elif e["type"] == "symlink":
        e["target"] = _text(rng, rng.randrange(1, 60))
    return e


def test_line_of_gives_the_bytes_json_dumps_gives():
    rng = random.Random(19)
    for _ in range(20000):
        e = _entry(rng)
        assert manifest_tree.line_of(e) == _json(e), e


def test_every_escaped_character_alone():
    for c in ALPHABET:
        for kind, extra in (("dir", {}), ("symlink", {"target": c})):
            e = dict(type=kind, path=c, mode=0o755, uid=0, gid=0, mtime=0, **extra)
            assert manifest_tree.line_of(e) == _json(e)


def test_an_unknown_type_is_refused_by_name():
    with pytest.raises(ManifestError, match="unknown entry type 'fifo'"):
        manifest_tree.line_of(dict(type="fifo", path="p", mode=0, uid=0, gid=0, mtime=0))


def test_a_sealed_payload_is_make_payloads(tmp_path):
    """`seal --manifest` streams its lines (manifest_writer); the payload it writes is
    byte for byte the one make_payload builds from the same entries, names that need
    escaping, a symlink and an empty file included."""
    src = tmp_path / "src"
    (src / "d \"q\"").mkdir(parents=True)
    for name in ("a\\b", "é日\U0001f600", "tab\there", "nl\nline", "\u2028"):
        (src / "d \"q\"" / name).write_bytes(name.encode() * 300)
    (src / "empty").write_bytes(b"")
    os.symlink("d \"q\"/\u2028", src / "link\x01")
    m = tmp_path / "m.json"
    r = subprocess.run([sys.executable, "-m", "verityfuse", "seal", str(src), "--store",
                        str(tmp_path / "store"), "--manifest", str(m), "--unsigned"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    payload = manifest.read_envelope(str(m))[1]
    entries = list(manifest_tree.iter_entries(payload))
    assert len(entries) == 9  # the root, a directory, 6 files, a symlink
    assert manifest_tree.make_payload(entries, manifest_tree.parse_header(payload)) == payload
