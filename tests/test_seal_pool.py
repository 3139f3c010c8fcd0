"""seal_pool: files staged by worker processes, results taken in order by the caller.

The pool itself with small work functions (a fork inherits them), then `seal` with
its workers interrupted, killed, and handed a large file."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from verityfuse import seal_pool
from verityfuse.errors import IntegrityError, VerityError
from verityfuse.seal_pool import Here, in_order
from conftest import children_of, fsverity_digest, pattern, write


def test_results_come_in_input_order_with_failures_and_items_handed_back():
    me = os.getpid()

    def work(item, here):
        if item % 17 == 0:
            raise OSError(errno.ENOENT, f"gone {item}")
        if item % 50 == 0 and not here:
            raise Here()
        return item, here, os.getpid()

    after = []
    got = list(in_order(range(300), work, 2, lambda r: pytest.fail("nothing is abandoned"),
                        after.append))
    assert [item for item, _, _ in got] == list(range(300))
    workers = set()
    for item, result, err in got:
        if item % 17 == 0:
            assert result is None and err.errno == errno.ENOENT and err.strerror == f"gone {item}"
        elif item % 50 == 0:  # a worker handed it back: done here, with here=True
            assert result == (item, True, me) and err is None
        else:
            assert result[:2] == (item, False) and result[2] != me and err is None
            workers.add(result[2])
    assert 1 <= len(workers) <= 2  # which worker takes which task is the scheduler's
    assert after == [r for i, r, _ in got if r is not None and i % 50]  # the workers' results
    assert children_of(me) == []  # the pool is gone


def test_a_worker_does_a_part_of_its_chunk_at_once_and_leaves_the_rest_to_work():
    """work_many(part) in a worker first: its results as they are, work(item, False) for
    each None (which may fail or hand the item back), and for every item of a part whose
    work_many raised an OSError (work then says what is wrong of each)."""
    me = os.getpid()
    # Chunks of 32, 64, 128, ... items, cut into parts of 64: items 96-159 are one part.
    assert (seal_pool.FIRST_CHUNK, seal_pool.MANY) == (32, 64)

    def work_many(items):
        if items[0] == 96:
            raise OSError(errno.EMFILE, "Too many open files")
        return [None if i % 3 == 0 else ("many", i) for i in items]

    def work(item, here):
        if item % 17 == 0:
            raise OSError(errno.ENOENT, f"gone {item}")
        if item % 50 == 0 and not here:
            raise Here()
        return "one", item, here, os.getpid() != me

    def expected(item):
        if not (96 <= item < 160 or item % 3 == 0):
            return ("many", item), None
        if item % 17 == 0:
            return None, f"gone {item}"
        if item % 50 == 0:  # handed back: done here
            return ("one", item, True, False), None
        return ("one", item, False, True), None

    got = list(in_order(range(300), work, 2, lambda r: pytest.fail("nothing is abandoned"),
                        work_many=work_many))
    assert [(item, result, err and err.strerror) for item, result, err in got] == \
        [(item, *expected(item)) for item in range(300)]


def test_the_young_generation_is_collected_less_often_while_a_pool_runs():
    """In the caller and in the workers (forked with it) while the pool runs; as it was
    after, also when the caller stops early."""
    import gc

    before = gc.get_threshold()
    assert before[0] != seal_pool.YOUNG
    got = list(in_order(range(100), lambda item, here: (gc.get_threshold(), here), 2,
                        lambda r: None))
    assert {r for _, r, _ in got} == {((seal_pool.YOUNG, *before[1:]), False)}
    assert gc.get_threshold() == before
    gen = in_order(range(100), lambda item, here: item, 2, lambda r: None)
    next(gen)
    assert gc.get_threshold()[0] == seal_pool.YOUNG
    gen.close()
    assert gc.get_threshold() == before


@pytest.mark.parametrize("count,threads", [(seal_pool.FIRST_CHUNK - 1, 2), (100, 1)])
def test_few_items_or_one_thread_are_done_here_without_workers(count, threads):
    got = list(in_order(range(count), lambda item, here: (item, here, os.getpid()), threads,
                        lambda r: None))
    assert got == [(i, (i, True, os.getpid()), None) for i in range(count)]


def test_the_input_is_read_a_bounded_window_ahead_of_the_caller():
    """Memory does not grow with the number of items: at most AHEAD_PER_WORKER tasks per
    worker, and the one being handed out, are taken from the input beyond the caller."""
    taken = [0]
    bound = (seal_pool.AHEAD_PER_WORKER * 2 + 1) * seal_pool.CHUNK
    count = 3 * bound  # more than the window: reading them all at once would show

    def source():
        for i in range(count):
            taken[0] += 1
            yield i

    most = 0
    for consumed, (item, result, err) in enumerate(
            in_order(source(), lambda item, here: item, 2, lambda r: None), 1):
        assert result == item
        most = max(most, taken[0] - consumed)
    assert consumed == count and 0 < most <= bound, (most, bound)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_worker_is_given_what_is_shipped_and_the_caller_gets_its_items_back(threads):
    """in_order(shipped=): ``work`` gets shipped(item), in a worker and here (an item
    handed back, or no workers); the caller gets its own items, in order."""
    items = [(i, "x" * 1000) for i in range(200)]  # the payload never needs to cross

    def work(shipped, here):
        assert isinstance(shipped, int)
        if shipped % 40 == 0 and not here:
            raise Here()
        return shipped * 2, here

    got = list(in_order(items, work, threads, lambda r: None, shipped=lambda item: item[0]))
    assert [item for item, _, _ in got] == items
    assert [r[0] for _, r, _ in got] == [2 * i for i in range(200)]
    if threads == 2:
        assert [i for (i, _), r, _ in got if r[1]] == list(range(0, 200, 40))


def test_a_caller_that_stops_early_gets_every_unused_result_abandoned():
    made = []
    gen = in_order(range(3000), lambda item, here: item, 2, made.append)
    used = [next(gen)[1] for _ in range(100)]
    gen.close()
    assert used == list(range(100))
    assert made and min(made) >= 100 and len(set(made)) == len(made)
    assert children_of(os.getpid()) == []


class TwoArgs(VerityError):
    """An error whose constructor does not take its message: it cannot be unpickled."""

    def __init__(self, what, where):
        super().__init__(f"{what} at {where}")


def test_an_error_that_cannot_cross_the_pipe_arrives_as_its_kind_with_its_message():
    """It would break the pool; it arrives as a VerityError saying what it was (the CLI
    reports VerityErrors)."""
    def work(item, here):
        if item == 77:
            raise TwoArgs("odd", 77)
        return item

    abandoned = []
    with pytest.raises(VerityError) as e:
        for _ in in_order(range(1000), work, 2, abandoned.append):
            pass
    assert type(e.value) is VerityError
    assert str(e.value) == "TwoArgs: odd at 77"
    assert all(a > 77 for a in abandoned)
    assert children_of(os.getpid()) == []


def test_an_integrity_error_crosses_the_pipe_whole():
    """verify's workers send IntegrityErrors inside their results."""
    import pickle

    e = IntegrityError("d/f", 8192, b"\1" * 32, b"\2" * 32, what="tree block")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is IntegrityError and str(back) == str(e)
    assert (back.path, back.offset, back.expected, back.actual, back.what, back.data_offset) == (
        "d/f", 8192, b"\1" * 32, b"\2" * 32, "tree block", None)


def test_buffers_made_before_a_fork_are_not_shared_with_it():
    """Python maps anonymous memory shared: a read buffer made before the workers fork
    was one buffer for all of them, and two workers reading into it at once hashed each
    other's bytes (wrong digests, seen under load)."""
    from verityfuse import reader, treebuild

    small = treebuild._read_buffer(8192)  # the thread's own, kept for the next file
    pooled = reader.POOL.take(4096)
    small[0] = pooled[0] = 1
    pid = os.fork()
    if pid == 0:
        try:
            treebuild._read_buffer(8192)[0] = 2
            pooled[0] = 2
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert (small[0], pooled[0]) == (1, 1)
    reader.POOL.give(pooled)


def test_a_worker_killed_is_a_clear_error():
    def work(item, here):
        if item == 500:
            os.kill(os.getpid(), signal.SIGKILL)
        return item

    got = []
    with pytest.raises(OSError) as e:
        for item, result, err in in_order(range(2000), work, 2, lambda r: None):
            got.append(result)
    assert e.value.errno == errno.ECHILD
    assert "a seal worker process ended abruptly" in e.value.strerror
    assert got == list(range(len(got))) and len(got) < 500
    assert children_of(os.getpid()) == []


def test_worker_tmp_files_are_the_callers_and_outlive_the_workers(tmp_path):
    """Files a worker stages carry the caller's pid: once the workers have exited (the
    walk is over, the last batch not yet published), another process's cleanup_tmp
    must keep them while the caller lives."""
    from verityfuse.store import Store

    with Store(str(tmp_path / "s"), create=True) as st:
        def work(item, here):
            name, fd = st.create_tmp()
            os.close(fd)
            return name

        names = [r for _, r, _ in in_order(range(200), work, 2, lambda r: None)]
        assert children_of(os.getpid()) == []  # the workers are gone
        assert len(set(names)) == 200
        assert {n.split(".")[0] for n in names} == {str(os.getpid())}
        other = subprocess.run([sys.executable, "-c", "import sys; from verityfuse.store import "
                                f"Store; print(Store({st.path!r}).cleanup_tmp())"],
                               capture_output=True, text=True, check=True)
        assert other.stdout == "0\n"
        assert sorted(os.listdir(os.path.join(st.path, "tmp"))) == sorted(names)


@pytest.mark.parametrize("when", ["stopped early", "at the end"])
def test_a_second_ctrl_c_while_the_pool_stops_kills_the_workers(monkeypatch, when):
    """Ctrl-C again while the workers are being stopped: no hang, no second traceback;
    the workers are killed.  Stopped early, the caller's own error goes on; at the end,
    the Ctrl-C does."""
    from concurrent.futures import ProcessPoolExecutor

    real = ProcessPoolExecutor.shutdown
    calls = []

    def shutdown(self, wait=True, *, cancel_futures=False):
        calls.append(wait)
        if wait:
            raise KeyboardInterrupt()
        real(self, wait=wait, cancel_futures=cancel_futures)

    monkeypatch.setattr(ProcessPoolExecutor, "shutdown", shutdown)
    gen = in_order(range(2000), lambda item, here: item, 2, lambda r: None)
    if when == "stopped early":
        with pytest.raises(ValueError):
            for item, _, _ in gen:
                if item == 100:
                    raise ValueError("the caller's error")
        gen.close()
    else:
        with pytest.raises(KeyboardInterrupt):
            list(gen)
    assert calls == [True, False]
    assert children_of(os.getpid()) == []


# -- seal with its workers -------------------------------------------------------------

HOOKED = """
import os, signal, sys
from verityfuse import cli, sealing, store_batch
store_batch.MAX_FILES = 64
what = sys.argv.pop(1)
if what in ("interrupt", "terminate", "terminate-group"):
    # Once the first batch is durable and reported: Ctrl-C (the whole group), or SIGTERM to
    # seal alone (kill, timeout) or to the whole group (systemd's stop of a unit)
    real_run = store_batch.Batch._run
    def run(self, after):
        real_run(self, after)
        if what == "terminate":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            os.killpg(0, signal.SIGINT if what == "interrupt" else signal.SIGTERM)
    store_batch.Batch._run = run
elif what in ("hang", "kill"):  # a worker stuck on f0150 (it says where), or killed
    caller = os.getpid()
    def at(rel):
        if rel.endswith("f0150") and os.getpid() != caller:
            if what == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            with open(os.environ["MARK"], "w") as f:
                f.write(f"{os.getpid()} {os.getppid()}")
            import time
            time.sleep(120)
    # Both ways a file is staged: the native call and the Python path.
    real_stage, real_stager = sealing.stage_path, sealing.native_stager
    def stage_path(store, source, rel, *a, **kw):
        at(rel)
        return real_stage(store, source, rel, *a, **kw)
    def native_stager(*a, **kw):
        stage = real_stager(*a, **kw)
        return stage and (lambda rels: ([at(r) for r in rels if r], stage(rels))[1])
    sealing.stage_path, sealing.native_stager = stage_path, native_stager
elif what == "orphan":  # Ctrl-C inside a submit: its chunk queued, not yet the caller's
    from concurrent.futures import ProcessPoolExecutor
    real_submit, submits = ProcessPoolExecutor.submit, []
    def submit(self, *a, **kw):
        fut = real_submit(self, *a, **kw)
        submits.append(fut)
        if len(submits) == 3:
            raise KeyboardInterrupt()
        return fut
    ProcessPoolExecutor.submit = submit
elif what == "stuck":  # Ctrl-C twice, and a thread of the pool's that never ends
    import threading
    from concurrent.futures import ProcessPoolExecutor
    # What a worker killed while it sent a result leaves: the pool's manager thread
    # waiting for the rest of the message, for ever (a thread that is not a daemon).
    threading.Thread(target=threading.Event().wait, name="stuck").start()
    real_run = store_batch.Batch._run
    def run(self, after):
        real_run(self, after)  # the first batch, durable and reported
        raise KeyboardInterrupt()  # the first Ctrl-C
    store_batch.Batch._run = run
    real_shutdown = ProcessPoolExecutor.shutdown
    def shutdown(self, wait=True, **kw):
        if wait:
            raise KeyboardInterrupt()  # the second, while the pool stops
        real_shutdown(self, wait=wait, **kw)
    ProcessPoolExecutor.shutdown = shutdown
sys.exit(cli.main())  # as the program: a seal stopped by SIGTERM ends by that signal
"""


BYTES = pattern(9000)


def tree(root, count):
    for i in range(count):
        d = root / f"d{i // 100}"
        d.mkdir(parents=True, exist_ok=True)
        write(d / f"f{i:04d}", BYTES[:i * 131 % 9000] + i.to_bytes(4, "little"))
    return root


def objects_for(paths):
    """How many objects sealing ``paths`` writes: one per file of more than a block (a
    file of one block has its descriptor in its index entry)."""
    return sum(os.path.getsize(p) > 4096 for p in paths)


def store_pairs(store):
    """(index entries, objects) now in the store, and its tmp/ files."""
    def files(part):
        top = os.path.join(store, part)
        return [f for _, _, fs in os.walk(top) for f in fs]
    return files("inodes"), files("objects"), files("tmp")


@pytest.mark.parametrize("how, status", [("interrupt", 130), ("terminate", -signal.SIGTERM),
                                         ("terminate-group", -signal.SIGTERM)])
def test_ctrl_c_stops_the_workers_and_leaves_only_what_was_reported(tmp_path, how, status):
    """Ctrl-C, and SIGTERM as a service manager, `timeout` or `kill` send it: the workers
    stop, what was staged and not reported is removed; Ctrl-C's status is 130, and a seal
    stopped by SIGTERM then ends by that signal (a clean stop to systemd)."""
    src = tree(tmp_path / "src", 3000)
    store = tmp_path / "store"
    p = subprocess.run([sys.executable, "-c", HOOKED, how, "seal", str(src), "--store",
                        str(store), "--threads", "2", "--json"],
                       capture_output=True, text=True, start_new_session=True)
    assert p.returncode == status, p.stderr
    assert "Traceback" not in p.stderr and p.stderr == ""
    reported = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(reported) == 64  # the first batch, durable before the interrupt
    entries, objects, tmp = store_pairs(store)
    assert (len(entries), tmp) == (64, [])  # what was staged: removed
    assert len(objects) == objects_for(r["file"] for r in reported) > 0
    assert children_of(os.getpid()) == []
    # A second seal finds the rest; every digest is the oracle's.
    r = subprocess.run([sys.executable, "-m", "verityfuse", "seal", str(src), "--store",
                        str(store), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(store_pairs(store)[0]) == 3000
    for line in r.stdout.splitlines()[::97]:
        out = json.loads(line)
        assert out["digest"] == fsverity_digest(out["file"])[0].split()[0]


def test_a_sigterm_ignored_when_seal_starts_stays_ignored(tmp_path):
    src = tree(tmp_path / "src", 3000)
    store = tmp_path / "store"
    p = subprocess.run([sys.executable, "-c", "import signal; signal.signal(signal.SIGTERM, "
                        "signal.SIG_IGN)\n" + HOOKED, "terminate", "seal", str(src), "--store",
                        str(store), "--threads", "2", "--json"],
                       capture_output=True, text=True, start_new_session=True)
    assert p.returncode == 0 and p.stderr == ""
    assert len(p.stdout.splitlines()) == 3000 and len(store_pairs(store)[0]) == 3000
    assert children_of(os.getpid()) == []


def test_workers_leave_sigterm_to_the_caller():
    """A SIGTERM to the whole process group (a service manager's stop) reaches the workers
    too: they ignore it, as Ctrl-C, and stop when the caller stops the pool."""
    got = list(in_order(range(100), lambda item, here: (signal.getsignal(signal.SIGTERM),
                                                        signal.getsignal(signal.SIGINT), here),
                        2, lambda r: None))
    assert {r for _, r, _ in got} == {(signal.SIG_IGN, signal.SIG_IGN, False)}
    assert children_of(os.getpid()) == []


@pytest.mark.parametrize("manifest", [False, True])
def test_ctrl_c_inside_a_submit_leaves_nothing_in_tmp(tmp_path, manifest):
    """A Ctrl-C landing in the pool's submit once the task was queued: no one held its
    future, so the files its worker staged (a chunk: 128 with a manifest's objects) stayed
    in tmp/ until a later seal's cleanup.  Once the workers and the batch have stopped,
    seal removes what it staged itself."""
    src = tree(tmp_path / "src", 3000)
    store = tmp_path / "store"
    opts = ["--manifest", str(tmp_path / "M"), "--unsigned"] if manifest else []
    p = subprocess.run([sys.executable, "-c", HOOKED, "orphan", "seal", str(src), "--store",
                        str(store), "--threads", "2", *opts],
                       capture_output=True, text=True, start_new_session=True)
    assert p.returncode == 130, p.stderr
    assert "Traceback" not in p.stderr
    assert store_pairs(store)[2] == []
    assert children_of(os.getpid()) == []


def test_a_killed_worker_fails_the_seal_clearly_and_the_next_seal_cleans_up(tmp_path):
    src = tree(tmp_path / "src", 400)
    store = tmp_path / "store"
    p = subprocess.run([sys.executable, "-c", HOOKED, "kill", "seal", str(src), "--store",
                        str(store), "--threads", "2"], capture_output=True, text=True)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert p.stderr == ("ERROR: a seal worker process ended abruptly (killed, or out of memory?): "
                        "nothing after the files reported was sealed\n")
    entries, objects, tmp = store_pairs(store)
    assert len(entries) == len(p.stdout.splitlines()) < 150  # only reported files are indexed
    r = subprocess.run([sys.executable, "-m", "verityfuse", "seal", str(src), "--store",
                        str(store)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    entries, objects, tmp = store_pairs(store)
    assert (len(entries), tmp) == (400, [])  # the dead workers' tmp/ removed
    assert len(objects) == objects_for(src.rglob("f*")) > 0


def test_seal_with_workers_hands_large_files_to_the_caller_and_matches_the_oracle(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    names = []
    for i in range(120):
        size = 3 << 20 if i in (5, 70) else i * 173 % 20000
        names.append(write(src / f"f{i:03d}", pattern(size) + bytes([i])))
    r = subprocess.run([sys.executable, "-m", "verityfuse", "seal", str(src), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [g["file"] for g in got] == [str(n) for n in names]
    for g in got:
        assert g["digest"] == fsverity_digest(g["file"])[0].split()[0], g["file"]


def eof_within(pipe, seconds):
    """Whether reading ``pipe`` reaches its end within ``seconds`` (every writer gone)."""
    import select

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if select.select([pipe], [], [], 0.1)[0] and not os.read(pipe.fileno(), 65536):
            return True
    return False


def test_workers_die_with_a_killed_seal(tmp_path):
    """seal killed (SIGKILL, as the OOM killer does): its workers die too, instead of
    living on with the store and seal's output open (a pipe's reader would wait for
    ever), and the next seal removes their staged files."""
    src = tree(tmp_path / "src", 400)
    store, mark = tmp_path / "store", tmp_path / "mark"
    workers = []
    p = subprocess.Popen([sys.executable, "-c", HOOKED, "hang", "seal", str(src), "--store",
                          str(store), "--threads", "2"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=dict(os.environ, MARK=str(mark)))
    try:
        for _ in range(600):
            if mark.exists() and mark.read_text():
                break
            p.poll()
            assert p.returncode is None, p.stderr.read()
            time.sleep(0.05)
        worker, parent = map(int, mark.read_text().split())
        assert parent == p.pid
        workers = children_of(p.pid)
        assert worker in workers
        p.kill()
        p.wait()
        assert eof_within(p.stdout, 10)  # no worker holds seal's output open any more
        for _ in range(100):
            if not any(os.path.exists(f"/proc/{w}") for w in workers):
                break
            time.sleep(0.05)
        assert [w for w in workers if os.path.exists(f"/proc/{w}")] == []
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()
        for w in workers:  # left alive only if the test failed: not for the next one
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert store_pairs(store)[2]  # staged files left, named by the dead seal
    r = subprocess.run([sys.executable, "-m", "verityfuse", "seal", str(src), "--store",
                        str(store)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    entries, objects, tmp = store_pairs(store)
    assert (len(entries), len(objects), tmp) == (400, objects_for(src.rglob("f*")), [])


def test_paths_named_for_a_manifest_update_share_one_pool(tmp_path, monkeypatch):
    """`seal SRC P1 P2 ... --manifest M` walks every path in one stream: one set of
    workers, not one for each path (each costs forks and a shutdown), and the manifest
    entries are the ones a single process records."""
    from verityfuse import cli, manifest, manifest_tree

    src = tree(tmp_path / "src", 400)
    made = []

    class Counted(seal_pool.ProcessPoolExecutor):
        def __init__(self, *a, **kw):
            made.append(1)
            super().__init__(*a, **kw)

    monkeypatch.setattr(seal_pool, "ProcessPoolExecutor", Counted)
    paths = [str(src / f"d{i}") for i in range(4)] + [str(src / "d3" / "f0350")]
    entries = {}
    for threads in ("2", "1"):
        m = tmp_path / f"m{threads}.json"
        assert cli.main(["seal", str(src), *paths, "--manifest", str(m), "--unsigned",
                         "--store", str(tmp_path / f"s{threads}"), "--threads", threads]) == 0
        entries[threads] = list(manifest_tree.iter_entries(manifest.read_envelope(str(m))[1]))
    assert made == [1]
    assert entries["2"] == entries["1"] and len(entries["1"]) == 1 + 4 + 400


def test_verify_with_workers_reports_every_kind_of_failure_as_one_process_does(tmp_path):
    """`verify` checks files in worker processes: a hash mismatch, a changed size, a
    damaged store object and an unreadable file cross the pipe with their messages
    (IntegrityError pickles with its own arguments), in walk order, with the same
    output and exit status as one process."""
    src = tree(tmp_path / "src", 300)
    assert subprocess.run([sys.executable, "-m", "verityfuse", "seal", str(src), "--threads", "1"],
                          capture_output=True).returncode == 0
    with open(src / "d0" / "f0040", "r+b") as f:  # 5240 bytes: flip a byte of block 1
        f.seek(4100)
        b = f.read(1)
        f.seek(4100)
        f.write(bytes([b[0] ^ 1]))
    with open(src / "d1" / "f0150", "ab") as f:
        f.write(b"more")
    os.unlink(src / "d2" / "f0250")
    os.mkfifo(src / "d2" / "f0250")  # a FIFO where a sealed file was: a stale entry
    digest = fsverity_digest(src / "d2" / "f0260")[0].split()[0].split(":")[1]
    with open(src / ".verityfuse" / "objects" / "sha256" / digest[:2] / digest, "r+b") as f:
        f.truncate(100)  # its store object damaged
    outs = {}
    for threads in ("1", "2"):
        for fmt in ([], ["--json"]):
            outs[threads, bool(fmt)] = subprocess.run(
                [sys.executable, "-m", "verityfuse", "verify", str(src), "--threads", threads,
                 *fmt], capture_output=True, text=True)
    for fmt in (False, True):
        one, two = outs["1", fmt], outs["2", fmt]
        assert (two.returncode, two.stdout, two.stderr) == (one.returncode, one.stdout, one.stderr)
        assert one.returncode == 1
    lines = [json.loads(line) for line in outs["2", True].stdout.splitlines()]
    bad = {g["file"][len(str(src)) + 1:]: g["status"] for g in lines
           if g.get("status") in ("corrupt", "error")}  # (the oracle's files are unsealed)
    assert bad == {"d0/f0040": "corrupt", "d1/f0150": "corrupt", "d2/f0260": "corrupt"}
    text = outs["2", False]
    assert f"CORRUPT {src}/d0/f0040: data block at offset 4096: expected " in text.stdout
    assert f"CORRUPT {src}/d2/f0260: " in text.stdout and "truncated header" in text.stdout
    assert "1 index entries name no file" in text.stderr


@pytest.mark.parametrize("result", ["unreadable", "unpicklable"])
def test_a_result_that_cannot_cross_the_pipe_is_an_error_saying_so(result):
    """Not 'a worker ended abruptly (killed?)': the pool is fine, a result is not."""
    def work(item, here):
        if item == 77:
            return TwoArgs("odd", 77) if result == "unreadable" else (lambda: None)
        return item

    with pytest.raises(OSError) as e:
        for _ in in_order(range(1000), work, 2, lambda r: None):
            pass
    assert e.value.errno == errno.EPROTO
    assert e.value.strerror.startswith("a worker process's results could not be passed back: ")
    assert children_of(os.getpid()) == []


def test_workers_refuse_what_is_not_a_regular_file_without_blocking(tmp_path):
    """Paths named to seal with workers: a FIFO (which an open could block on), a
    symlink and a device are refused in place by the worker's O_PATH check, each with
    its kind named, and every other file is sealed."""
    src = tree(tmp_path / "src", 100)
    os.mkfifo(src / "fifo")
    os.symlink("d0/f0001", src / "link")
    os.mknod(src / "null", 0o600 | 0o020000, os.makedev(1, 3))
    names = [f"d{i // 100}/f{i:04d}" for i in range(40)]
    odd = ["fifo", "link", "null"]
    r = subprocess.run([sys.executable, "-m", "verityfuse", "seal", str(src),
                        *(str(src / n) for n in names[:20] + odd + names[20:]), "--json",
                        "--threads", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [g["file"] for g in got] == [str(src / n) for n in names[:20] + odd + names[20:]]
    errors = {os.path.basename(g["file"]): g["error"] for g in got if "error" in g}
    assert errors == {"fifo": f"{src}/fifo is a FIFO, not a regular file",
                      "link": f"{src}/link is a symlink, not a regular file",
                      "null": f"{src}/null is a character device, not a regular file"}
    assert sum("digest" in g for g in got) == 40



RACE = """
import os, queue, signal, threading
from concurrent.futures import ProcessPoolExecutor, process
from verityfuse.seal_pool import in_order

# The pool manager hands the workers the first three tasks only: the fourth stays
# queued in the manager (cancellable), as when the manager has not run since it was
# submitted.  Finding a worker dead, it errs the first task still running (the one
# the caller waits on), then waits until the caller has started stopping the pool:
# the window in which the caller cancelled the queued one.
real_add = process._ExecutorManagerThread.add_call_item_to_queue
def add_call_item_to_queue(self):
    ids, held, first3 = self.work_ids_queue, [], queue.Queue()
    while not ids.empty():
        wid = ids.get_nowait()
        first3.put(wid) if wid < 3 else held.append(wid)
    self.work_ids_queue = first3
    try:
        real_add(self)
    finally:
        self.work_ids_queue = ids
        for wid in list(first3.queue) + held:
            ids.put(wid)
process._ExecutorManagerThread.add_call_item_to_queue = add_call_item_to_queue
stopping = threading.Event()
real_shutdown = ProcessPoolExecutor.shutdown
def shutdown(self, *a, **kw):
    stopping.set()
    return real_shutdown(self, *a, **kw)
ProcessPoolExecutor.shutdown = shutdown
real_broken = process._ExecutorManagerThread.terminate_broken
def terminate_broken(self, cause):
    first = next(iter(self.pending_work_items))
    self.pending_work_items.pop(first).future.set_exception(process.BrokenProcessPool("dead"))
    stopping.wait(20)
    real_broken(self, cause)
process._ExecutorManagerThread.terminate_broken = terminate_broken

def work(item, here):
    if item == 100:
        os.kill(os.getpid(), signal.SIGKILL)
    return item
try:
    for _ in in_order(range(5000), work, 2, lambda r: None):
        pass
except OSError as e:
    print(e.errno)
"""


def test_a_worker_killed_while_tasks_are_queued_stops_without_a_hang_or_traceback():
    """Python 3.11's pool manager errs every queued task when a worker dies, and died of
    InvalidStateError at one the caller had just cancelled: a traceback on stderr, and
    the tasks after it never finished (the caller hung reading them).  Stopping now
    cancels nothing (the workers skip what is queued)."""
    p = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True,
                       timeout=30)  # the code before hung here
    assert (p.returncode, p.stdout, p.stderr) == (0, f"{errno.ECHILD}\n", "")



def test_two_pools_at_once_each_stop_their_own():
    """Two callers' pools alive at once in one process: the first stopping early must
    not stop the second's workers (a shared stop byte did: the second then failed)."""
    abandoned = []
    a = in_order(range(3000), lambda item, here: item, 2, abandoned.append)
    first_a = [next(a)[0] for _ in range(10)]
    b = in_order(range(100000, 103000), lambda item, here: item, 2, abandoned.append)
    first_b = [next(b)[0] for _ in range(10)]
    a.close()
    rest_b = [item for item, result, err in b]
    assert first_a == list(range(10))
    assert first_b + rest_b == list(range(100000, 103000))
    assert all(r < 3000 for r in abandoned)  # only the first's results were abandoned
    assert children_of(os.getpid()) == []


def test_a_second_ctrl_c_kills_only_the_pools_own_workers(monkeypatch):
    """The workers are killed at a second Ctrl-C; another child process of the caller's
    (here one of multiprocessing's, as an API user might have) is left alone."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    other = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    other.start()
    real = ProcessPoolExecutor.shutdown

    def shutdown(self, wait=True, *, cancel_futures=False):
        if wait:
            raise KeyboardInterrupt()
        real(self, wait=wait, cancel_futures=cancel_futures)

    monkeypatch.setattr(ProcessPoolExecutor, "shutdown", shutdown)
    try:
        with pytest.raises(KeyboardInterrupt):
            list(in_order(range(2000), lambda item, here: item, 2, lambda r: None))
        assert other.is_alive()
        assert children_of(os.getpid()) == [other.pid]
    finally:
        other.kill()
        other.join()


def test_a_second_ctrl_c_ends_seal_even_with_a_pool_thread_stuck(tmp_path):
    """After a second Ctrl-C the workers are killed; a worker killed while it sent a
    result leaves the pool's manager thread waiting for the rest for ever, and the
    interpreter's exit waited for it (a hang 3 times in 20 with two Ctrl-C 2 ms
    apart).  seal now leaves at once, its output flushed, exit status 130."""
    src = tree(tmp_path / "src", 400)
    p = subprocess.run([sys.executable, "-c", HOOKED, "stuck", "seal", str(src), "--store",
                        str(tmp_path / "store"), "--threads", "2", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stderr) == (130, "")
    assert len(p.stdout.splitlines()) == 64  # the first batch, reported before the Ctrl-C
    assert children_of(os.getpid()) == []
