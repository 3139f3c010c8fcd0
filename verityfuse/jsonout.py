"""The one way the command line prints JSON (protocol/cli-json.md): one object per
line, keys sorted, each carrying the schema version its reader can check."""

from __future__ import annotations

import json

# Bumped only when a key changes meaning or is removed; adding keys keeps it.
SCHEMA = 1


def emit(obj: dict):
    print(json.dumps(dict(obj, schema=SCHEMA), sort_keys=True), flush=True)


# The human output escapes names as protocol/cli-json.md says, so that a name from a
# walked tree (the host's, in a confidential guest) can never forge a line or drive
# the terminal.  The check is here and the escaping in logs, imported only for a name
# that needs it (`digest`'s start-up stays free of logging).

def shown(name: str) -> str:
    """A file name for a human line: logs.escape's notation (``\\n``, ``\\xNN``, ...)."""
    if name.isprintable() and "\\" not in name:
        return name
    from .logs import escape
    return escape(name)


def shown_text(text: str) -> str:
    """A message for a human line (it may quote names): unprintables escaped."""
    if text.isprintable():
        return text
    from .logs import one_line
    return one_line(text)
