"""The public API (``import verityfuse``): digest, seal, verify, open_verified.

fsverity-utils is the oracle for digests; the CLI for interoperability; nothing here mounts.
"""

import errno
import gc
import importlib.util
import io
import os
import subprocess
import sys

import pytest

import verityfuse
from verityfuse import Digest, IntegrityError, NotSealedError, VerifiedFile, VerityError
from verityfuse.errors import (ContentMismatch, InvalidParameters, SaltTooLong, SizeMismatch,
                               StoreCorrupt)
from conftest import FSVERITY, flip, fsverity_digest, pattern, write

VF = [sys.executable, "-m", "verityfuse"]
SIZES = [0, 1, 4095, 4096, 4097, 300000, (1 << 20) + 12345]


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    (d / "sub" / "deep").mkdir(parents=True)
    write(d / "big", pattern(300000))
    write(d / "small", b"hello\n")
    write(d / "sub" / "empty", b"")
    write(d / "sub" / "deep" / "x", b"x" * 5000)
    os.symlink("big", d / "link")
    return d


# -- package ---------------------------------------------------------------------------


def test_all_names_resolve_and_are_documented():
    for name in verityfuse.__all__:
        obj = getattr(verityfuse, name)
        if name != "__version__":
            assert obj.__doc__, name
    assert verityfuse.__version__ == "0.1.0"
    assert set(verityfuse.__all__) <= set(dir(verityfuse))


def test_import_is_cheap_and_pulls_in_no_fuse():
    code = ("import sys, verityfuse\n"
            "heavy = ('pyfuse3', 'trio', 'cryptography', 'verityfuse.api', 'verityfuse.merkle')\n"
            "assert not [m for m in heavy if m in sys.modules], sys.modules.keys()\n"
            "verityfuse.digest(sys.argv[1])\n"
            "assert not [m for m in heavy[:3] if m in sys.modules]\n")
    r = subprocess.run([sys.executable, "-c", code, __file__], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_seal_and_verify_are_the_api_functions():
    code = ("import verityfuse\n"
            "from verityfuse.sealing import seal_path\n"
            "from verityfuse.verifier import Verifier\n"
            "assert verityfuse.seal.__module__ == 'verityfuse.api', verityfuse.seal\n"
            "assert verityfuse.verify.__module__ == 'verityfuse.api', verityfuse.verify\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_python_m_verityfuse_is_the_cli(tmp_path):
    f = write(tmp_path / "f", pattern(10000))
    r = subprocess.run([*VF, "digest", f], capture_output=True, text=True)
    assert r.returncode == 0
    assert r.stdout == f"{verityfuse.digest(f)} {f}\n"
    r = subprocess.run([*VF, "digest", "--block-size=3"], capture_output=True, text=True)
    assert r.returncode == 2


# -- digest ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("opts", [
    {}, {"hash_alg": "sha512", "block_size": 1024, "salt": b"\xab\xcd"},
    {"hash_alg": 2, "block_size": 65536}, {"block_size": 1024, "threads": 1},
])
def test_digest_is_fsverity_digest(tmp_path, size, opts):
    f = write(tmp_path / "f", pattern(size))
    d = verityfuse.digest(f, **opts)
    args = []
    if "hash_alg" in opts:
        args.append(f"--hash-alg={opts['hash_alg']}")
    if "block_size" in opts:
        args.append(f"--block-size={opts['block_size']}")
    if "salt" in opts:
        args.append(f"--salt={opts['salt'].hex()}")
    line, _tree, desc = fsverity_digest(f, *args)
    assert f"{d} {f}" == line
    assert d.descriptor == desc
    assert d.algorithm == ("sha512" if opts.get("hash_alg") in ("sha512", 2) else "sha256")


def test_digest_value():
    d = Digest.parse("SHA256:" + "AB" * 32)
    assert d.algorithm == "sha256" and d.digest == b"\xab" * 32 and d.descriptor is None
    assert str(d) == "sha256:" + "ab" * 32 and d.hex == "ab" * 32
    assert repr(d) == f"Digest('{d}')"
    assert Digest.parse(str(d)) == d and hash(Digest.parse(str(d))) == hash(d)
    assert Digest("sha512", bytes(64)) != Digest("sha256", bytes(32))
    for bad in ["ab" * 32, "md5:" + "00" * 16, "sha256:" + "00" * 31, "sha256:" + "zz" * 32,
                "sha512:" + "00" * 32, ""]:
        with pytest.raises(ValueError):
            Digest.parse(bad)
    with pytest.raises(ValueError):
        Digest("sha256", bytes(32), descriptor=bytes(256))  # does not hash to it
    with pytest.raises(ValueError):
        Digest("sha1", bytes(20))


def test_digest_with_descriptor_compares_by_value(tmp_path):
    f = write(tmp_path / "f", b"data")
    d = verityfuse.digest(f)
    assert d == Digest.parse(str(d)) and {d: 1}[Digest.parse(str(d))] == 1
    assert Digest(d.algorithm, d.digest, d.descriptor) == d


def test_digest_follows_symlinks_and_refuses_non_files(tmp_path):
    f = write(tmp_path / "f", pattern(5000))
    os.symlink("f", tmp_path / "l")
    assert verityfuse.digest(tmp_path / "l") == verityfuse.digest(f)
    assert verityfuse.digest(os.fsencode(f)) == verityfuse.digest(f)
    with pytest.raises(FileNotFoundError):
        verityfuse.digest(tmp_path / "nope")
    with pytest.raises(IsADirectoryError):
        verityfuse.digest(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError) as e:  # never blocks on the FIFO
        verityfuse.digest(tmp_path / "fifo")
    assert e.value.errno == errno.EINVAL and "FIFO" in str(e.value)


@pytest.mark.parametrize("kw,exc,msg", [
    ({"hash_alg": "md5"}, InvalidParameters, "unknown hash algorithm"),
    ({"hash_alg": 257}, InvalidParameters, "unknown hash algorithm"),
    ({"block_size": 3000}, InvalidParameters, "must be a power of 2"),
    ({"block_size": 16}, InvalidParameters, "too small for hash algorithm sha256"),
    ({"salt": bytes(33)}, SaltTooLong, "unsupported salt size (33)"),
    ({"salt": "abcd"}, TypeError, "salt must be bytes"),
    ({"block_size": 4096.0}, TypeError, "block_size must be an int"),
    ({"threads": 0}, ValueError, "threads must be an int from 1 to 256 or None, not 0"),
    # A thread and a buffer each: 1000 took 62 s and 4 GiB for a sparse 16 GiB file (s43).
    ({"threads": 257}, ValueError, "threads must be an int from 1 to 256 or None, not 257"),
])
def test_digest_bad_parameters(tmp_path, kw, exc, msg):
    f = write(tmp_path / "f", b"data")
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        verityfuse.digest(f, **kw)
    assert issubclass(InvalidParameters, ValueError)


# -- seal ------------------------------------------------------------------------------


def test_seal_everything(src):
    got = verityfuse.seal(src)
    # walk order (a directory's files, then its subdirectories'); no symlink, no store
    assert list(got) == ["big", "small", "sub/empty", "sub/deep/x"]
    for rel, d in got.items():
        assert d == verityfuse.digest(src / rel)
        assert d.descriptor is not None
    assert (src / ".verityfuse" / "VERSION").exists()
    assert verityfuse.seal(src) == got  # idempotent
    # the CLI sees the same
    r = subprocess.run([*VF, "verify", src, "-v"], capture_output=True, text=True)
    assert r.returncode == 0 and f"OK {got['big']} {src}/big" in r.stdout


def test_seal_parameters_match_fsverity(src):
    got = verityfuse.seal(src, ["big"], hash_alg="sha512", block_size=1024, salt=b"\x00\xff",
                          threads=2)
    line, _, _ = fsverity_digest(src / "big", "--hash-alg=sha512", "--block-size=1024",
                                 "--salt=00ff")
    assert line.split()[0] == str(got["big"])


def test_seal_paths_external_store_and_directories(src, tmp_path):
    store = tmp_path / "store"
    got = verityfuse.seal(src, ["small", src / "sub", "sub/deep/x"], store=store)
    assert list(got) == ["small", "sub/empty", "sub/deep/x"]
    assert not (src / ".verityfuse").exists()
    report = verityfuse.verify(src, store=store)
    assert report.ok and report.count("ok") == 3 and report.count("unsealed") == 1


def test_seal_refuses(src, tmp_path):
    with pytest.raises(ValueError, match="is not inside"):
        verityfuse.seal(src, [tmp_path / "elsewhere"])
    with pytest.raises(ValueError, match="is not inside"):
        verityfuse.seal(src, ["../x"])
    verityfuse.seal(src, ["small"])
    with pytest.raises(ValueError, match="inside the store"):
        verityfuse.seal(src, [".verityfuse/VERSION"])
    with pytest.raises(OSError):
        verityfuse.seal(src, ["link"])  # a symlink is never followed
    with pytest.raises(FileNotFoundError):
        verityfuse.seal(src, ["nope"])
    with pytest.raises(NotADirectoryError):
        verityfuse.seal(src / "small")
    # One path where a list goes: its characters were paths ("c.x" sealed all of it).
    for one in ("small", b"small", src / "small"):
        with pytest.raises(TypeError, match=r"paths is a list of paths, not one: seal\(source"):
            verityfuse.seal(src, one)


def test_seal_into_a_format_1_store_is_refused(src):
    (src / ".verityfuse").mkdir()
    (src / ".verityfuse" / "VERSION").write_bytes(b"verityfuse-store 1\n")
    with pytest.raises(VerityError, match="upgrade-store"):
        verityfuse.seal(src)


# -- verify ----------------------------------------------------------------------------


def test_verify_reports_each_file(src):
    verityfuse.seal(src, ["big", "small", "sub/empty"])
    report = verityfuse.verify(src)
    assert report.ok and len(report) == 4 and report.sealed == 3
    assert [(f.path, f.status) for f in report] == [
        ("big", "ok"), ("small", "ok"), ("sub/deep/x", "unsealed"), ("sub/empty", "ok")]
    assert report.files[0].digest == verityfuse.digest(src / "big")
    assert str(report) == "3 of 3 sealed files intact, 1 unsealed"
    strict = verityfuse.verify(src, strict=True)
    assert not strict.ok and [f.path for f in strict.failures] == ["sub/deep/x"]

    flip(src / "big", 50000)
    os.truncate(src / "small", 3)
    report = verityfuse.verify(src)
    assert not report.ok
    big, small = report.failures
    assert big.status == small.status == "corrupt"
    assert big.message.startswith("data block at offset 49152: expected ")
    assert isinstance(big.error, IntegrityError) and big.error.offset == 49152
    assert isinstance(small.error, SizeMismatch) and "truncated to 3 bytes" in small.message
    assert str(report) == "1 of 3 sealed files intact, 1 unsealed"


def test_verify_corrupt_store_and_unreadable_files(src):
    got = verityfuse.seal(src, ["big", "small"])
    obj = src / ".verityfuse" / "objects" / "sha256" / got["big"].hex[:2] / got["big"].hex
    os.remove(obj)
    os.chmod(src / "sub" / "deep" / "x", 0)
    report = verityfuse.verify(src)
    by = {f.path: f for f in report}
    assert by["big"].status == "corrupt" and "missing tree object" in by["big"].message
    assert isinstance(by["big"].error, StoreCorrupt)
    assert by["small"].status == "ok"
    if os.geteuid() != 0:  # root reads it anyway
        assert by["sub/deep/x"].status == "error"
    assert not report.ok


def test_verify_nothing_sealed_is_not_ok_and_stale_entries_are_counted(src, tmp_path):
    with pytest.raises(FileNotFoundError):
        verityfuse.verify(src)  # no store
    verityfuse.seal(src, ["small"], store=tmp_path / "store")
    report = verityfuse.verify(src, store=tmp_path / "store")
    assert report.ok and report.stale_entries == 0
    os.remove(src / "small")
    write(src / "small", b"new inode\n")
    report = verityfuse.verify(src, store=tmp_path / "store")
    assert not report.ok and report.sealed == 0 and report.stale_entries == 1
    assert report.failures == ()


# -- open_verified ---------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_open_verified_reads_like_a_file(tmp_path, size):
    data = pattern(size)
    write(tmp_path / "f", data)
    sealed = verityfuse.seal(tmp_path, block_size=1024)["f"]
    with verityfuse.open_verified(tmp_path / "f") as f:
        assert isinstance(f, VerifiedFile) and isinstance(f, io.RawIOBase)
        assert f.readable() and f.seekable() and not f.writable()
        assert f.digest == sealed and f.digest.descriptor == sealed.descriptor
        assert f.size == size and f.name == str(tmp_path / "f") and f.mode == "rb"
        assert f.read() == data and f.read() == b"" and f.tell() == size
        assert f.seek(0) == 0 and f.read(7) == data[:7] and f.tell() == min(7, size)
        assert f.seek(-3, os.SEEK_END) == size - 3 if size >= 3 else True
        f.seek(size // 2)
        assert f.read(-1) == data[size // 2:]
        f.seek(1000, os.SEEK_SET)
        f.seek(100, os.SEEK_CUR)
        buf = bytearray(5000)
        n = f.readinto(buf)
        assert bytes(buf[:n]) == data[1100:6100]
        assert f.read_at(5, 3000) == data[5:3005] and f.tell() == 1100 + n
        assert f.read_at(size + 10, 100) == b""
        f.seek(size + 100)
        assert f.read(10) == b""
        f.seek(0)
        assert b"".join(io.BufferedReader(f, 999)) == data
    assert f.closed
    with pytest.raises(ValueError):
        f.read()
    f.close()  # idempotent


def test_open_verified_buffered_text_and_symlinks(src):
    verityfuse.seal(src)
    with io.TextIOWrapper(io.BufferedReader(verityfuse.open_verified(src / "small"))) as t:
        assert t.read() == "hello\n"
    with verityfuse.open_verified(src / "link") as f:  # the target's inode is what was sealed
        assert f.read() == pattern(300000)


def test_lines_and_peek(tmp_path):
    data = b"".join(b"line %d\n" % i for i in range(3000)) + b"no newline at the end"
    write(tmp_path / "f", data)
    verityfuse.seal(tmp_path, block_size=1024)
    with verityfuse.open_verified(tmp_path / "f") as f:
        assert list(f) == data.splitlines(keepends=True)
    with verityfuse.open_verified(tmp_path / "f") as f:
        assert f.readline() == b"line 0\n" and f.readline(3) == b"lin" and f.tell() == 10
        assert f.peek().startswith(b"e 1\nline 2\n") and f.tell() == 10
        assert len(f.peek()) == 1024 - 10 and len(f.peek(5000)) == 5000
        assert f.readlines(12) == [b"e 1\n", b"line 2\n", b"line 3\n"]
        f.seek(0, os.SEEK_END)
        assert f.peek() == b"" and f.readline() == b""


def test_open_verified_no_fd_escapes(src):
    verityfuse.seal(src)
    gc.collect()  # an earlier test's garbage closes its fds now, not mid-count
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with verityfuse.open_verified(src / "big") as f:
            f.read(10)
            with pytest.raises(io.UnsupportedOperation):
                f.fileno()  # the backing fd would bypass verification
            with pytest.raises(io.UnsupportedOperation):
                f.write(b"x")
    for bad in (src / "small2", src / "sub"):
        with pytest.raises(OSError):
            verityfuse.open_verified(bad)
    assert len(os.listdir("/proc/self/fd")) == before


def test_corrupt_block_is_eio_and_the_rest_reads(tmp_path):
    data = pattern(300000)
    write(tmp_path / "f", data)
    verityfuse.seal(tmp_path)
    flip(tmp_path / "f", 50000)
    with verityfuse.open_verified(tmp_path / "f") as f:
        f.seek(40000)
        with pytest.raises(OSError) as e:
            f.read(20000)
        assert e.value.errno == errno.EIO
        cause = e.value.__cause__
        assert isinstance(cause, IntegrityError) and cause.offset == 49152
        assert f"{tmp_path}/f: data block at offset 49152: expected hash" in str(e.value)
        assert f.tell() == 40000  # nothing returned, position kept
        assert f.read(9152) == data[40000:49152]  # the blocks before it
        assert f.read_at(49152 + 4096, 4096) == data[53248:57344]  # and after it
        with pytest.raises(OSError):
            f.read_at(49151, 2)
        with pytest.raises(OSError):
            f.read()
        with pytest.raises(OSError):
            f.readinto(bytearray(1 << 20))


def test_corrupt_tree_block_is_eio(tmp_path):
    write(tmp_path / "f", pattern(1 << 20))
    d = verityfuse.seal(tmp_path)["f"]
    obj = tmp_path / ".verityfuse" / "objects" / "sha256" / d.hex[:2] / d.hex
    flip(obj, 64 + 256 + 2 * 4096 + 10)  # root block first, then leaf 0, then leaf 1 (128..255)
    with verityfuse.open_verified(tmp_path / "f") as f:
        assert len(f.read_at(0, 128 * 4096)) == 128 * 4096
        with pytest.raises(OSError) as e:
            f.read_at(128 * 4096, 1)
        assert "Merkle tree block (level 0, index 1)" in str(e.value.__cause__)


@pytest.mark.parametrize("change", ["truncate", "extend"])
def test_size_changes_fail_open_with_eio(tmp_path, change):
    write(tmp_path / "f", pattern(10000))
    verityfuse.seal(tmp_path)
    if change == "truncate":
        os.truncate(tmp_path / "f", 9000)
    else:
        with open(tmp_path / "f", "ab") as g:
            g.write(b"more")
    with pytest.raises(OSError) as e:
        verityfuse.open_verified(tmp_path / "f")
    assert e.value.errno == errno.EIO and isinstance(e.value.__cause__, SizeMismatch)


def test_growing_after_open_fails_the_read_at_the_end(tmp_path):
    write(tmp_path / "f", pattern(10000))
    verityfuse.seal(tmp_path)
    with verityfuse.open_verified(tmp_path / "f") as f:
        assert len(f.read(100)) == 100
        with open(tmp_path / "f", "ab") as g:
            g.write(b"more")
        with pytest.raises(OSError) as e:
            f.read()
        assert e.value.errno == errno.EIO and "extended" in str(e.value)


def test_unsealed_files_and_missing_stores(src, tmp_path):
    with pytest.raises(NotSealedError, match="no verityfuse store"):
        verityfuse.open_verified(src / "small")
    verityfuse.seal(src, ["big"])
    with pytest.raises(NotSealedError, match="is not sealed in the store") as e:
        verityfuse.open_verified(src / "small")
    assert e.value.errno == errno.ENODATA and isinstance(e.value, VerityError)
    with pytest.raises(FileNotFoundError):
        verityfuse.open_verified(src / "big", store=tmp_path / "nope")
    # a store found in a parent directory
    with verityfuse.open_verified(src / "big") as f:
        assert len(f.read()) == 300000
    verityfuse.seal(src, ["sub/deep/x"])
    with verityfuse.open_verified(src / "sub" / "deep" / "x") as f:
        assert f.read() == b"x" * 5000
    # a new inode under a sealed name is not sealed
    os.remove(src / "big")
    write(src / "big", pattern(300000))
    with pytest.raises(NotSealedError):
        verityfuse.open_verified(src / "big")


def test_corrupt_index_entry_and_missing_object_are_eio(src):
    got = verityfuse.seal(src, ["big", "small"])
    os.remove(src / ".verityfuse" / "objects" / "sha256" / got["big"].hex[:2] / got["big"].hex)
    with pytest.raises(OSError) as e:
        verityfuse.open_verified(src / "big")
    assert e.value.errno == errno.EIO and isinstance(e.value.__cause__, StoreCorrupt)
    idx = src / ".verityfuse" / "inodes"
    for shard in idx.iterdir():
        for entry in shard.iterdir():
            entry.write_text("{not json")
    with pytest.raises(OSError) as e:
        verityfuse.open_verified(src / "small")
    assert e.value.errno == errno.EIO and "malformed index entry" in str(e.value)


def test_pinned_digest_uses_only_the_content_addressed_object(src, tmp_path):
    store = tmp_path / "store"
    got = verityfuse.seal(src, ["big", "small"], store=store)
    d = got["big"]
    # the index is not consulted: a copy (another inode) reads against the pinned digest
    write(tmp_path / "copy", pattern(300000))
    for pin in (d, str(d)):
        with verityfuse.open_verified(tmp_path / "copy", store=store, digest=pin) as f:
            assert f.read() == pattern(300000) and f.digest == d
    # a file whose bytes are not the pinned digest's
    write(tmp_path / "other", pattern(300001)[1:])
    with verityfuse.open_verified(tmp_path / "other", store=store, digest=d) as f:
        with pytest.raises(OSError) as e:
            f.read()
        assert e.value.errno == errno.EIO
    with pytest.raises(OSError) as e:  # another size: refused at open
        verityfuse.open_verified(src / "small", store=store, digest=d)
    assert isinstance(e.value.__cause__, SizeMismatch)
    # a digest the store has no tree for
    with pytest.raises(OSError) as e:
        verityfuse.open_verified(src / "big", store=store, digest="sha256:" + "00" * 32)
    assert e.value.errno == errno.EIO and "missing tree object" in str(e.value)
    with pytest.raises(ValueError):
        verityfuse.open_verified(src / "big", store=store, digest="sha256:xyz")
    with pytest.raises(TypeError):
        verityfuse.open_verified(src / "big", store=store, digest=b"\0" * 32)  # type: ignore


def test_cli_sealed_files_open_verified(src):
    r = subprocess.run([*VF, "seal", src, "--hash-alg=sha512", "--block-size=1024"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with verityfuse.open_verified(src / "sub" / "deep" / "x") as f:
        assert f.read() == b"x" * 5000
        assert f"{f.digest} {src}/sub/deep/x" in r.stdout


@pytest.mark.skipif(FSVERITY is None, reason="fsverity-utils is not installed")
def test_open_verified_digest_is_fsverity_measure_of_the_file(tmp_path):
    write(tmp_path / "f", pattern(12345))
    verityfuse.seal(tmp_path)
    line, _, desc = fsverity_digest(tmp_path / "f")
    with verityfuse.open_verified(tmp_path / "f") as f:
        assert str(f.digest) == line.split()[0] and f.digest.descriptor == desc


def test_threads_share_one_file(tmp_path):
    import concurrent.futures

    data = pattern(1 << 20)
    write(tmp_path / "f", data)
    verityfuse.seal(tmp_path)
    with verityfuse.open_verified(tmp_path / "f") as f:
        offsets = list(range(0, 1 << 20, 7777))
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda o: f.read_at(o, 10000), offsets))
    assert got == [data[o:o + 10000] for o in offsets]


HAVE_URLLIB3 = importlib.util.find_spec("urllib3") is not None


def test_every_module_imports_first():
    """No import cycle breaks a module imported on its own (verified_file and api
    import each other)."""
    import pkgutil
    import verityfuse

    for m in pkgutil.iter_modules(verityfuse.__path__):
        if m.name == "_fuseshim":  # a library for ctypes (loaded by fuseshim.py), not a module
            continue
        safe_path = ["-P"] if sys.flags.safe_path else []  # the same package as this process's
        r = subprocess.run([sys.executable, *safe_path, "-c", f"import verityfuse.{m.name}"],
                           capture_output=True, text=True)
        if not HAVE_URLLIB3 and "pip install 'verityfuse[oci]'" in r.stderr:
            continue  # an install without the [oci] extra (the sdist test's): said clearly
        assert r.returncode == 0, (m.name, r.stderr[-300:])


# -- where open_verified takes trust from (issue 16 item 2) ------------------------------

ATTACKER = 65534  # nobody


@pytest.fixture
def app(tmp_path):
    """A trusted tree: root-owned, sealed into app/.verityfuse; app/data belongs to
    another user, who can replace its files and create anything in it."""
    a = tmp_path / "app"
    (a / "data").mkdir(parents=True)
    write(a / "data" / "f", b"trusted bytes\n" * 1000)
    verityfuse.seal(a)
    with verityfuse.open_verified(a / "data" / "f") as f:  # the trusted store, found above
        assert f.read() == b"trusted bytes\n" * 1000
    os.chown(a / "data", ATTACKER, ATTACKER)
    return a


def _attacker_reseals(a):
    """What the owner of app/data can do: tamper with f, seal it into a store of their own."""
    write(a / "data" / "f", b"evil")
    verityfuse.seal(a / "data")
    for dirpath, dirnames, filenames in os.walk(a / "data" / ".verityfuse"):
        for n in [dirpath] + [os.path.join(dirpath, x) for x in filenames]:
            os.chown(n, ATTACKER, ATTACKER)  # as if they had run `verityfuse seal` themselves


def test_open_verified_never_trusts_a_store_another_user_made(app):
    _attacker_reseals(app)
    with pytest.raises(NotSealedError) as e:
        verityfuse.open_verified(app / "data" / "f").read()
    store = os.path.realpath(app / "data" / ".verityfuse")
    assert str(e.value) == (f"{app}/data/f: the store {store} is not trusted: it is owned by uid "
                            f"{ATTACKER} (only root may own it); pass store= or digest=")
    assert e.value.errno == errno.ENODATA
    # Named explicitly it is the caller's choice; the trusted store says the file changed.
    with verityfuse.open_verified(app / "data" / "f", store=app / "data" / ".verityfuse") as f:
        assert f.read() == b"evil"
    with pytest.raises(OSError, match="file is 4 bytes, sealed size 14000") as e:
        verityfuse.open_verified(app / "data" / "f", store=app / ".verityfuse")
    assert e.value.errno == errno.EIO


def test_open_verified_refuses_a_store_reached_through_a_directory_others_may_change(app):
    # The attacker's directory lies between the trusted store and the file: they could
    # swap the file for another sealed inode or add a nearer store at any moment.
    with pytest.raises(NotSealedError) as e:
        verityfuse.open_verified(app / "data" / "f")
    assert str(e.value) == (f"{app}/data/f: the store {os.path.realpath(app / '.verityfuse')} is "
                            f"not trusted: the directory {os.path.realpath(app / 'data')} on the "
                            f"way to the file is owned by uid {ATTACKER} (only root may own it); "
                            f"pass store= or digest=")
    os.chown(app / "data", 0, 0)
    os.chmod(app / "data", 0o777)
    with pytest.raises(NotSealedError, match=r"the directory .*/data on the way to the file is "
                                             r"writable by group or others \(mode 0777\)"):
        verityfuse.open_verified(app / "data" / "f")
    os.chmod(app / "data", 0o755)
    os.chmod(app / ".verityfuse", 0o770)
    with pytest.raises(NotSealedError, match=r"is writable by group or others \(mode 0770\)"):
        verityfuse.open_verified(app / "data" / "f")
    os.chmod(app / ".verityfuse", 0o700)
    with verityfuse.open_verified(app / "data" / "f") as f:
        assert f.read() == b"trusted bytes\n" * 1000


def test_a_pinned_digest_needs_no_trusted_store(app):
    # Objects are content-addressed: with digest= the store found is only a source of
    # trees, whoever owns the way to it.
    pinned = verityfuse.digest(app / "data" / "f")
    with verityfuse.open_verified(app / "data" / "f", digest=pinned) as f:
        assert f.read() == b"trusted bytes\n" * 1000
    _attacker_reseals(app)
    with pytest.raises(OSError) as e:  # their store has no tree for the pinned digest
        verityfuse.open_verified(app / "data" / "f", digest=pinned)
    assert e.value.errno == errno.EIO and f"its bytes do not give {pinned}" in str(e.value)


@pytest.mark.parametrize("size", [1, 4096, 4097, 14000, 16384])
def test_a_pinned_small_file_needs_no_object(tmp_path, size):
    """A file of up to 16 KiB (a tree of one block at most) reads against a pinned digest
    from a store without its object: its tree is made from its bytes, as a manifest mount
    does, and serves only if it gives that digest; a larger one needs its object."""
    empty = tmp_path / "store"
    os.mkdir(tmp_path / "s")
    write(tmp_path / "s" / "x", b"x")
    verityfuse.seal(tmp_path / "s", store=empty)  # a store, but with none of these files
    small, big = tmp_path / "small", tmp_path / "big"
    write(small, pattern(size))
    write(big, pattern(16385))
    with verityfuse.open_verified(small, digest=verityfuse.digest(small), store=empty) as f:
        assert f.read() == pattern(size)
    with pytest.raises(OSError) as e:
        verityfuse.open_verified(big, digest=verityfuse.digest(big), store=empty)
    assert e.value.errno == errno.EIO and "missing tree object" in str(e.value)
    # A small file whose bytes do not give the digest: named so, not as a damaged store.
    other = verityfuse.digest(write(tmp_path / "other", b"y" * size))
    with pytest.raises(OSError) as e:
        verityfuse.open_verified(small, digest=other, store=empty)
    assert e.value.errno == errno.EIO and isinstance(e.value.__cause__, ContentMismatch)
    assert str(e.value.__cause__) == (f"{small}: its bytes do not give {other} (with the "
                                      f"sealing parameters tried), and the store has no tree "
                                      f"object for that digest")


@pytest.mark.parametrize("local", [False, True], ids=["manifest", "manifest-local"])
def test_a_pinned_manifest_file_sealed_with_other_parameters(tmp_path, local):
    """A file of one block sealed into a manifest with a salt and another block size has
    no object and (without --local) no index entry: a pinned Digest that carries its
    descriptor (digest()'s, seal()'s) names the parameters to try, and its bytes read
    against it.  A bare digest string names none: with no index entry the defaults alone
    are tried, which give another digest (EIO); --local's entry names them."""
    src = tmp_path / "src"
    os.mkdir(src)
    write(src / "one", pattern(1000))
    m = tmp_path / "m.json"
    local_args = ["--local"] if local else []
    r = subprocess.run(VF + ["seal", str(src), "--manifest", str(m), "--unsigned",
                             "--block-size", "1024", "--salt", "0a0b", *local_args],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pinned = verityfuse.digest(src / "one", block_size=1024, salt=bytes.fromhex("0a0b"))
    assert pinned.descriptor is not None
    with verityfuse.open_verified(src / "one", digest=pinned) as f:
        assert f.read() == pattern(1000)
    if local:
        with verityfuse.open_verified(src / "one", digest=str(pinned)) as f:
            assert f.read() == pattern(1000)
        return
    with pytest.raises(OSError) as e:
        verityfuse.open_verified(src / "one", digest=str(pinned))
    assert e.value.errno == errno.EIO and isinstance(e.value.__cause__, ContentMismatch)
    write(src / "one", pattern(999) + b"!")  # the hint is only tried: changed bytes fail
    with pytest.raises(OSError) as e:
        verityfuse.open_verified(src / "one", digest=pinned)
    assert e.value.errno == errno.EIO and isinstance(e.value.__cause__, ContentMismatch)


def test_docs_api_signatures_match_the_code():
    """docs/api.md's signature lines name exactly the parameters (and defaults) the functions
    take: the reference cannot drift from the code (issue 17 item 11)."""
    import ast
    import inspect
    import re

    import verityfuse

    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "api.md")).read()
    # A signature starts a line inside a code block and ends with "-> Type".
    sigs = re.findall(r"^verityfuse\.(\w+)(\((?:[^()]|\([^()]*\))*\)) -> ", text, re.M)
    assert {name for name, _ in sigs} == {"digest", "seal", "verify", "open_verified"}
    for name, params in sigs:
        doc = ast.parse(f"def f{params}: pass").body[0].args
        documented = [a.arg for a in doc.posonlyargs + doc.args + doc.kwonlyargs]
        defaults = [ast.literal_eval(v) for v in doc.defaults] + \
            [ast.literal_eval(v) for v in doc.kw_defaults if v is not None]
        real = inspect.signature(getattr(verityfuse, name)).parameters.values()
        assert documented == [p.name for p in real], name
        assert defaults == [p.default for p in real if p.default is not inspect.Parameter.empty], name


def test_a_file_changed_while_sealed_is_named_in_the_error(tmp_path):
    """Its size moved while it was read: the error said 'file shrank while hashing' and
    neither which file nor an errno (found by review, s43)."""
    from verityfuse import treebuild

    src = tmp_path / "src"
    src.mkdir()
    (src / "ok").write_bytes(b"o" * 10)
    (src / "big").write_bytes(b"b" * (600 << 10))  # one read (a larger file is mapped)
    real = treebuild.read_full

    def cut(fd, buf, offset):  # the file is cut short by someone else while it is read
        os.truncate(src / "big", 100 << 10)
        return real(fd, buf, offset)

    treebuild.read_full = cut
    try:
        with pytest.raises(OSError) as e:
            verityfuse.seal(src, ["big"], threads=1)
    finally:
        treebuild.read_full = real
    assert (e.value.errno, e.value.filename) == (errno.ETXTBSY, str(src / "big"))
    assert e.value.strerror == "file shrank while hashing: expected 614400 bytes, got 102400"


def test_open_verified_with_a_malformed_store_raises_its_verity_error(src):
    """As documented: a malformed store (its VERSION) is a VerityError; it was an
    OSError(EIO), which `except VerityError` did not catch (found by review, s43)."""
    from verityfuse.errors import VerityError

    verityfuse.seal(src, ["small"])
    (src / ".verityfuse" / "VERSION").write_text("verityfuse-store 9\n")
    with pytest.raises(VerityError, match="VERSION|version|format"):
        verityfuse.open_verified(src / "small")


def test_open_verified_refuses_a_store_planted_as_a_symlink(src, tmp_path):
    """A directory's .verityfuse that is a symlink: refused by name, as seal, verify and
    mount refuse it; open_verified walked past it and said there was no store, or used
    one further up (found by review, s43)."""
    verityfuse.seal(src, ["small"], store=tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", src / ".verityfuse")
    with pytest.raises(verityfuse.NotSealedError,
                       match=rf"the store {src}/.verityfuse is a symlink \(refused as a "
                             rf"directory's own store\); pass store="):
        verityfuse.open_verified(src / "small")
    with verityfuse.open_verified(src / "small", store=tmp_path / "elsewhere") as f:
        assert f.read(1)
