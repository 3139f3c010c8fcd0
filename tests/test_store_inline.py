"""A file of at most one block in a format-3 store: its descriptor is kept in its index
entry and it has no tree object (protocol/store-format.md).

The kept descriptor proves itself as an object does (it must pass the kernel's
validation, hash to the entry's digest and describe one block at most); a mount,
`verify` and the library read such files exactly as files with an object, and
what they export (digest, descriptor) is fsverity-utils'.  A format-2 store stays
format 2 until `upgrade-store`, so older releases can still read it.
"""

import errno
import json
import os
import subprocess
import sys

import pytest

import verityfuse
from verityfuse import merkle
from verityfuse.errors import StoreCorrupt
from verityfuse.sealing import entry_of_path, seal_path, stage_path
from verityfuse.store import Store
from verityfuse.store_batch import Batch
from verityfuse.store_index import IndexEntry, entry_bytes, parse_entry
from conftest import drop_caches, flip, fsverity_digest, pattern, write
from test_mount import pread_errno

B = 4096
PARAMS = merkle.Params()
VF = [sys.executable, "-m", "verityfuse"]
SIZES = {"empty": 0, "one": 1, "bm1": B - 1, "b": B, "bp1": B + 1}


def oracle(path, *opts):
    """(digest text, descriptor bytes) of fsverity-utils, its output files removed."""
    line, _, desc = fsverity_digest(path, *opts)
    for name in (".oracle.tree", ".oracle.desc"):
        os.unlink(os.path.join(os.path.dirname(str(path)), name))
    return line.split()[0], desc


def store_files(store):
    """Store paths of every object and index entry."""
    return sorted(os.path.relpath(os.path.join(d, f), store)
                  for top in ("objects", "inodes") for d, _, fs in os.walk(os.path.join(store, top))
                  for f in fs)


def vf(*args):
    return subprocess.run([*VF, *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def src(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name, size in SIZES.items():
        write(src / name, pattern(size + 7)[7:])
    return src


def test_an_entry_keeps_the_descriptor_of_a_file_of_one_block(src, tmp_path):
    """Sealing writes fsverity-utils' descriptor into the entry of each file of one block
    (no object), an object for the file of two blocks, and every entry reads back equal."""
    store = str(tmp_path / "store")
    with Store(store, create=True) as st:
        entries = {name: seal_path(st, str(src), name, PARAMS) for name in SIZES}
        for name, e in entries.items():
            digest, desc = oracle(src / name)
            assert e.digest_text == digest
            assert st.get_entry(e.key) == e
            if SIZES[name] <= B:
                assert e.descriptor.raw == desc and not os.path.exists(st.object_path(e.alg, e.digest))
                with st.open_tree(e) as t:  # what a mount verifies against
                    assert (t.descriptor.raw, t.geometry.tree_size, t.read_tree(0, B)) == (desc, 0, b"")
            else:
                assert e.descriptor is None and os.path.exists(st.object_path(e.alg, e.digest))
    assert len(store_files(store)) == len(SIZES) + 1


def test_a_batch_of_files_of_one_block_publishes_entries_only(src, tmp_path, monkeypatch):
    """No object to publish: two syncs (the staged entries' bytes, then their names), no
    objects/ directory, and the files are reported after the last sync."""
    store = str(tmp_path / "store")
    events = []
    with Store(store, create=True) as st:
        real_sync = st.sync
        monkeypatch.setattr(st, "sync", lambda: (events.append(
            ("sync", len(store_files(store)), len(os.listdir(store + "/tmp")))), real_sync()))
        with Batch(st) as batch:
            for name in ("empty", "one", "b"):
                batch.add(stage_path(st, str(src), name, PARAMS)[0])
                batch.then(events.append, ("done", name))
    assert events == [("sync", 0, 3), ("sync", 3, 0), ("done", "empty"), ("done", "one"),
                      ("done", "b")]
    assert not os.path.exists(os.path.join(store, "objects"))


def _tampered(src, **change):
    """The bytes of an entry of ``src/one``'s inode with ``change`` applied to its JSON."""
    digest, desc = oracle(src / "one")
    doc = {"descriptor": desc.hex(), "digest": digest, "path": "one", "version": 2}
    doc.update(change)
    return json.dumps(doc).encode()


def _descriptor(size, *, reserved=b"", alg=merkle.SHA256, block_size=B):
    params = merkle.Params(alg, block_size)
    raw = merkle.make_descriptor(params, size, bytes(alg.digest_size))
    if reserved:
        raw = raw[:-len(reserved)] + reserved
    return raw, merkle.format_digest(alg, merkle.file_digest(alg, raw))


def test_a_kept_descriptor_that_does_not_prove_itself_is_named_corruption(src):
    """Each way an entry's descriptor can be wrong is StoreCorrupt naming the entry and,
    where it applies, the digest expected and the one the descriptor has."""
    key = "ab" * 32
    other_digest, other_desc = oracle(src / "b")
    two_blocks, two_digest = _descriptor(B + 1)
    reserved, reserved_digest = _descriptor(5, reserved=b"\1")
    sha512, sha512_digest = _descriptor(5, alg=merkle.SHA512)
    # A block of 512 KiB would be read and hashed whole at every read: refused, as in an object.
    huge, huge_digest = _descriptor(300000, block_size=1 << 19)
    one_digest = oracle(src / "one")[0]
    cases = [
        (dict(descriptor="00" * 255), "descriptor must be 256 bytes in hex"),
        (dict(descriptor=7), "descriptor must be 256 bytes in hex"),
        (dict(descriptor="zz" * 256), "non-hexadecimal number found in fromhex() arg at position 0"),
        (dict(descriptor=other_desc.hex()),
         f"descriptor does not match the digest: expected {one_digest}, actual {other_digest}"),
        (dict(descriptor=two_blocks.hex(), digest=two_digest),
         "descriptor of 4097 bytes in blocks of 4096: a file with a tree needs an object"),
        (dict(descriptor=reserved.hex(), digest=reserved_digest),
         "descriptor: reserved descriptor bytes are not zero"),
        (dict(descriptor=huge.hex(), digest=huge_digest),
         "descriptor: block size 524288 is larger than 65536"),
        (dict(descriptor=sha512.hex()),
         f"descriptor does not match the digest: expected {one_digest}, actual {sha512_digest}"),
    ]
    for change, why in cases:
        with pytest.raises(StoreCorrupt) as e:
            parse_entry("STORE/inodes/ab/" + key, key, _tampered(src, **change))
        assert str(e.value) == f"STORE/inodes/ab/{key}: malformed index entry: {why}", change
    # The untampered entry is what entry_bytes writes, and it parses.
    digest, desc = oracle(src / "one")
    parsed = parse_entry("e", key, _tampered(src))
    assert parsed == IndexEntry(key, merkle.SHA256, merkle.parse_digest(digest)[1], b"", "one",
                                merkle.parse_descriptor(desc))
    assert entry_bytes(parsed.alg, parsed.digest, b"", "one", parsed.descriptor) == \
        json.dumps(json.loads(_tampered(src)), sort_keys=True).encode() + b"\n"


def _outcome(name, key, data):
    try:
        return parse_entry(name, key, data)
    except StoreCorrupt as e:
        return f"StoreCorrupt: {e}"


def test_the_quick_parse_of_an_entry_agrees_with_the_json_decoder(src):
    """An entry laid out exactly as entry_bytes writes it is parsed without the JSON
    decoder: the same entry, or the same error word for word, as the decoder's path
    gives for the same JSON without its final newline (which only the decoder takes),
    good or bad.  An entry the quick parse must not take (a path with escapes, another
    key order, upper-case hex) still goes through the decoder."""
    from verityfuse.store_index import _CANONICAL

    key, name = "cd" * 32, "STORE/inodes/cd/" + "cd" * 32
    digest, desc = oracle(src / "one")
    other_digest, other_desc = oracle(src / "b")
    two_blocks, two_digest = _descriptor(B + 1)
    reserved, reserved_digest = _descriptor(5, reserved=b"\1")
    changes = [{}, dict(descriptor=None), dict(signature="0102ff"), dict(signature=""),
               dict(signature="abc"), dict(descriptor="00" * 255), dict(descriptor="ab" * 257),
               dict(descriptor=other_desc.hex()), dict(digest=other_digest),
               dict(descriptor=two_blocks.hex(), digest=two_digest),
               dict(descriptor=reserved.hex(), digest=reserved_digest),
               dict(digest="sha256:" + "00" * 31), dict(digest="sha1:" + "00" * 20),
               dict(digest="sha256"), dict(digest=""), dict(path=""),
               dict(path="a b/c!#$%&'()*+,-./09:;<=>?@AZ[]^_`az{|}~")]
    quick = 0
    for change in changes:
        doc = {"descriptor": desc.hex(), "digest": digest, "path": "one", "version": 2}
        doc.update(change)
        doc = {k: v for k, v in doc.items() if v is not None}
        data = json.dumps(doc, sort_keys=True).encode() + b"\n"
        quick += _CANONICAL(data) is not None
        assert _outcome(name, key, data) == _outcome(name, key, data[:-1]), change
    assert quick == len(changes)  # every one took the quick parse
    # Valid JSON the quick parse leaves to the decoder, and what the decoder says.
    for doc, data in [("escaped path", entry_bytes(merkle.SHA256, bytes(32), b"", 'a"\\b\u00e9')),
                      ("keys unsorted", json.dumps({"path": "one", "digest": digest,
                                                    "version": 2}).encode() + b"\n"),
                      ("upper-case hex", (json.dumps({"digest": digest.upper().replace(
                          "SHA256", "sha256"), "path": "one", "version": 2}, sort_keys=True)
                                          + "\n").encode())]:
        assert _CANONICAL(data) is None, doc
        got = parse_entry(name, key, data)
        if doc == "escaped path":
            assert (got.digest, got.path) == (bytes(32), 'a"\\b\u00e9')
        else:
            assert (got.digest, got.path) == (merkle.parse_digest(digest)[1], "one"), doc


def test_a_format_2_store_stays_format_2_until_upgraded(src, tmp_path):
    """Sealing into a format-2 store writes an object per file (an older release reads it);
    `upgrade-store` only rewrites VERSION, after which a file of one block gets none; every
    file verifies either way."""
    store = tmp_path / "store"
    Store(str(store), create=True).close()
    (store / "VERSION").write_bytes(b"verityfuse-store 2\n")
    assert vf("seal", src, src / "one", "--store", store).returncode == 0
    with Store(str(store)) as st:
        assert st.version == 2
        e = entry_of_path(st, str(src / "one"))
        assert e.descriptor is None and os.path.exists(st.object_path(e.alg, e.digest))
    r = vf("upgrade-store", src, "--store", store)
    assert (r.returncode, r.stderr) == (0, f"store {store}: format 2 to 3, 0 entries converted, "
                                           f"0 dropped\n")
    assert (store / "VERSION").read_bytes() == b"verityfuse-store 3\n"
    r = vf("upgrade-store", src, "--store", store)
    assert (r.returncode, r.stderr) == (0, f"store {store} is already format 3\n")
    assert vf("seal", src, src / "b", "--store", store).returncode == 0
    with Store(str(store)) as st:
        e = entry_of_path(st, str(src / "b"))
        assert e.descriptor is not None and not os.path.exists(st.object_path(e.alg, e.digest))
    r = vf("verify", src, "--store", store, "--json", "-v")
    status = {os.path.basename(d["file"]): d["status"]
              for d in map(json.loads, r.stdout.splitlines()) if "file" in d}
    assert (r.returncode, status["one"], status["b"]) == (0, "ok", "ok"), r.stdout
    # An older release refuses the store by its VERSION (this one refuses a newer one alike).
    (store / "VERSION").write_bytes(b"verityfuse-store 4\n")
    r = vf("verify", src, "--store", store)
    assert r.returncode != 0 and "unsupported store version b'verityfuse-store 4\\n'" in r.stderr


def test_a_format_2_store_keeps_no_descriptor(src, tmp_path):
    """A lazy store (a local mount's default) created as format 2 by someone else after it
    was opened gets an object per file, as format 2 says; an entry with a descriptor in a
    format-2 store is corruption, named."""
    store = str(tmp_path / "store")
    with Store(store, lazy=True) as st:
        assert not st.exists
        Store(store, create=True).close()
        write(os.path.join(store, "VERSION"), b"verityfuse-store 2\n")
        e = seal_path(st, str(src), "one", PARAMS)
        assert e.descriptor is None and os.path.exists(st.object_path(e.alg, e.digest))
        assert st.get_entry(e.key) == e and st.version == 2
    with Store(store, create=True) as st:
        write(os.path.join(store, "inodes", e.key[:2], e.key), _tampered(src))
        with pytest.raises(StoreCorrupt) as err:
            st.get_entry(e.key)
        assert str(err.value) == (f"{store}/inodes/{e.key[:2]}/{e.key}: malformed index entry: "
                                  f"a descriptor in a format-2 store (format 3 only)")


def test_the_library_reads_a_file_whose_entry_keeps_its_descriptor(src, tmp_path):
    """verityfuse.open by the store's entry and by a pinned digest (the entry's descriptor is
    used only if it hashes to the pinned digest); a changed byte is EIO."""
    store = tmp_path / "store"
    with Store(str(store), create=True) as st:
        seal_path(st, str(src), "bm1", PARAMS)
    digest = oracle(src / "bm1")[0]
    data = (src / "bm1").read_bytes()
    with verityfuse.open_verified(src / "bm1", store=store) as f:
        assert f.read() == data and str(f.digest) == digest
    with verityfuse.open_verified(src / "bm1", store=store, digest=digest) as f:
        assert f.read() == data
    other = oracle(src / "one")[0]
    with pytest.raises(OSError) as e:
        verityfuse.open_verified(src / "bm1", store=store, digest=other)
    assert e.value.errno == errno.EIO and f"its bytes do not give {other}" in str(e.value)
    # A copy (another inode, no entry, no object) reads against the pinned digest, as a copy
    # of a file with an object does: a file of one block needs no tree.
    write(tmp_path / "copy", data)
    with verityfuse.open_verified(tmp_path / "copy", store=store, digest=digest) as f:
        assert f.read() == data
    write(tmp_path / "copy", data[:-1] + b"?")
    with pytest.raises(OSError) as e:
        verityfuse.open_verified(tmp_path / "copy", store=store, digest=digest)
    assert e.value.errno == errno.EIO and f"its bytes do not give {digest}" in str(e.value)
    # Other parameters are tried as its inode's entry names them (a copy has none).
    with Store(str(store)) as st:
        seal_path(st, str(src), "one", merkle.Params(merkle.SHA512, 1024, b"\x01\x02"))
    salted = oracle(src / "one", "--hash-alg=sha512", "--block-size=1024", "--salt=0102")[0]
    with verityfuse.open_verified(src / "one", store=store, digest=salted) as f:
        assert f.read() == (src / "one").read_bytes()
    # A damaged entry (the store is not trusted with a pinned digest): the defaults still.
    with Store(str(store)) as st:
        key = entry_of_path(st, str(src / "bm1")).key
    write(store / "inodes" / key[:2] / key, b"{not json")
    with verityfuse.open_verified(src / "bm1", store=store, digest=digest) as f:
        assert f.read() == data
    with Store(str(store)) as st:
        seal_path(st, str(src), "bm1", PARAMS)
    flip(src / "bm1", 100)
    with verityfuse.open_verified(src / "bm1", store=store) as f:
        with pytest.raises(OSError) as e:
            f.read()
        assert e.value.errno == errno.EIO


def test_a_mount_serves_and_exports_files_whose_entry_keeps_their_descriptor(src, verified_mount):
    """Through a local mount: the bytes, `fsverity measure`, the descriptor exported through
    FUSE_FSVERITY (`dump-metadata`), EIO for a changed byte; an entry whose descriptor was
    swapped for another file's fails the open (after a remount: verity is kept on the inode)."""
    m = verified_mount(src)
    store = str(src / ".verityfuse")
    assert len(store_files(store)) == len(SIZES) + 1  # one object: bp1's
    for name in SIZES:
        digest, desc = oracle(src / name)
        got = m.mountpoint / name
        assert got.read_bytes() == (src / name).read_bytes(), name
        r = subprocess.run(["fsverity", "measure", got], capture_output=True, text=True)
        assert r.stdout == f"{digest} {got}\n", name
        r = subprocess.run([*VF, "dump-metadata", "descriptor", got], capture_output=True)
        assert (r.returncode, r.stdout) == (0, desc), name
    flip(src / "bm1", B - 2)
    drop_caches()
    assert pread_errno(m.mountpoint / "bm1", 0, B) == errno.EIO
    assert "integrity failure: bm1: data block at offset 0: expected hash" in m.log()
    m.unmount()
    with Store(store) as st:
        e = entry_of_path(st, str(src / "one"))
        other = entry_of_path(st, str(src / "b"))
        path = os.path.join(store, "inodes", e.key[:2], e.key)
    doc = json.loads(open(path, "rb").read())
    doc["descriptor"] = other.descriptor.raw.hex()
    write(path, json.dumps(doc).encode())
    m = verified_mount(src, seal=False)
    with pytest.raises(OSError) as err:
        open(m.mountpoint / "one", "rb")
    assert err.value.errno == errno.EIO
    assert f"one: {path}: malformed index entry: descriptor does not match the digest" in m.log()
    assert (m.mountpoint / "b").read_bytes() == (src / "b").read_bytes()


def test_seal_refuses_a_block_size_no_mount_reads(src, tmp_path):
    """A tree block above 65536 bytes is refused by every reader (it would be read and
    hashed whole at every read): seal says so before hashing anything."""
    store = tmp_path / "store"
    r = vf("seal", src, "--block-size", "131072", "--store", store)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == ("ERROR: --block-size 131072: a store keeps Merkle trees of blocks of at "
                        "most 65536 bytes (each read hashes a tree block whole)\n")
    assert not store.exists()
    assert vf("seal", src, "--block-size", "65536", "--store", store).returncode == 0
