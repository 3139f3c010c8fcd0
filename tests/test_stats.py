"""The status counters and the words status prints them in (pure: no mount)."""

import pytest

from verityfuse import stats
from verityfuse.stats import Stats, escape_name, human_bytes, human_duration


def test_failures_collapse_per_block_with_first_and_last_time(monkeypatch):
    clock = iter([100.0, 100.0, 101.5, 102.0, 103.25])
    monkeypatch.setattr(stats.time, "time", lambda: next(clock))
    s = Stats()  # started at 100.0
    s.failure("f: block 0", "f", 0)
    s.failure("g: block 4096", "g", 4096)
    s.failure("f: block 0 again", "f", 0)
    snap = s.snapshot()
    assert snap["integrity_failures"] == 3 and snap["failure_groups_dropped"] == 0
    # the most recently seen last; the message is the latest one
    assert snap["failures"] == [
        {"file": "g", "offset": 4096, "count": 1, "first": 101.5, "last": 101.5,
         "message": "g: block 4096"},
        {"file": "f", "offset": 0, "count": 2, "first": 100.0, "last": 102.0,
         "message": "f: block 0 again"},
    ]
    assert snap["uptime_s"] == 3.2


def test_failure_groups_are_bounded_and_the_oldest_go_first():
    s = Stats()
    for i in range(stats.FAILURE_GROUPS + 3):
        s.failure("m", "f", i * 4096)
    s.failure("m", "f", 5 * 4096)  # seen again: now the newest, kept
    snap = s.snapshot()
    assert len(snap["failures"]) == stats.FAILURE_GROUPS and snap["failure_groups_dropped"] == 3
    assert [g["offset"] for g in snap["failures"][:2]] == [3 * 4096, 4 * 4096]
    assert snap["failures"][-1]["offset"] == 5 * 4096 and snap["failures"][-1]["count"] == 2
    assert snap["integrity_failures"] == stats.FAILURE_GROUPS + 4


@pytest.mark.parametrize("n, text", [(0, "0 bytes"), (1, "1 byte"), (1023, "1023 bytes"),
                                     (1024, "1.0 KiB"), (1536, "1.5 KiB"), (32 << 20, "32.0 MiB"),
                                     (5 << 30, "5.0 GiB"), (3 << 50, "3072.0 TiB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize("s, text", [(0, "0s"), (59.9, "59s"), (60, "1m 0s"), (3600, "1h 0m 0s"),
                                     (3 * 86400 + 3725, "3d 1h 2m 5s")])
def test_human_duration(s, text):
    assert human_duration(s) == text


@pytest.mark.parametrize("name, shown", [
    ("plain name.txt", "plain name.txt"),
    ("a\nb\tc\rd", "a\\nb\\tc\\rd"),
    ("\x1b[2Jclear", "\\x1b[2Jclear"),
    ("back\\slash", "back\\\\slash"),
    (b"caf\xe9".decode("utf-8", "surrogateescape"), "caf\\xe9"),
    ("café", "café"),
    ("rtl\u202eexe.txt", "rtl\\u202eexe.txt"),
    ("\x7f\x85", "\\x7f\\x85"),
])
def test_escape_name(name, shown):
    assert escape_name(name) == shown


def test_the_status_object_fits_an_xattr_whatever_the_names():
    """Hostile names (4095 bytes, every one a 6-byte JSON escape) in every group: the
    object the mount serves as an xattr stays under XATTR_SIZE_MAX (64 KiB)."""
    import json

    s = Stats()
    for i in range(stats.FAILURE_GROUPS + 5):
        name = f"{i}" + "\x1b" * 4094
        s.failure(f"{name}: data block at offset 0: expected {'0' * 64}, actual {'f' * 64}", name, 0)
    snap = s.snapshot()
    assert len(snap["failures"]) == stats.FAILURE_GROUPS and snap["failure_groups_dropped"] == 5
    assert len(json.dumps(snap, sort_keys=True)) < 60000
    first = snap["failures"][0]
    assert first["file"].startswith("5\x1b") and len(first["file"]) == stats.SHOWN_CHARS
    assert first["file"].endswith("...") and first["message"].endswith("...")
