"""Trusted digests: manifests (malformed input, signatures, attacks on a real
mount from the untrusted side) and fsverity-utils PKCS#7 signatures.

The attacker can write everything under the share: data, store, manifest.
Only the trusted key (or pinned manifest digest) is out of reach.
"""

import base64
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

from verityfuse import manifest as mf

from verityfuse.sealing import entry_of_path
from verityfuse.store import Store
from verityfuse.small_trees import SMALL_TREE_BYTES
from verityfuse.store_object import TREE_OFFSET
from conftest import drop_caches, flip, write
from test_mount import object_file

VF = [sys.executable, "-m", "verityfuse.cli"]


def vf(*args):
    return subprocess.run([*VF, *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def key(tmp_path):
    return mf.generate_key(str(tmp_path / "key.pem"), str(tmp_path / "pub.pem"))


# -- the confidential-container setting, on a real mount ------------------------

@pytest.fixture
def share(tmp_path, key):
    """The host's share: data, store, signed manifest.  Returns (src, manifest, pub)."""
    src = tmp_path / "share"
    src.mkdir()
    write(src / "app.bin", os.urandom(300000))
    write(src / "config", b"trusted configuration\n")
    (src / "lib").mkdir()
    write(src / "lib" / "x.so", os.urandom(9000))
    r = vf("seal", src, "--manifest", tmp_path / "m.json", "--sign-key", tmp_path / "key.pem")
    assert r.returncode == 0, r.stderr
    return src, tmp_path / "m.json", tmp_path / "pub.pem"


def guest(verified_mount, share):
    src, m, pub = share
    return verified_mount(src, seal=False, policy="require",
                          extra_args=["--manifest", str(m), "--trust-key", str(pub)])


def open_errno(path):
    try:
        with open(path, "rb") as f:
            f.read()
        return None
    except OSError as e:
        return e.errno


def test_untampered_share_reads(share, verified_mount):
    g = guest(verified_mount, share)
    assert (g.mountpoint / "config").read_bytes() == b"trusted configuration\n"
    assert (g.mountpoint / "lib" / "x.so").read_bytes() == (share[0] / "lib" / "x.so").read_bytes()


def test_consistent_resealing_is_refused(share, verified_mount):
    """The attacker changes a file and re-seals it: data and tree agree, the manifest does not."""
    src = share[0]
    write(src / "config", b"evil configuration\n")
    assert vf("seal", src, src / "config").returncode == 0
    g = guest(verified_mount, share)
    assert open_errno(g.mountpoint / "config") == errno.EIO
    assert "integrity failure: config: the share's file is 19 bytes, the manifest says 22" in g.log()
    write(src / "config", b"evil configuration!!!\n")  # same size: it gives another digest
    r = vf("seal", src, src / "config")
    assert r.returncode == 0
    drop_caches()
    assert open_errno(g.mountpoint / "config") == errno.EIO
    tree = mf.load(str(share[1]), [mf.load_public_key(str(share[2]))]).tree
    trusted = next(n.digest_text for n in tree.files() if n.path == "config")
    assert (f"integrity failure: config: the share's file gives {r.stdout.split()[0]}, the "
            f"manifest says {trusted}\n") in g.log()


def test_a_change_with_no_index_entry_is_still_refused(share, verified_mount):
    """The data changed, and no index entry anywhere (a manifest seal writes none, and the
    attacker seals nothing): the manifest's digest names what the data fails."""
    src = share[0]
    write(src / "config", b"evil configuration\n")
    with Store(str(src / ".verityfuse")) as st:
        assert entry_of_path(st, src / "config") is None and st.count_entries() == 0
    g = guest(verified_mount, share)
    assert open_errno(g.mountpoint / "config") == errno.EIO


def test_path_swap_is_refused(share, verified_mount):
    src = share[0]
    os.rename(src / "config", src / "tmp")
    os.rename(src / "lib" / "x.so", src / "config")
    os.rename(src / "tmp", src / "lib" / "x.so")
    assert vf("seal", src, src / "config", src / "lib" / "x.so").returncode == 0  # indexes follow
    g = guest(verified_mount, share)
    assert open_errno(g.mountpoint / "config") == errno.EIO
    assert open_errno(g.mountpoint / "lib" / "x.so") == errno.EIO
    assert (g.mountpoint / "app.bin").read_bytes() == (src / "app.bin").read_bytes()


def test_deleted_and_added_files(share, verified_mount):
    src = share[0]
    os.unlink(src / "lib" / "x.so")
    os.unlink(src / "config")  # of one block: no object either
    write(src / "added", b"not in the manifest")
    assert vf("seal", src, src / "added").returncode == 0  # sealed, but not trusted
    g = guest(verified_mount, share)
    # listed: it still exists here, with the manifest's metadata, but cannot be read
    assert os.stat(g.mountpoint / "lib" / "x.so").st_size == 9000
    assert open_errno(g.mountpoint / "lib" / "x.so") == errno.EIO
    assert "lib/x.so: listed in the manifest, but the share has no regular file there" in g.log()
    # Its descriptor too: the share's fault is named, not an object it was never given.
    with pytest.raises(OSError) as e:
        os.getxattr(g.mountpoint / "config", "user.fsverity.descriptor")
    assert e.value.errno == errno.EIO
    assert "config: listed in the manifest, but the share has no regular file there" in g.log()
    assert "missing tree object" not in g.log()
    # not listed: it does not exist here at all
    assert open_errno(g.mountpoint / "added") == errno.ENOENT
    assert sorted(os.listdir(g.mountpoint)) == ["app.bin", "config", "lib"]  # the manifest's


def test_tree_and_descriptor_attacks(share, verified_mount):
    src = share[0]
    g = guest(verified_mount, share)
    obj = object_file(src, "app.bin")
    flip(obj, TREE_OFFSET + 3)  # its only tree block
    drop_caches()
    assert open_errno(g.mountpoint / "app.bin") == errno.EIO
    flip(obj, TREE_OFFSET + 3)  # mended: a tree that failed is read again at the next open
    flip(obj, TREE_OFFSET - 256 + 30)  # its descriptor
    drop_caches()
    assert open_errno(g.mountpoint / "app.bin") == errno.EIO
    # A small file's tree is made from its bytes, which hash to the manifest's digest:
    # its object damaged does not matter (one block: none; 9000 bytes: one tree block).
    # A file of one block is sealed without one: one the host plants changes nothing.
    planted = object_file(src, "config")
    assert not os.path.exists(planted)
    os.makedirs(os.path.dirname(planted), exist_ok=True)
    with open(planted, "wb") as f:
        f.write(b"planted by the host")
    flip(object_file(src, "lib/x.so"), TREE_OFFSET - 256 + 30)
    flip(object_file(src, "lib/x.so"), TREE_OFFSET + 3)
    drop_caches()
    assert (g.mountpoint / "config").read_bytes() == b"trusted configuration\n"
    assert (g.mountpoint / "lib/x.so").read_bytes() == (src / "lib/x.so").read_bytes()


def _refused_mount(src, tmp_path, *opts):
    """Mount SOURCE whose default store is a symlink: refused, naming it, never mounted."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        r = vf("mount", src, mnt, *opts, "--log-file", tmp_path / "log")
        assert not os.path.ismount(mnt)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", mnt])
    assert r.returncode == 1, r.stderr
    assert f"store {src}/.verityfuse: a symlink or not a directory (refused as SOURCE's own " \
        f"store; name the store's own path with --store)" in r.stderr
    assert "Traceback" not in r.stderr


def test_store_symlinked_out_of_the_share_is_refused(share, tmp_path):
    """The default store is SOURCE/.verityfuse, inside the host's share: the host must
    not be able to point the daemon at a directory elsewhere in the guest with a
    symlink there (the objects would still have to hash right, but the daemon would
    read wherever the host says)."""
    src, m, pub = share
    elsewhere = tmp_path / "guest-dir"
    shutil.move(src / ".verityfuse", elsewhere)
    os.symlink(elsewhere, src / ".verityfuse")
    _refused_mount(src, tmp_path, "--manifest", m, "--trust-key", pub)


def test_local_mount_refuses_a_default_store_planted_as_a_symlink(tmp_path):
    """Local mode's default store is SOURCE's too: a symlink planted there would have the
    daemon (root) clean up tmp/ files and create the store wherever it points."""
    src, victim = tmp_path / "src", tmp_path / "victim"
    src.mkdir()
    (victim / "tmp").mkdir(parents=True)
    (victim / "tmp" / "4000000.backup").write_bytes(b"precious")
    os.symlink(victim, src / ".verityfuse")
    _refused_mount(src, tmp_path)
    assert os.listdir(victim / "tmp") == ["4000000.backup"]


@pytest.mark.parametrize("attack", ["other-key", "edited-entry", "rolled-back", "rolled-back-key-only"])
def test_manifest_attacks_refuse_to_mount(share, tmp_path, attack):
    src, m, pub = share
    if attack == "other-key":  # a manifest for the altered data, signed by the attacker's key
        k2 = mf.Ed25519PrivateKey.generate()
        m.write_bytes(mf.sign(mf.read_envelope(str(m))[1], k2))
        msg = "not signed by a trusted key"
    elif attack == "edited-entry":
        env = json.loads(m.read_bytes())
        payload = base64.b64decode(env["payload"]).replace(b'"config"', b'"configX"')
        env["payload"] = base64.b64encode(payload).decode()
        m.write_text(json.dumps(env))
        msg = "does not verify: the manifest was altered"
    else:  # an older manifest, properly signed: caught by the pin, or by the minimum sequence
        current = vf("measure-manifest", m).stdout.strip()
        old = tmp_path / "old.json"
        shutil.copy(m, old)
        write(src / "config", b"new version\n")
        assert vf("seal", src, "--manifest", m, "--sign-key", tmp_path / "key.pem").returncode == 0
        pinned = vf("measure-manifest", m).stdout.strip()
        assert pinned != current
        m = old
        msg = ("is not the pinned" if attack == "rolled-back" else
               f"{old}: manifest sequence 1 is older than the minimum 2: a rollback?")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    extra = []
    if attack == "rolled-back":
        extra = ["--manifest-digest", pinned]
    elif attack == "rolled-back-key-only":
        extra = ["--min-sequence", "2"]
    r = vf("mount", "-f", src, mnt, "--manifest", m, "--trust-key", pub, *extra)
    assert r.returncode == 1
    assert "refusing to mount" in r.stderr and msg in r.stderr
    assert not os.path.ismount(mnt)


# -- fsverity-utils signatures --------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    for name in ("trusted", "other"):
        subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", d / f"{name}.key",
                        "-x509", "-out", d / f"{name}.pem", "-subj", f"/CN={name}", "-days", "2"],
                       check=True, capture_output=True)
    return d


def sign(path, sig, certs, name="trusted"):
    r = subprocess.run(["fsverity", "sign", path, sig, f"--key={certs}/{name}.key",
                        f"--cert={certs}/{name}.pem"], capture_output=True, text=True, check=True)
    return r.stdout


def test_fsverity_signatures_generic_577(tmp_path, certs, verified_mount):
    src = tmp_path / "src"
    src.mkdir()
    for n in ("good", "wrongfile", "malformed", "untrusted", "unsigned"):
        write(src / n, n.encode() * 1000)
    out = sign(src / "good", tmp_path / "good.sig", certs)
    assert out.startswith(f"Signed file '{src}/good' (sha256:")
    sign(src / "untrusted", tmp_path / "untrusted.sig", certs, "other")
    (tmp_path / "bad.sig").write_bytes(b"foobarbaz")
    m = verified_mount(src, seal=False, extra_args=["--trust-cert", str(certs / "trusted.pem")])
    mp = m.mountpoint

    def enable(name, sig=None):
        r = subprocess.run(["fsverity", "enable", mp / name] + ([f"--signature={sig}"] if sig else []),
                           capture_output=True, text=True)
        return r.stderr.strip().rpartition(": ")[2] if r.returncode else "OK"

    assert enable("good", tmp_path / "good.sig") == "OK"
    assert enable("wrongfile", tmp_path / "good.sig") == "Key was rejected by service"
    assert enable("malformed", tmp_path / "bad.sig") == "Bad message"
    assert enable("untrusted", tmp_path / "untrusted.sig") == "Required key not available"
    assert enable("unsigned") == "OK"
    assert (mp / "good").read_bytes() == b"good" * 1000
    r = subprocess.run([*VF, "dump-metadata", "signature", mp / "good"], capture_output=True)
    assert r.stdout == (tmp_path / "good.sig").read_bytes()
    m.unmount()
    # checked on every open: another trusted set refuses the signed file
    m2 = verified_mount(src, seal=False, extra_args=["--trust-cert", str(certs / "other.pem")])
    assert open_errno(m2.mountpoint / "good") == errno.ENOKEY
    m2.unmount()
    # fs.verity.require_signatures=1: unsigned verity files and unsigned enables are refused
    m3 = verified_mount(src, seal=False, extra_args=["--trust-cert", str(certs / "trusted.pem"),
                                                      "--require-signatures"])
    assert open_errno(m3.mountpoint / "unsigned") == errno.EPERM
    assert (m3.mountpoint / "good").read_bytes() == b"good" * 1000
    write(src / "new", b"n")
    r = subprocess.run(["fsverity", "enable", m3.mountpoint / "new"], capture_output=True, text=True)
    assert "Operation not permitted" in r.stderr


@pytest.mark.parametrize("alg,block,salt", [("sha256", 4096, ""), ("sha512", 1024, "0a0b0c")])
def test_small_files_read_against_the_manifest_alone(tmp_path, key, verified_mount,
                                                     alg, block, salt):
    """A small file's tree is made from its bytes: a file of at most one block has none,
    one of up to SMALL_TREE_BYTES one block of its blocks' hashes.  A manifest mount reads
    it against the descriptor of the manifest's parameters, size and that root hash, used
    only if it hashes to the manifest's digest.  With the sealing parameters of the
    manifest (hash, block size, salt), with its store objects gone (a file of one block
    is sealed without one), `fsverity measure`
    still says `fsverity digest`'s digest, the exported descriptor and tree are
    fsverity-utils', and the bytes are the sealed ones; a flipped byte there is EIO
    (nothing else could vouch for it), and a larger file without its object is EIO as
    before."""
    src = tmp_path / "share"
    src.mkdir()
    sizes = {"empty": 0, "one": 1, "part": block - 1, "block": block, "two": block + 1,
             "small": 3 * block + 5, "limit": SMALL_TREE_BYTES, "big": SMALL_TREE_BYTES + 1}
    data = {n: os.urandom(s) for n, s in sizes.items()}
    for n, b in data.items():
        write(src / n, b)
    opts = [f"--hash-alg={alg}", f"--block-size={block}"] + ([f"--salt={salt}"] if salt else [])
    r = vf("seal", src, *opts, "--manifest", tmp_path / "m.json", "--sign-key", tmp_path / "key.pem")
    assert r.returncode == 0, r.stderr
    oracle = {n: subprocess.run(["fsverity", "digest", str(src / n), *opts], check=True,
                                capture_output=True, text=True).stdout.split()[0]
              for n in sizes}
    params = dict(hash_alg=alg, block_size=block, salt=bytes.fromhex(salt))
    for n, size in sizes.items():
        if size <= block:
            assert not os.path.exists(object_file(src, n, **params)), n  # sealed without one
        else:
            os.unlink(object_file(src, n, **params))  # nothing in the store names them now
    m = verified_mount(src, seal=False, policy="require",
                       extra_args=["--manifest", str(tmp_path / "m.json"),
                                   "--trust-key", str(tmp_path / "pub.pem")])
    for n, size in sizes.items():
        if size > SMALL_TREE_BYTES:
            assert open_errno(m.mountpoint / n) == errno.EIO, n  # its tree needs its object
            continue
        assert (m.mountpoint / n).read_bytes() == data[n], n
        out = subprocess.run(["fsverity", "measure", str(m.mountpoint / n)], check=True,
                             capture_output=True, text=True).stdout.split()[0]
        assert out == oracle[n], n
        # What the mount exports of its metadata needs no object either: the descriptor
        # and the tree fsverity-utils computes (none for a file of one block).
        subprocess.run(["fsverity", "digest", str(src / n), *opts,
                        f"--out-descriptor={tmp_path / 'oracle.desc'}",
                        f"--out-merkle-tree={tmp_path / 'oracle.tree'}"], check=True,
                       capture_output=True)
        for kind, want in (("descriptor", (tmp_path / "oracle.desc").read_bytes()),
                           ("merkle_tree", (tmp_path / "oracle.tree").read_bytes())):
            r = subprocess.run([*VF, "dump-metadata", kind, str(m.mountpoint / n)],
                               capture_output=True)
            assert (r.returncode, r.stdout) == (0, want), (n, kind, r.stderr)
        assert (size > block) == (len(want) == block), n  # one tree block, or none
    failures = [line for line in m.log().splitlines() if "integrity failure" in line]
    assert failures and all("integrity failure: big:" in line for line in failures), failures
    flip(src / "part", block // 2)
    drop_caches()
    assert open_errno(m.mountpoint / "part") == errno.EIO
    # Sealed without an object: its bytes are all there is, and the log says what they give.
    assert any(f"integrity failure: part: the share's file gives {alg}:" in line
               and line.endswith(f", the manifest says {oracle['part']}")
               for line in m.log().splitlines()), m.log()
    flip(src / "small", 2 * block + 7)
    drop_caches()
    assert open_errno(m.mountpoint / "small") == errno.EIO
    assert any("integrity failure: small:" in line and "missing tree object" in line
               and f"; and the share's file gives {alg}:" in line
               and line.endswith(f", the manifest says {oracle['small']}")
               for line in m.log().splitlines()), m.log()
    assert (m.mountpoint / "one").read_bytes() == data["one"]
    assert (m.mountpoint / "two").read_bytes() == data["two"]


@pytest.mark.parametrize("name", ["config", "lib/x.so"])
@pytest.mark.parametrize("change", ["truncate", "extend"])
def test_a_small_file_resized_while_open_is_eio(share, verified_mount, change, name):
    """The host truncates or extends a small file (of one block; of three, with a tree
    block) after the open that made its tree from its bytes: its size stays the
    manifest's, and a read of its end that reaches the daemon gives EIO (the first is
    the truncation-while-open check of manifest_attacks for a tree made at open)."""
    src = share[0]
    g = guest(verified_mount, share)
    want = (src / name).read_bytes()
    fd = os.open(g.mountpoint / name, os.O_RDONLY)
    try:
        assert os.pread(fd, 16384, 0) == want
        if change == "truncate":
            os.truncate(src / name, len(want) - 1)
        else:
            with open(src / name, "ab") as f:
                f.write(b"x")
        drop_caches()
        assert os.fstat(fd).st_size == len(want)
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, len(want) - 1)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
