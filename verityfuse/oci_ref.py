"""OCI references: ``HOST[:PORT]/REPO[:TAG|@DIGEST]``, parsed and checked (pure, stdlib).

The grammar is the distribution spec's, with the digest limited to sha256 (the only
algorithm verityfuse pushes or pins); a reference that does not parse is refused
before any request is made.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

_REPO = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")


@dataclass(frozen=True)
class Ref:
    """``HOST[:PORT]/REPO[:TAG|@DIGEST]``."""

    host: str
    repo: str
    tag: Optional[str] = None
    digest: Optional[str] = None

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        return f"{self.host}/{self.repo}" + (f"@{self.digest}" if self.digest
                                             else f":{self.tag or 'latest'}")


def parse_ref(text: str) -> Ref:
    """Parse a reference (an ``oci://`` prefix is allowed); ValueError names what is wrong."""
    rest = text[len("oci://"):] if text.startswith("oci://") else text
    host, slash, path = rest.partition("/")
    if not slash or not _HOST.match(host) or not path:
        raise ValueError(f"{text!r} is not HOST[:PORT]/REPO[:TAG|@DIGEST]")
    digest = tag = None
    if "@" in path:
        path, digest = path.split("@", 1)
        if not _DIGEST.match(digest):
            raise ValueError(f"{text!r}: {digest!r} is not sha256:<64 hex digits>")
    else:
        last = path.rsplit("/", 1)[-1]
        if ":" in last:
            path, tag = path.rsplit(":", 1)
            if not _TAG.match(tag):
                raise ValueError(f"{text!r}: {tag!r} is not a valid tag")
    if not _REPO.match(path):
        raise ValueError(f"{text!r}: {path!r} is not a repository name (lower case, digits, "
                         f"separators . _ -, components joined by /)")
    return Ref(host, path, tag, digest)
