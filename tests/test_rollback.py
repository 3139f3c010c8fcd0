"""Rollback protection (issue 15 part 4): the manifest header's sequence and expiry,
`seal` raising the sequence, `mount --min-sequence` and expiry refusing a manifest
after it is authenticated, and the key id the loader reports.

The attacker is the host: it can put back any manifest the key ever signed.
"""

import base64
import json
import os
import re
import subprocess
import sys
import time

import pytest

from verityfuse import manifest as mf
from verityfuse import manifest_header as mh
from verityfuse import manifest_tree as mt
from verityfuse.daemon import Trust
from verityfuse.errors import ManifestError
from verityfuse.mountopts import OptionError, Settings, parse
from conftest import write

VF = [sys.executable, "-m", "verityfuse.cli"]
ROOT = '["dir",".",493,0,0,0]\n'


def vf(*args):
    return subprocess.run([*VF, *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def key(tmp_path):
    return mf.generate_key(str(tmp_path / "key.pem"), str(tmp_path / "pub.pem"))


def signed(tmp_path, key, header_line, name="m.json"):
    p = tmp_path / name
    p.write_bytes(mf.sign((header_line + "\n" + ROOT).encode(), key))
    return str(p)


def header_of(path):
    return mt.parse_header(mf.read_envelope(str(path))[1], str(path))


# -- the header: exact integers, one spelling of a time, nothing unknown ----------

HEAD = '{"format":"verityfuse-manifest","version":2'
BAD_HEADERS = [
    ('{"format":"verityfuse-manifest","version":2.0}', "header: version must be a JSON integer, not 2.0"),
    ('{"format":"verityfuse-manifest","version":true}', "header: version must be a JSON integer, not True"),
    ('{"format":"verityfuse-manifest","version":2e0}', "header: version must be a JSON integer, not 2.0"),
    (HEAD + ',"sequence":2.0}', "header: sequence must be a JSON integer in [0, 9007199254740991], not 2.0"),
    (HEAD + ',"sequence":true}', "header: sequence must be a JSON integer in [0, 9007199254740991], not True"),
    (HEAD + ',"sequence":-1}', "header: sequence must be a JSON integer in [0, 9007199254740991], not -1"),
    (HEAD + ',"sequence":"3"}', "not '3'"),
    (HEAD + ',"sequence":9223372036854775808}', "not 9223372036854775808"),
    # Above what a JSON number holds exactly: a measured mount could not record it.
    (HEAD + ',"sequence":9007199254740992}', "not 9007199254740992"),
    (HEAD + ',"sequence":NaN}', "not nan"),
    (HEAD + ',"sequence":1,"sequence":2}', "line 1 (header): invalid JSON: duplicate key 'sequence'"),
    (HEAD + ',"expires":1767225600}', "header: expires: 1767225600 is not a UTC time YYYY-MM-DDTHH:MM:SSZ"),
    (HEAD + ',"expires":"2027-01-01T00:00:00+00:00"}', "is not a UTC time YYYY-MM-DDTHH:MM:SSZ"),
    (HEAD + ',"expires":"2027-01-01T00:00:00.5Z"}', "is not a UTC time YYYY-MM-DDTHH:MM:SSZ"),
    (HEAD + ',"expires":"2027-01-01t00:00:00z"}', "is not a UTC time YYYY-MM-DDTHH:MM:SSZ"),
    (HEAD + ',"expires":"2027-02-30T00:00:00Z"}', "'2027-02-30T00:00:00Z' is not a valid time"),
    (HEAD + ',"expires":"2026-12-31T23:59:60Z"}', "is not a valid time between 1970 and 9999"),
    (HEAD + ',"expires":"1969-12-31T23:59:59Z"}', "is not a valid time between 1970 and 9999"),
    (HEAD + ',"expires":null}', "header: expires: None is not a UTC time"),
    (HEAD + ',"sequence":1,"signed_by":"me"}', "header: unknown key 'signed_by' (a header has format, "
                                              "version, sequence, expires)"),
]


@pytest.mark.parametrize("head,msg", BAD_HEADERS, ids=[h for h, _ in BAD_HEADERS])
def test_header_numbers_are_exact_integers_and_times_have_one_spelling(tmp_path, key, head, msg):
    p = signed(tmp_path, key, head)
    with pytest.raises(ManifestError) as e:
        mf.load(p, [key.public_key()])
    assert str(e.value).startswith(f"{p}: ") and msg in str(e.value), str(e.value)
    r = vf("measure-manifest", p)  # the offline tool refuses it the same way, no traceback
    assert r.returncode == 1 and r.stdout == "" and msg in r.stderr and "Traceback" not in r.stderr


def test_entry_numbers_are_exact_integers_too(tmp_path, key):
    for bad, msg in (('["dir",".",493.0,0,0,0]', "mode must be an integer in [0, 4095], not 493.0"),
                     ('["dir",".",493,0,0,1e3]', "mtime must be an integer"),
                     ('["dir",".",493,false,0,0]', "uid must be an integer in [0, 4294967294], not False")):
        p = tmp_path / "m.json"
        p.write_bytes(mf.sign((HEAD + "}\n" + bad + "\n").encode(), key))
        with pytest.raises(ManifestError) as e:
            mf.load(str(p), [key.public_key()])
        assert str(e.value).startswith(f"{p}: line 2 (.): {msg}"), str(e.value)


def test_the_envelope_version_is_an_exact_integer_too(tmp_path, key):
    good = mf.sign((HEAD + "}\n" + ROOT).encode(), key)
    p = tmp_path / "m.json"
    for bad, shown in ((b'"version": 1.0', "1.0"), (b'"version": true', "True")):
        p.write_bytes(good.replace(b'"version": 1', bad, 1))
        with pytest.raises(ManifestError) as e:
            mf.load(str(p), [key.public_key()])
        assert str(e.value) == f"{p}: unsupported envelope version {shown}"


def test_old_v2_manifests_load_as_sequence_0_unless_a_minimum_is_required(tmp_path, key):
    p = signed(tmp_path, key, HEAD + "}")
    m = mf.load(p, [key.public_key()])
    assert (m.sequence, m.expires, m.key_id) == (0, None, mf.key_id(key.public_key()))
    with pytest.raises(ManifestError) as e:
        mf.load(p, [key.public_key()], min_sequence=1)
    assert str(e.value) == f"{p}: manifest sequence 0 is older than the minimum 1: a rollback?"


def test_the_header_line_is_canonical():
    assert mh.line(mh.Header()) == '{"format":"verityfuse-manifest","version":2}'
    assert mh.line(mh.Header(7, mh.parse_time("2027-01-01T00:00:00Z"))) == \
        '{"expires":"2027-01-01T00:00:00Z","format":"verityfuse-manifest","sequence":7,"version":2}'
    assert mh.parse_time("2027-01-01T00:00:00Z") == 1798761600
    assert mh.format_time(1798761600) == "2027-01-01T00:00:00Z"
    payload = mt.make_payload([dict(path=".", type="dir", mode=0o755, uid=0, gid=0, mtime=0)],
                              mh.Header(3, 1798761600))
    assert payload == (b'{"expires":"2027-01-01T00:00:00Z","format":"verityfuse-manifest",'
                       b'"sequence":3,"version":2}\n["dir",".",493,0,0,0]\n')
    assert mt.parse_payload(payload).header == mh.Header(3, 1798761600)


# -- freshness: after authentication, before parsing the entries ------------------

def test_min_sequence_and_expiry_are_checked_with_both_values_named(tmp_path, key):
    p = signed(tmp_path, key, mh.line(mh.Header(4, 1798761600)))
    pub = [key.public_key()]
    before = 1798761600 - 1
    m = mf.load(p, pub, min_sequence=4, now=before)
    assert (m.sequence, m.expires) == (4, 1798761600)
    with pytest.raises(ManifestError) as e:
        mf.load(p, pub, min_sequence=5, now=before)
    assert str(e.value) == f"{p}: manifest sequence 4 is older than the minimum 5: a rollback?"
    for now in (1798761600, 1798761600 + 86400):  # expired at the instant itself
        with pytest.raises(ManifestError) as e:
            mf.load(p, pub, now=now)
        assert str(e.value) == (f"{p}: manifest expired at 2027-01-01T00:00:00Z "
                                f"(now {mh.format_time(now)})")
    # the clock by default: this one expired in 2026
    old = signed(tmp_path, key, mh.line(mh.Header(4, 1767225600)), "old.json")
    with pytest.raises(ManifestError, match=r"manifest expired at 2026-01-01T00:00:00Z \(now 20"):
        mf.load(old, pub)


def test_freshness_is_judged_only_after_authentication(tmp_path, key):
    """An attacker's manifest claiming a huge sequence is refused for its signature,
    and an expired one by another key is refused as unsigned, not as expired."""
    other = mf.Ed25519PrivateKey.generate()
    p = signed(tmp_path, other, mh.line(mh.Header(10**9, 1767225600)))
    with pytest.raises(ManifestError, match="not signed by a trusted key"):
        mf.load(p, [key.public_key()], min_sequence=5)


def test_key_id_names_the_key_that_verified_none_when_only_pinned(tmp_path, key):
    p = signed(tmp_path, key, mh.line(mh.Header(1)))
    digest = mf.manifest_digest(mf.read_envelope(p)[1])
    other = mf.Ed25519PrivateKey.generate().public_key()
    assert mf.load(p, [other, key.public_key()]).key_id == mf.key_id(key.public_key())
    assert mf.load(p, pinned_digest=digest).key_id is None
    assert mf.load(p, [key.public_key()], digest).key_id == mf.key_id(key.public_key())
    unsigned = tmp_path / "u.json"
    unsigned.write_bytes(mf.sign(mf.read_envelope(p)[1], None))
    m = mf.load(str(unsigned), pinned_digest=digest)
    assert (m.key_id, m.sequence, m.digest) == (None, 1, digest)


def test_parse_expiry():
    now = 1798761600
    assert mh.parse_expiry("30d", now) == now + 30 * 86400
    assert mh.parse_expiry("12h", now) == now + 12 * 3600
    assert mh.parse_expiry("90m", now) == now + 5400
    assert mh.parse_expiry("2w", now) == now + 14 * 86400
    assert mh.parse_expiry("2028-01-01T00:00:00Z", now) == 1830297600
    assert mh.parse_expiry("never", now) is None
    for text, msg in (("0s", "2027-01-01T00:00:00Z is not in the future (now 2027-01-01T00:00:00Z)"),
                      ("2026-06-01T00:00:00Z", "is not in the future"),
                      ("30 d", "is neither a duration"), ("-1d", "is neither a duration"),
                      ("1y", "is neither a duration"), ("2028-01-01", "is neither a duration"),
                      ("2028-02-30T00:00:00Z", "'2028-02-30T00:00:00Z' is not a valid time"),
                      ("999999999999w", "ends after 9999")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            mh.parse_expiry(text, now)


# -- seal: every update raises the sequence ----------------------------------------

@pytest.fixture
def src(tmp_path):
    s = tmp_path / "src"
    s.mkdir()
    write(s / "a", b"a" * 5000)
    write(s / "b", b"b" * 100)
    return s


def test_seal_raises_the_sequence_on_every_update(tmp_path, key, src):
    m = tmp_path / "m.json"
    sign = ["--manifest", m, "--sign-key", tmp_path / "key.pem"]
    r = vf("seal", src, *sign)
    assert r.returncode == 0, r.stderr
    digest = mf.manifest_digest(mf.read_envelope(str(m))[1])
    assert r.stderr == f"manifest {m}: 3 entries (2 files), {digest}, sequence 1\n"
    assert vf("seal", src, *sign).returncode == 0
    assert header_of(m) == mh.Header(2)
    write(src / "a", b"changed")
    r = vf("seal", src, src / "a", *sign, "--json")  # an update of some paths
    assert r.returncode == 0, r.stderr
    last = json.loads(r.stdout.splitlines()[-1])
    assert (last["sequence"], last["expires"], last["signed"]) == (3, None, True)
    r = vf("seal", src, *sign, "--sequence", "10", "--expires", "2099-01-01T00:00:00Z")
    assert r.returncode == 0, r.stderr
    assert r.stderr.endswith(", sequence 10, expires 2099-01-01T00:00:00Z\n")
    m10 = mf.load(str(m), [key.public_key()])
    assert (m10.sequence, m10.expires) == (10, mh.parse_time("2099-01-01T00:00:00Z"))
    r = vf("measure-manifest", m)
    assert r.returncode == 0 and r.stdout == m10.digest + "\n"
    assert r.stderr == "sequence 10, expires at 2099-01-01T00:00:00Z\n"
    j = json.loads(vf("measure-manifest", m, "--json").stdout)
    assert (j["digest"], j["sequence"], j["expires"], j["expired"]) == \
        (m10.digest, 10, "2099-01-01T00:00:00Z", False)
    before = m.read_bytes()
    for args, msg in (
            (["--sequence", "10", "--expires", "never"],
             f"ERROR: --sequence 10 is not above the sequence 10 of {m} (a sequence never goes "
             f"back: remove {m} first to start again)\n"),
            (["--sequence", "3", "--expires", "never"], "ERROR: --sequence 3 is not above"),
            ([], f"ERROR: {m} expires (at 2099-01-01T00:00:00Z): give --expires WHEN for the new "
                 f"manifest, or --expires never\n"),
            (["--expires", "2020-01-01T00:00:00Z"],
             "ERROR: --expires: 2020-01-01T00:00:00Z is not in the future (now ")):
        r = vf("seal", src, *sign, *args)
        assert r.returncode == 1 and r.stderr.startswith(msg), r.stderr
        assert r.stdout == ""  # refused before anything was sealed
    assert m.read_bytes() == before
    for args in (["--sequence", "0"], ["--sequence", "-1"], ["--sequence", "2.0"]):
        r = vf("seal", src, *sign, *args)
        assert r.returncode == 2 and "argument --sequence: " in r.stderr
    for when, msg in (("garbage", "'garbage' is neither a duration (90m, 12h, 30d, 2w) nor a UTC "
                                  "time YYYY-MM-DDTHH:MM:SSZ nor 'never'"),
                      ("2027-02-30T00:00:00Z", "'2027-02-30T00:00:00Z' is not a valid time"),
                      ("999999999999w", "'999999999999w' ends after 9999")):
        r = vf("seal", src, *sign, "--expires", when)
        assert r.returncode == 2 and f"argument --expires: {msg}\n" in r.stderr, r.stderr
        assert r.stdout == ""
    assert m.read_bytes() == before
    r = vf("seal", src, *sign, "--expires", "never")
    assert r.returncode == 0 and header_of(m) == mh.Header(11)


def test_resealing_a_signed_manifest_without_a_key_is_refused(tmp_path, key, src):
    m = tmp_path / "m.json"
    assert vf("seal", src, "--manifest", m, "--sign-key", tmp_path / "key.pem").returncode == 0
    before = m.read_bytes()
    for paths in ([], [src / "a"]):
        r = vf("seal", src, *paths, "--manifest", m)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr == (f"ERROR: {m} is signed: give --sign-key KEY.pem to sign the new "
                            f"manifest too, or --unsigned to replace it with an unsigned one\n")
    assert m.read_bytes() == before
    r = vf("seal", src, "--manifest", m, "--sign-key", tmp_path / "key.pem", "--unsigned")
    assert r.returncode == 2 and r.stderr == "ERROR: --unsigned and --sign-key contradict each other\n"
    r = vf("seal", src, "--unsigned")
    assert r.returncode == 2 and r.stderr == "ERROR: --unsigned, --sequence, --expires and --local are for --manifest\n"
    r = vf("seal", src, "--manifest", m, "--unsigned")
    assert r.returncode == 0, r.stderr
    assert r.stderr.endswith(", sequence 2 (unsigned: mount it with --manifest-digest)\n")
    assert mf.read_envelope(str(m))[0]["signatures"] == []
    # an unsigned manifest can be re-sealed unsigned, and signed again
    assert vf("seal", src, "--manifest", m).returncode == 0
    assert vf("seal", src, "--manifest", m, "--sign-key", tmp_path / "key.pem").returncode == 0
    assert mf.load(str(m), [key.public_key()]).sequence == 4


def test_an_unreadable_previous_manifest_needs_an_explicit_sequence(tmp_path, key, src):
    m = tmp_path / "m.json"
    m.write_text("{")
    r = vf("seal", src, "--manifest", m, "--sign-key", tmp_path / "key.pem")
    assert r.returncode == 1 and r.stderr == (
        f"ERROR: {m}: not a verityfuse-signed-manifest file (no base64 payload): cannot tell "
        f"the sequence of the manifest it replaces; give --sequence N, above any sequence "
        f"published\n")
    r = vf("seal", src, "--manifest", m, "--sign-key", tmp_path / "key.pem", "--sequence", "7")
    assert r.returncode == 0, r.stderr
    assert mf.load(str(m), [key.public_key()]).sequence == 7
    # a version 1 manifest is replaced by the command its refusal names: sequence 1
    v1 = json.dumps({"files": [], "format": "verityfuse-manifest", "version": 1}).encode()
    m.write_bytes(mf.sign(v1, key))
    assert vf("seal", src, "--manifest", m, "--sign-key", tmp_path / "key.pem").returncode == 0
    assert mf.load(str(m), [key.public_key()]).sequence == 1


# -- mount: a rolled-back or expired manifest is refused before mounting -------------

def test_mount_options_and_trust():
    assert parse(["min_sequence=5"]).min_sequence == 5
    assert parse(["ro,min-sequence=0"]).min_sequence == 0
    for bad, msg in (("min_sequence=-1", "min_sequence: must be a positive integer, not -1"),
                     ("min_sequence=x", "min_sequence: 'x' is not an integer"),
                     ("min_sequence", "min_sequence: needs a value")):
        with pytest.raises(OptionError) as e:
            parse([bad])
        assert str(e.value).startswith(msg)
    with pytest.raises(ManifestError, match="trust_key, manifest_digest and min_sequence need a manifest"):
        Trust(Settings(min_sequence=1))


@pytest.fixture
def versions(tmp_path, key, src):
    """Manifest 1 (the old config) and manifest 2 (the new one), both signed by the key;
    the share holds the new data."""
    m = tmp_path / "m.json"
    write(src / "config", b"old config\n")
    assert vf("seal", src, "--manifest", m, "--sign-key", tmp_path / "key.pem").returncode == 0
    old = tmp_path / "m1.json"
    old.write_bytes(m.read_bytes())
    write(src / "config", b"new config\n")
    assert vf("seal", src, src / "config", "--manifest", m, "--sign-key",
              tmp_path / "key.pem").returncode == 0
    assert (header_of(old).sequence, header_of(m).sequence) == (1, 2)
    return old, m


def test_an_older_signed_manifest_is_refused_with_min_sequence(tmp_path, src, versions, verified_mount):
    old, new = versions
    pub = tmp_path / "pub.pem"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for how in (["--min-sequence", "2"], ["-o", "ro,min_sequence=2"]):
        r = vf("mount", "-f", src, mnt, "--manifest", old, "--trust-key", pub, *how)
        assert not os.path.ismount(mnt)
        assert r.returncode == 1 and r.stderr == (f"ERROR: refusing to mount: {old}: manifest "
                                                  f"sequence 1 is older than the minimum 2: "
                                                  f"a rollback?\n")
    # without a minimum, the key alone accepts the old manifest (what the README warns of)
    g = verified_mount(src, seal=False, extra_args=["--manifest", str(old), "--trust-key", str(pub)])
    try:
        with open(g.mountpoint / "config", "rb") as f:
            f.read()
        raise AssertionError("the old manifest's config must not verify against the new data")
    except OSError as e:
        assert e.errno == 5  # EIO: the data is the new one, the old manifest names the old digest
    g.unmount()
    g = verified_mount(src, seal=False,
                       extra_args=["--manifest", str(new), "--trust-key", str(pub), "--min-sequence", "2"])
    assert (g.mountpoint / "config").read_bytes() == b"new config\n"
    assert (g.mountpoint / "a").read_bytes() == b"a" * 5000


def test_an_expired_manifest_is_refused(tmp_path, key, src):
    m = tmp_path / "m.json"
    assert vf("seal", src, "--manifest", m, "--sign-key", tmp_path / "key.pem").returncode == 0
    payload = mf.read_envelope(str(m))[1]
    entries = payload.split(b"\n", 1)[1]
    expired = (mh.line(mh.Header(2, 1767225600)) + "\n").encode() + entries
    m.write_bytes(mf.sign(expired, key))  # the signer's own manifest, past its expiry
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    now = time.time()
    r = vf("mount", "-f", src, mnt, "--manifest", m, "--trust-key", tmp_path / "pub.pem")
    assert not os.path.ismount(mnt)
    prefix = f"ERROR: refusing to mount: {m}: manifest expired at 2026-01-01T00:00:00Z (now "
    assert r.returncode == 1 and r.stderr.startswith(prefix), r.stderr
    shown = mh.parse_time(r.stderr[len(prefix):].rstrip(")\n"))
    assert shown >= int(now)  # the clock's time, as the daemon read it
    # pinning its digest does not revive it
    digest = mf.manifest_digest(expired)
    r = vf("mount", "-f", src, mnt, "--manifest", m, "--manifest-digest", digest)
    assert r.returncode == 1 and r.stderr.startswith(prefix)
    r = vf("measure-manifest", m)  # still measurable offline, and says so
    assert r.returncode == 0 and r.stdout == digest + "\n"
    assert r.stderr == "sequence 2, expired at 2026-01-01T00:00:00Z\n"
