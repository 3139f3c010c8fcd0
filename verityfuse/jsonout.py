"""The one way the command line prints JSON (protocol/cli-json.md): one object per
line, keys sorted, each carrying the schema version its reader can check."""

from __future__ import annotations

import json

# Bumped only when a key changes meaning or is removed; adding keys keeps it.
SCHEMA = 1


def emit(obj: dict):
    print(json.dumps(dict(obj, schema=SCHEMA), sort_keys=True), flush=True)
