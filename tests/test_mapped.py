"""Trees built from the page cache (hash_mapped): the same bytes as from a copy; whatever
goes wrong with a mapping (a file cut short under it, pages that cannot be read, a sparse
tmpfs file) leaves the range to reads, which say what is wrong as before, never a SIGBUS
that ends the process, a hang or memory for holes; and the SIGBUS guard leaves everyone
else's SIGBUS where it went."""

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from verityfuse import hashers, merkle, treebuild
from conftest import fuse_helper, pattern
from test_native import needs_native, ref_hashes

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20


def run_python(code, *args, faulthandler=True):
    """code in a fresh interpreter (a SIGBUS there ends that process, not pytest's)."""
    flags = ["-X", "faulthandler"] if faulthandler else []
    return subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, cwd=HERE, timeout=60)


@needs_native
@pytest.mark.parametrize("alg,bs,salt,offset,length", [
    (merkle.SHA256, 4096, b"", 0, 3 * MiB),                # whole blocks, the SHA-NI engine
    (merkle.SHA256, 4096, b"ab", MiB, 2 * MiB + 123),     # a partial last block, a salt
    (merkle.SHA256, 1024, bytes(range(32)), 4096, 5000),  # small blocks, an offset
    (merkle.SHA512, 65536, b"\x01", 0, 300001),           # OpenSSL, 64 KiB blocks
])
def test_a_mapped_range_hashes_as_its_bytes_read(tmp_path, alg, bs, salt, offset, length):
    p = merkle.Params(alg, bs, salt)
    path = tmp_path / "f"
    path.write_bytes(pattern(offset + length + 7))  # bytes after the range are not hashed
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, length, offset)
        padded = data + bytes(-len(data) % bs)  # the last block zero-padded
        assert hashers.mapped_hasher(p)(fd, offset, length) == ref_hashes(p, padded)
    finally:
        os.close(fd)


@needs_native
def test_what_cannot_be_mapped_is_left_to_reads(tmp_path):
    """A pipe (or a file system without mmap) gives None; build_tree then reads, and the
    digest is the same as the mapped build's."""
    r, w = os.pipe()
    try:
        assert hashers.mapped_hasher(merkle.Params())(r, 0, 4096) is None
    finally:
        os.close(r)
        os.close(w)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_a_build_that_cannot_map_reads_and_gives_the_same_tree(tmp_path, monkeypatch, threads):
    path = tmp_path / "f"
    path.write_bytes(pattern(2 * treebuild.MAPPED_CHUNK + 5))  # three chunks
    params = merkle.Params(merkle.SHA256, 4096, b"s")
    fd = os.open(path, os.O_RDONLY)
    try:
        blocks = []
        mapped = treebuild.build_tree(fd, params, threads=threads,
                                      write_block=lambda o, b: blocks.append((o, b)))
        calls = []

        def refuses(params):
            def hm(fd, offset, length):
                calls.append(offset)
                return None
            return hm

        monkeypatch.setattr(hashers, "mapped_hasher", refuses)
        read_blocks = []
        read = treebuild.build_tree(fd, params, threads=threads,
                                    write_block=lambda o, b: read_blocks.append((o, b)))
    finally:
        os.close(fd)
    assert read == mapped and read_blocks == blocks
    assert len(calls) == threads  # each thread asked once, then read on


SHRINK = """
    import os, sys
    from verityfuse import hashers, merkle, treebuild
    path, threads = sys.argv[1], int(sys.argv[2])
    size = 9 << 20  # three mapped chunks: two threads hash them in workers
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    fd = os.open(path, os.O_RDWR)
    os.ftruncate(fd, (1 << 20) + 100)  # after the size was taken: the range outlives the file
    print(hashers.mapped_hasher(merkle.Params())(fd, 1 << 20, 2 << 20))  # None: read it
    try:
        treebuild.build_tree(fd, merkle.Params(), data_size=size, threads=threads)
    except OSError as e:
        print(e.strerror)
"""


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_a_file_cut_short_before_the_mapping_is_read_and_reported(tmp_path, threads):
    """The range is left to reads, which say how short the file is, exactly as before
    mappings (with Python's faulthandler enabled, as under pytest)."""
    r = run_python(SHRINK, str(tmp_path / "f"), str(threads))
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == ("None\n"
                        "file shrank while hashing: expected 9437184 bytes, got 1048676\n")


@needs_native
def test_digest_of_a_file_truncated_while_it_runs_fails_cleanly(tmp_path):
    """The attack itself: another process cuts the file while `verityfuse digest` maps
    it.  Each run prints the digest of the whole file (it finished first) or says the
    file shrank; none dies of a signal."""
    path = tmp_path / "f"
    outcomes = set()
    for delay in (0, 0.02, 0.05, 0.1, 0.2):
        path.write_bytes(bytes(256 * MiB))
        p = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "verityfuse",
                              "digest", "--threads", "2", str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
        time.sleep(delay)
        os.truncate(path, 4096)
        out, err = p.communicate(timeout=60)
        assert p.returncode in (0, 1), (p.returncode, err)
        if p.returncode == 0:
            assert out.startswith("sha256:") and err == ""
            outcomes.add("finished")
        else:
            assert "file shrank while hashing: expected 268435456 bytes, got" in err, err
            outcomes.add("shrank")
    assert "shrank" in outcomes  # the attack did land at least once


@needs_native
def test_a_file_whose_reads_fail_is_an_error_not_a_hang(tmp_path):
    """A FUSE file (page-cached, so it can be mapped) whose every read fails with EIO: the
    mapping's pages cannot be read (MAP_POPULATE would retry them forever, unkillable by
    Ctrl-C); the build reports the read's error, as without mappings."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    size = 3 * treebuild.MAPPED_CHUNK
    code = """
        import os, sys
        from verityfuse import hashers, merkle, treebuild
        fd = os.open(sys.argv[1], os.O_RDONLY)
        print(hashers.mapped_hasher(merkle.Params())(fd, 0, 1 << 20))
        for threads in (1, 2):
            try:
                treebuild.build_tree(fd, merkle.Params(), threads=threads)
            except OSError as e:
                print(e.errno, e.strerror)
    """
    with fuse_helper("short_read_fs.py", mnt, f"bad={size}:{size}:cachedread:{errno.EIO}"):
        r = run_python(code, str(mnt / "bad"))  # a hang would fail it, killed, not the suite
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == f"None\n{errno.EIO} Input/output error\n{errno.EIO} Input/output error\n"


@contextlib.contextmanager
def small_tmpfs(where):
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@needs_native
def test_a_sparse_tmpfs_file_is_read_not_mapped(tmp_path):
    """A read fault on a hole of a tmpfs file allocates a page; a read of it allocates
    nothing.  A 64 MiB sparse file in a tmpfs of 16 MiB hashes (as zeros) and stays
    sparse; mapped, it filled the tmpfs and failed half-way."""
    with small_tmpfs(tmp_path / "shm") as shm:
        path = shm / "sparse"
        with open(path, "wb") as f:
            f.truncate(64 * MiB)
            f.seek(5 * MiB)
            f.write(b"data")  # one page of data among the holes
        fd = os.open(path, os.O_RDONLY)
        try:
            got = treebuild.build_tree(fd, merkle.Params(), threads=2)
            used = os.fstat(fd).st_blocks * 512
        finally:
            os.close(fd)
    want = bytearray(64 * MiB)
    want[5 * MiB:5 * MiB + 4] = b"data"
    fd = os.memfd_create("verityfuse-test")
    try:
        os.write(fd, want)
        assert got == treebuild.build_tree(fd, merkle.Params())
    finally:
        os.close(fd)
    assert used == 4096  # the one page written, nothing for the holes


GUARD_THEN = """
    import faulthandler, mmap, os, signal, sys, threading, time
    from verityfuse import hashers, merkle
    path, case = sys.argv[1], sys.argv[2]
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    os.write(fd, os.urandom(8 << 20))  # not sparse: a sparse file is never mapped
    hm = hashers.mapped_hasher(merkle.Params())
    assert isinstance(hm(fd, 0, 8 << 20), bytes)
    if case == "faulthandler-on-off":  # faulthandler enabled and disabled again after a build
        faulthandler.enable()
        assert isinstance(hm(fd, 0, 8 << 20), bytes)
        faulthandler.disable()
    if case == "faulthandler-in-builds":  # enabled in one build, disabled in a later one
        stop, done = threading.Event(), [0]
        def builds():
            while not stop.is_set():
                hm(fd, 0, 8 << 20)
                done[0] += 1
        t = threading.Thread(target=builds)
        t.start()
        time.sleep(0.02)
        faulthandler.enable()
        k = done[0]
        while done[0] < k + 2:
            time.sleep(0.001)
        time.sleep(0.002)
        faulthandler.disable()
        stop.set()
        t.join()
    if case in ("kill", "ignored"):  # a SIGBUS sent while builds run on another thread
        if case == "ignored":
            signal.signal(signal.SIGBUS, signal.SIG_IGN)
        stop = threading.Event()
        def builds():
            while not stop.is_set():
                hm(fd, 0, 8 << 20)
        t = threading.Thread(target=builds)
        t.start()
        for _ in range(50):
            os.kill(os.getpid(), signal.SIGBUS)
        stop.set()
        t.join()
        print("survived", flush=True)
        sys.exit(0)
    m = mmap.mmap(fd, 8 << 20, prot=mmap.PROT_READ)
    os.ftruncate(fd, 0)
    print("touching", flush=True)
    m[(8 << 20) - 1]
    print("survived")
"""


@needs_native
@pytest.mark.parametrize("case,faulthandler,dies", [
    ("fault", False, True),                 # the default: a fault past the end kills
    ("fault", True, True),                  # faulthandler reports it, then it kills
    ("faulthandler-on-off", False, True),   # no stale handler left to loop in
    ("faulthandler-in-builds", False, True),  # nor when it comes and goes during builds
    ("kill", False, True),                  # a SIGBUS sent by kill is not taken for a fault
    ("ignored", False, False),              # and one ignored stays ignored
])
def test_a_sigbus_not_of_a_build_goes_where_it_went(tmp_path, case, faulthandler, dies):
    """The guard is installed only while a mapping is hashed and catches only faults of
    that mapping: anyone else's SIGBUS ends as it would have without it, never swallowed
    or looping."""
    r = run_python(GUARD_THEN, str(tmp_path / "f"), case, faulthandler=faulthandler)
    if dies:
        assert r.returncode == -signal.SIGBUS, (r.returncode, r.stdout, r.stderr[-2000:])
        assert "survived" not in r.stdout
        assert ("Fatal Python error: Bus error" in r.stderr) == faulthandler
    else:
        assert (r.returncode, r.stdout) == (0, "survived\n"), r.stderr[-2000:]


KILL_THEN_CUT = """
    import os, signal, sys, threading, time
    from verityfuse import hashers, merkle
    path = sys.argv[1]
    signal.signal(signal.SIGBUS, lambda *a: print("handler ran", flush=True))
    with open(path, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(4 << 20))
    fd = os.open(path, os.O_RDONLY)
    res = []
    t = threading.Thread(target=lambda: res.append(
        hashers.mapped_hasher(merkle.Params())(fd, 0, 256 << 20)))
    t.start()
    time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGBUS)  # the program's own SIGBUS, during the hash
    time.sleep(0.05)
    os.truncate(path, 4096)  # then the file is cut short, still during it (most runs)
    t.join()
    print(res[0] is None or type(res[0]).__name__)
"""


@needs_native
def test_a_sent_sigbus_reaches_its_handler_and_leaves_the_guard_in_place(tmp_path):
    """A SIGBUS sent to a program with a handler of its own runs that handler once, and
    the guard stays: a cut that follows in the same hash is still caught (None), never
    a death or a loop in the program's handler."""
    r = run_python(KILL_THEN_CUT, str(tmp_path / "f"), faulthandler=False)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout in ("handler ran\nTrue\n", "handler ran\nbytes\n")  # bytes: hashed first


@needs_native
def test_a_sparse_file_is_never_mapped(tmp_path):
    """On any file system: its holes would take memory in tmpfs (also under overlayfs)
    and hugetlbfs, and a read of them takes none."""
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
        f.write(b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.fstat(fd).st_blocks * 512 >= 16 * MiB:
            pytest.skip("this file system allocates holes")
        assert hashers.mapped_hasher(merkle.Params())(fd, 0, 16 * MiB) is None
    finally:
        os.close(fd)
