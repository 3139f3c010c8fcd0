"""`seal` and `verify` at their edges, as a review attacked them (s38): warnings that name
files are escaped, a store named as SOURCE or inside what is sealed is never sealed into
itself, seals sharing a store after a crash, a manifest inside SOURCE, what a killed
`seal --manifest` leaves, names that are not UTF-8, and --json's error objects."""

import json
import os
import subprocess
import sys

VF = [sys.executable, "-m", "verityfuse"]


def vf(*args, timeout=120):
    return subprocess.run(VF + [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args],
                          capture_output=True, timeout=timeout)


def test_a_skipped_names_warning_is_escaped(tmp_path):
    """A FIFO named with a terminal escape and a newline: its WARNING line printed the
    name raw, driving the terminal and forging a second line."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok").write_bytes(b"hi")
    os.mkfifo(src / "\x1b]0;PWNED\x07fifo\nWARNING: forged line")
    r = vf("seal", src, "--store", tmp_path / "store", "--manifest", tmp_path / "M")
    assert r.returncode == 0, r.stderr
    assert r.stderr.decode().splitlines()[0] == (
        f"WARNING: skipping {src}/\\x1b]0;PWNED\\x07fifo\\nWARNING: forged line: not a "
        f"directory, regular file or symlink")
    assert b"\x1b" not in r.stderr and b"\nWARNING: forged" not in r.stderr


def test_an_upgrade_warning_is_escaped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    idx = tmp_path / "store" / "index" / "aa"
    idx.mkdir(parents=True)
    (tmp_path / "store" / "VERSION").write_text("verityfuse-store 1\n")
    (idx / "aa01").write_text(json.dumps({"path": "gone\x1b]0;PWNED\x07\nWARNING: forged",
                                          "digest": "sha256:" + "00" * 32}))
    r = vf("upgrade-store", src, "--store", tmp_path / "store")
    assert r.returncode == 0, r.stderr
    assert b"\x1b" not in r.stderr and b"\nWARNING: forged" not in r.stderr, r.stderr
    assert b"gone\\x1b]0;PWNED\\x07\\nWARNING: forged" in r.stderr, r.stderr
