"""Manifest format 2 (protocol/manifest-format.md): recording a tree, the payload's
rules, the envelope, authentication before parsing, and updates.

Rules: malformed input is refused with a message naming the file and the entry,
never a traceback; memory bounds are asserted on a child's peak RSS, never time.
"""

import base64
import json
import os
import stat
import subprocess
import sys

import pytest

from verityfuse import manifest as mf
from verityfuse import manifest_tree as mt
from verityfuse.errors import ManifestError
from conftest import write

VF = [sys.executable, "-m", "verityfuse.cli"]
D0 = "sha256:" + "00" * 32


def vf(*args):
    return subprocess.run([*VF, *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def key(tmp_path):
    return mf.generate_key(str(tmp_path / "key.pem"), str(tmp_path / "pub.pem"))


def d(path, **kw):
    return dict(dict(path=path, type="dir", mode=0o755, uid=0, gid=0, mtime=0), **kw)


def f(path, **kw):
    return dict(dict(path=path, type="file", mode=0o644, uid=0, gid=0, mtime=0, size=1, digest=D0,
                     block_size=4096, salt=""), **kw)


def s(path, target="x", **kw):
    return dict(dict(path=path, type="symlink", mode=0o777, uid=0, gid=0, mtime=0, target=target), **kw)


def arr(e):
    """An entry dict as its payload array (raw values pass through unchanged)."""
    return [e[k] for k in mt.FIELDS[e["type"]]] if isinstance(e, dict) and e.get("type") in mt.FIELDS else e


def lines(*entries, header=None):
    head = header or {"format": "verityfuse-manifest", "version": 2}
    return ("\n".join(json.dumps(x) for x in [head, *map(arr, entries)]) + "\n").encode()


def test_seal_records_the_whole_tree(tmp_path, key):
    src = tmp_path / "src"
    (src / "dir" / "deep").mkdir(parents=True)
    write(src / "a", b"a" * 5000)
    write(src / "dir" / "deep" / "b", b"")
    os.symlink("../a", src / "dir" / "up")
    os.symlink("/etc/passwd", src / "abs")
    os.chmod(src / "a", 0o4751)
    os.chown(src / "dir" / "deep" / "b", 1234, 5678)
    os.utime(src / "a", ns=(1, 1_500_000_000_123_456_789))
    os.mkfifo(src / "fifo")
    r = vf("seal", src, "--manifest", tmp_path / "m.json", "--sign-key", tmp_path / "key.pem")
    assert r.returncode == 0, r.stderr
    assert f"WARNING: skipping {src}/fifo: not a directory, regular file or symlink" in r.stderr
    tree = mf.load(str(tmp_path / "m.json"), [key.public_key()]).tree
    by_path = {n.path: n for n in tree.nodes}
    assert sorted(by_path) == [".", "a", "abs", "dir", "dir/deep", "dir/deep/b", "dir/up"]
    for path, n in by_path.items():
        st = os.stat(src) if path == "." else os.lstat(src / path)
        assert (n.mode, n.uid, n.gid, n.mtime) == (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns), path
    assert by_path["a"].mode == stat.S_IFREG | 0o4751 and by_path["a"].mtime == 1_500_000_000_123_456_789
    assert by_path["dir/deep/b"].uid == 1234 and by_path["dir/deep/b"].size == 0
    assert by_path["dir/up"].target == b"../a" and by_path["abs"].target == b"/etc/passwd"
    digest = subprocess.run(["fsverity", "digest", src / "a"], capture_output=True, text=True).stdout
    assert by_path["a"].digest_text == digest.split()[0] and by_path["a"].size == 5000
    assert by_path["."].nlink == 3 and by_path["dir"].nlink == 3  # 2 + subdirectories
    assert by_path["dir"].children.keys() == {b"deep", b"up"}
    # canonical: the same tree gives the same payload, whatever the scan order
    assert vf("seal", src, "--manifest", tmp_path / "m2.json").returncode == 0
    assert mf.read_envelope(str(tmp_path / "m2.json"))[1] == mf.read_envelope(str(tmp_path / "m.json"))[1]


BAD = [
    (lines(d("."), ["fifo", "a", 0o644, 0, 0, 0]), "line 3 (a): unknown type 'fifo'"),
    (lines(d("."), f("a", mode=0o10000)), "line 3 (a): mode must be an integer in [0, 4095]"),
    (lines(d("."), f("a", mode=-1)), "mode must be an integer"),
    (lines(d("."), f("a", mode=True)), "mode must be an integer"),
    (lines(d("."), f("a"), f("a/b")), "line 4 (a/b): parent 'a' is not a listed directory"),
    (lines(d("."), s("l"), f("l/b")), "line 4 (l/b): parent 'l' is not a listed directory"),
    (lines(d("."), f("x/b")), "line 3 (x/b): parent 'x' is not a listed directory"),
    (lines(d("."), f("a\0b")), "path must be a non-empty string without NUL"),
    (lines(d("."), s("l", target="a\0b")), "line 3 (l): target must be a non-empty string without NUL"),
    (lines(d("."), s("l", target="")), "target must be a non-empty string"),
    (lines(d("."), s("l", target="\ud800")), "line 3 (l): target is not valid UTF-8"),
    (lines(d("."), s("l", target="\u00e9" * 2049)), "line 3 (l): target is longer than 4095 bytes"),
    # A path the daemon could never open (PATH_MAX counts its NUL): not a file it vouches for.
    (lines(d("."), *[d("/".join(["d" * 255] * k)) for k in range(1, 16)],
           d("/".join(["d" * 255] * 15 + ["e" * 254])),
           f("/".join(["d" * 255] * 15 + ["e" * 254, "z"]))),  # 4096 bytes
     "path is longer than 4095 bytes"),
    (lines(d("."), f("a"), f("a")), "line 4 (a): entries must be sorted by path, each listed once (this one is a duplicate)"),
    (lines(d("."), f("b"), f("a")), "out of order"),
    (lines(f("a")), "line 2 (a): the first entry must be the root directory '.'"),
    (lines(), "no entries"),
    (lines(d("."), arr(f("a")) + [1]), "a file entry has 10 fields (type, path, mode, uid, gid, mtime, size, digest, block_size, salt), not 11"),
    (lines(d("."), arr(d("a"))[:5]), "a dir entry has 6 fields"),
    (lines(d("."), f("a", digest="md5:00")), "line 3 (a): digest 'md5:00': unknown algorithm"),
    (lines(d("."), f("a", digest="sha256:00")), "has 1 bytes, expected 32"),
    (lines(d("."), f("a", digest="sha512:" + "00" * 32)), "has 32 bytes, expected 64"),
    (lines(d("."), f("a", block_size=131072)), "block_size must be an integer in [1, 65536]"),
    (lines(d("."), f("a", block_size=3000)), "power of 2"),
    (lines(d("."), f("a", salt="zz")), "non-hexadecimal"),
    (lines(d("."), f("a", uid=1 << 32)), "uid must be an integer"),
    (lines(d("."), f("a", size=-1)), "size must be an integer"),
    (lines(d("."), f("/etc/passwd")), "path must be relative and normalized"),
    (lines(d("."), f("a/../b")), "path must be relative and normalized"),
    (lines(d("."), f("./a")), "path must be relative and normalized"),
    (lines(d("."), d("a"), f("a//b")), "path must be relative and normalized"),
    (lines(d("."), f("x" * 256)), "name longer than 255 bytes"),
    (lines(d("."), "just a string"), "line 3: an entry must be a non-empty JSON array"),
    (lines(d("."), {"type": "dir"} and {"kind": "file"}), "line 3: an entry must be a non-empty JSON array"),
    (lines(d(".")) + b"[not json\n", "line 3: invalid JSON"),
    (lines(d(".")) + b"\xff\n", "line 3: not UTF-8 at byte 0"),
    (lines(d("."))[:-1], "payload does not end with a newline"),
    (lines(d("."), header={"format": "other", "version": 2}), "not a verityfuse-manifest document"),
    (lines(d("."), header={"format": "verityfuse-manifest", "version": 3}), "unsupported manifest version 3"),
    (json.dumps({"format": "verityfuse-manifest", "version": 1, "files": []}).encode() + b"\n",
     "manifest format version 1 lists file digests only"),
]


@pytest.mark.parametrize("payload,msg", BAD, ids=[m for _, m in BAD])
def test_malformed_payloads_are_refused_naming_the_entry(tmp_path, key, payload, msg):
    p = tmp_path / "m.json"
    p.write_bytes(mf.sign(payload, key))
    with pytest.raises(ManifestError) as e:
        mf.load(str(p), [key.public_key()])
    assert msg in str(e.value) and str(p) in str(e.value)


def test_v1_is_refused_with_the_command_that_rebuilds_it(tmp_path, key):
    v1 = json.dumps({"files": [], "format": "verityfuse-manifest", "version": 1}).encode()
    (tmp_path / "m.json").write_bytes(mf.sign(v1, key))
    (tmp_path / "mnt").mkdir()
    (tmp_path / "src").mkdir()
    for r in (vf("measure-manifest", tmp_path / "m.json"),
              vf("mount", "-f", tmp_path / "src", tmp_path / "mnt", "--manifest", tmp_path / "m.json",
                 "--trust-key", tmp_path / "pub.pem")):
        assert r.returncode == 1
        assert "verityfuse seal SOURCE --manifest M --sign-key KEY.pem" in r.stderr
        assert "Traceback" not in r.stderr


def test_envelopes(tmp_path, key):
    good = mf.sign(lines(d(".")), key)
    p = tmp_path / "m.json"
    env = json.loads(good)
    cases = [
        (good[: len(good) // 2], "invalid JSON"),
        (json.dumps({"format": "x", "payload": ""}).encode(), "not a verityfuse-signed-manifest"),
        (good.replace(b'"version": 1', b'"version": 9', 1), "unsupported envelope version 9"),
        (json.dumps(dict(env, payload="!!!")).encode(), "payload: invalid base64"),
        (json.dumps(dict(env, payload="AAA")).encode(), "payload: invalid base64"),
        (json.dumps(dict(env, signatures=[])).encode(), "no signatures"),
        (json.dumps(dict(env, signatures=[dict(env["signatures"][0], signature="@@")])).encode(),
         "invalid base64"),
        (b'{"x": {"payload": "AAAA"}, ' + good.lstrip()[1:], "malformed envelope (payload)"),
        (good.replace(b'"format"', b'"format": "a", "format"', 1), "duplicate key 'format'"),
    ]
    for data, msg in cases:
        p.write_bytes(data)
        with pytest.raises(ManifestError) as e:
            mf.load(str(p), [key.public_key()])
        assert msg in str(e.value), (data[:80], str(e.value))
    with open(p, "wb") as out:  # huge: refused before it is read
        out.truncate(mf.MAX_BYTES + 1)
    with pytest.raises(ManifestError, match="larger than"):
        mf.load(str(p), [key.public_key()])


def test_a_fifo_or_device_as_manifest_is_refused_without_blocking(tmp_path, key):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ManifestError, match="is a FIFO, not a regular file"):
        mf.load(str(tmp_path / "fifo"), [key.public_key()])
    with pytest.raises(ManifestError, match="is a character device"):
        mf.load("/dev/zero", [key.public_key()])


def test_signature_and_pinning(tmp_path, key):
    payload = lines(d("."), f("a"), d("b"), f("b/c", digest="sha256:" + bytes(range(32)).hex()))
    p = tmp_path / "m.json"
    p.write_bytes(mf.sign(payload, key))
    m = mf.load(str(p), [key.public_key()])
    assert [n.path for n in m.tree.nodes] == [".", "a", "b", "b/c"]
    assert m.digest == mf.manifest_digest(payload)
    assert mf.load(str(p), pinned_digest=m.digest).digest == m.digest
    with pytest.raises(ManifestError, match="is not the pinned"):
        mf.load(str(p), pinned_digest="sha256:" + "11" * 32)
    with pytest.raises(ManifestError, match="not signed by a trusted key"):
        mf.load(str(p), [mf.Ed25519PrivateKey.generate().public_key()])
    with pytest.raises(ManifestError, match="must be authenticated"):
        mf.load(str(p))
    env = json.loads(p.read_bytes())
    env["payload"] = base64.b64encode(payload.replace(b'"a"', b'"A"')).decode()
    p.write_text(json.dumps(env))
    with pytest.raises(ManifestError, match="does not verify: the manifest was altered"):
        mf.load(str(p), [key.public_key()])


PEAK = """
import resource, sys
from verityfuse import manifest as mf
from verityfuse.errors import ManifestError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    mf.load(sys.argv[1], [mf.load_public_key(sys.argv[2])])
    print("LOADED")
except ManifestError as e:
    print("REFUSED", str(e)[-120:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def peak_kib(path, pub):
    r = subprocess.run([sys.executable, "-c", PEAK, str(path), str(pub)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    verdict, growth = r.stdout.splitlines()
    return verdict, int(growth)


def test_unauthenticated_manifests_cost_a_small_multiple_of_their_size(tmp_path, key):
    """Refused before parsing: a 60 MiB payload signed by another key, and 60 MiB of
    JSON junk around an empty payload (which a JSON parser would turn into ~1 GB)."""
    other = mf.Ed25519PrivateKey.generate()
    n = 300_000
    payload = lines(d("."), *(f(f"f{i:07d}") for i in range(n)))
    (tmp_path / "big.json").write_bytes(mf.sign(payload, other))
    size = (tmp_path / "big.json").stat().st_size
    assert size > 40 << 20
    verdict, growth = peak_kib(tmp_path / "big.json", tmp_path / "pub.pem")
    assert verdict.startswith("REFUSED") and "not signed by a trusted key" in verdict
    assert growth * 1024 < 5 * size, (growth, size)
    junk = b'{"format": "verityfuse-signed-manifest", "version": 1, "payload": "", "x": [' + \
        b"{}," * (20 << 20) + b'{}], "signatures": []}'
    (tmp_path / "junk.json").write_bytes(junk)
    verdict, growth = peak_kib(tmp_path / "junk.json", tmp_path / "pub.pem")
    assert "besides its payload" in verdict
    assert growth * 1024 < 3 * len(junk), (growth, len(junk))


def test_updating_paths_keeps_every_other_entry(tmp_path, key):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for name in ("a", "b", "d/c"):
        write(src / name, name.encode() * 3000)
    m = tmp_path / "m.json"
    sign = ["--manifest", m, "--sign-key", tmp_path / "key.pem"]
    assert vf("seal", src, *sign).returncode == 0
    before = {n.path: n for n in mf.load(str(m), [key.public_key()]).tree.nodes}
    write(src / "a", b"changed")
    os.unlink(src / "d" / "c")
    (src / "new" / "deeper").mkdir(parents=True)
    write(src / "new" / "deeper" / "x", b"x")
    write(src / "untouched-new", b"not asked for")
    r = vf("seal", src, src / "a", src / "d" / "c", src / "new", *sign)
    assert r.returncode == 0, r.stderr
    after = {n.path: n for n in mf.load(str(m), [key.public_key()]).tree.nodes}
    assert sorted(after) == [".", "a", "b", "d", "new", "new/deeper", "new/deeper/x"]
    assert after["b"].digest == before["b"].digest and after["a"].digest != before["a"].digest
    assert after["a"].size == len(b"changed")
    # an entry this key did not sign is never re-signed
    other = tmp_path / "other.pem"
    mf.generate_key(str(other), str(tmp_path / "other-pub.pem"))
    m.write_bytes(mf.sign(mf.read_envelope(str(m))[1] + json.dumps(arr(f("zz"))).encode() + b"\n",
                          mf.load_private_key(str(other))))
    r = vf("seal", src, src / "b", *sign)
    assert r.returncode == 1 and "not signed by a trusted key" in r.stderr
    assert "Traceback" not in r.stderr


def test_openssl_keys_and_measure_manifest(tmp_path):
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", tmp_path / "k.pem"], check=True)
    subprocess.run(["openssl", "pkey", "-in", tmp_path / "k.pem", "-pubout", "-out", tmp_path / "p.pem"],
                   check=True)
    src = tmp_path / "src"
    src.mkdir()
    write(src / "a", b"a" * 10000)
    r = vf("seal", src, "--manifest", tmp_path / "m.json", "--sign-key", tmp_path / "k.pem")
    assert r.returncode == 0, r.stderr
    m = mf.load(str(tmp_path / "m.json"), [mf.load_public_key(str(tmp_path / "p.pem"))])
    r = vf("measure-manifest", tmp_path / "m.json")
    assert r.returncode == 0 and r.stdout == m.digest + "\n"
    digest = subprocess.run(["fsverity", "digest", src / "a"], capture_output=True, text=True).stdout
    assert m.tree.nodes[1].digest_text == digest.split()[0]
    (tmp_path / "bad.json").write_text("{")
    r = vf("measure-manifest", tmp_path / "bad.json")
    assert r.returncode == 1 and "no base64 payload" in r.stderr


def test_manifest_in_source_does_not_list_itself_and_bad_key_fails_first(tmp_path, key):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "a", b"a" * 5000)
    m = src / "manifest.json"
    for _ in range(2):  # the second run finds the first run's manifest in SOURCE
        r = vf("seal", src, "--manifest", m, "--sign-key", tmp_path / "key.pem")
        assert r.returncode == 0, r.stderr
        assert "manifest.json" not in r.stdout
    assert [n.path for n in mf.load(str(m), [key.public_key()]).tree.nodes] == [".", "a"]
    write(src / "b", b"b")
    r = vf("seal", src, "--manifest", m, "--sign-key", tmp_path / "missing.pem")
    assert r.returncode == 1
    assert r.stderr == f"ERROR: {tmp_path}/missing.pem: No such file or directory\n"
    assert r.stdout == ""  # nothing was sealed before the key was refused


def test_a_manifest_over_64_mib_is_refused_on_its_size_unread(tmp_path, key):
    p = tmp_path / "huge.json"
    with open(p, "wb") as out:  # sparse: reading it would cost 64 MiB of memory
        out.truncate(100 << 20)
    verdict, growth = peak_kib(p, tmp_path / "pub.pem")
    assert verdict.startswith("REFUSED ")
    assert verdict.endswith(": manifest larger than 67108864 bytes (104857600 bytes): refused unread")
    assert growth < 8 << 10, growth  # KiB: nothing like the 64 MiB a read would take


# -- files the tools create: never through a planted name ----------------------------

def test_seal_writes_the_manifest_through_no_planted_symlink(tmp_path, key, monkeypatch):
    """Root seals into a directory an attacker can write: symlinks at the old
    temporary name (M.tmp.<pid>) and at M itself must not make it write elsewhere."""
    from verityfuse import cli

    src = tmp_path / "src"
    src.mkdir()
    write(src / "a", b"a" * 5000)
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's file\n")
    os.chmod(victim, 0o600)
    m = tmp_path / "m.json"
    os.symlink(victim, f"{m}.tmp.{os.getpid()}")  # the old predictable name, this process's pid
    os.symlink(victim, m)
    monkeypatch.chdir(tmp_path)
    r = vf("seal", src, "--manifest", m, "--sign-key", tmp_path / "key.pem")
    assert r.returncode == 1 and "cannot tell the sequence" in r.stderr  # M (the victim) is no manifest
    assert cli.main(["seal", str(src), "--manifest", str(m), "--sign-key", str(tmp_path / "key.pem"),
                     "--sequence", "5"]) == 0
    assert victim.read_bytes() == b"root's file\n" and os.stat(victim).st_mode & 0o777 == 0o600
    assert not os.path.islink(m) and mf.load(str(m), [key.public_key()]).sequence == 5
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(m).st_mode & 0o777 == 0o644 & ~umask
    assert sorted(os.listdir(tmp_path)) == sorted(["key.pem", "pub.pem", "m.json", "src", "victim",
                                                  f"m.json.tmp.{os.getpid()}"])


def test_atomic_write_never_writes_through_a_name_it_finds(tmp_path, monkeypatch):
    from verityfuse import wholefile

    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    tokens = iter(["guessed", "fresh"])
    monkeypatch.setattr(wholefile.secrets, "token_hex", lambda n: next(tokens))
    os.symlink(victim, tmp_path / ".out.guessed.tmp")  # as if the attacker guessed the name
    wholefile.atomic_write(str(tmp_path / "out"), b"data", 0o600)
    assert (tmp_path / "out").read_bytes() == b"data" and victim.read_bytes() == b"untouched"
    assert sorted(os.listdir(tmp_path)) == [".out.guessed.tmp", "out", "victim"]
    tokens = iter(["t2"])
    with pytest.raises(FileExistsError):
        wholefile.atomic_write(str(tmp_path / "out"), b"other", 0o600, replace=False)
    assert (tmp_path / "out").read_bytes() == b"data"
    assert sorted(os.listdir(tmp_path)) == [".out.guessed.tmp", "out", "victim"]  # no temp left


@pytest.mark.parametrize("planted", ["private", "public", "dangling-private"])
def test_keygen_never_overwrites_nor_follows_a_symlink(tmp_path, planted):
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's file\n")
    priv, pub = tmp_path / "k.pem", tmp_path / "p.pem"
    target = tmp_path / "nowhere" if planted == "dangling-private" else victim
    named = pub if planted == "public" else priv
    os.symlink(target, named)
    r = vf("keygen", priv, pub)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"ERROR: '{named}' exists; not overwriting a key\n"
    assert victim.read_bytes() == b"root's file\n" and not os.path.lexists(tmp_path / "nowhere")
    assert sorted(os.listdir(tmp_path)) == sorted(["victim", named.name])


def test_keygen_modes(tmp_path):
    r = vf("keygen", tmp_path / "k.pem", tmp_path / "p.pem")
    assert r.returncode == 0, r.stderr
    assert os.stat(tmp_path / "k.pem").st_mode & 0o777 == 0o600
    assert mf.load_public_key(str(tmp_path / "p.pem")).public_bytes_raw() == \
        mf.load_private_key(str(tmp_path / "k.pem")).public_key().public_bytes_raw()
    assert sorted(os.listdir(tmp_path)) == ["k.pem", "p.pem"]


def test_measure_manifest_names_a_bad_symlink_target_without_a_traceback(tmp_path, key):
    """Issue 16 item 9: a lone surrogate in a signed target printed a traceback."""
    p = tmp_path / "m.json"
    p.write_bytes(mf.sign(lines(d("."), s("l", target="\ud800")), key))
    r = vf("measure-manifest", p)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "line 3 (l): target is not valid UTF-8" in r.stderr
