"""The one way the command line prints JSON (protocol/cli-json.md): one object per
line, keys sorted, each carrying the schema version its reader can check."""

from __future__ import annotations

import sys

# Bumped only when a key changes meaning or is removed; adding keys keeps it.
SCHEMA = 1


def emit(obj: dict, flush: bool = True):
    """One JSON line on stdout; ``flush=False``: the caller flushes (once for many lines)."""
    import json  # not at start-up: most commands print no JSON (`digest`'s, ~1.4 ms)

    # allow_nan=False: a line is JSON for every parser (NaN and Infinity are not JSON).
    sys.stdout.write(json.dumps(dict(obj, schema=SCHEMA), sort_keys=True, allow_nan=False)
                     + "\n")
    if flush:
        sys.stdout.flush()


# Names are escaped as protocol/cli-json.md says, so that a name from a walked tree
# (the host's, in a confidential guest) can never forge a line or drive the terminal:
# in the human output and in every log record (logs.escape and logs.one_line are
# these).  The check is cheap; stats' escaping is imported only for a name that needs
# it (`digest`'s start-up stays free of it).

def shown(name: str) -> str:
    """A file name for a human line or a log record, in the notation `verityfuse status`
    prints names with (``stats.escape_name``: backslash doubled, ``\\n``, ``\\t``,
    ``\\r``, other unprintables and bytes that are not UTF-8 as ``\\xNN``/``\\uNNNN``).
    Unambiguous, and always one line."""
    if name.isprintable() and "\\" not in name:
        return name  # nearly every name: no copy
    from .stats import escape_name
    return escape_name(name)


def shown_text(text: str) -> str:
    """``text`` (a message, which may quote names) with its unprintable characters
    escaped, backslashes kept: always one line, and idempotent on escaped text."""
    if text.isprintable():
        return text
    from .stats import escape_name
    return "".join(ch if ch.isprintable() else escape_name(ch) for ch in text)


def error(msg: str):
    """A command's error line on stderr.  Escaped: it may quote what a registry, a
    manifest or a file name said, which must not drive the terminal."""
    print(f"ERROR: {shown_text(msg)}", file=sys.stderr)


def warning(msg: str, file=None):
    """A command's warning line on stderr (``file``), escaped as ``error``'s."""
    print(f"WARNING: {shown_text(msg)}", file=file or sys.stderr)
