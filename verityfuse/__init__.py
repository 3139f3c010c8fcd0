"""verityfuse: a userspace fs-verity implementation over FUSE.

The library API (docs/api.md)::

    import verityfuse

    d = verityfuse.digest("file")              # Digest; str(d) == `fsverity digest` output
    verityfuse.seal("tree")                    # {relpath: Digest}, trees in tree/.verityfuse
    report = verityfuse.verify("tree")         # VerifyReport; report.ok
    with verityfuse.open_verified("tree/file") as f:   # every read verified, no FUSE
        data = f.read()

Importing the package is cheap: the names above are loaded from
``verityfuse.api`` on first use.  The pure core (``uapi``, ``errors``,
``merkle``, ``store``, ``verifier``, ``reader``) imports neither pyfuse3 nor trio
and is usable on its own; neither does the API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List

__version__ = "0.1.0"

__all__ = [
    "Digest",
    "FileResult",
    "IntegrityError",
    "NotSealedError",
    "VerifiedFile",
    "VerifyReport",
    "VerityError",
    "__version__",
    "digest",
    "open_verified",
    "seal",
    "verify",
]

if TYPE_CHECKING:
    from .api import Digest as Digest
    from .api import FileResult as FileResult
    from .api import NotSealedError as NotSealedError
    from .api import VerifiedFile as VerifiedFile
    from .api import VerifyReport as VerifyReport
    from .api import digest as digest
    from .api import open_verified as open_verified
    from .api import seal as seal
    from .api import verify as verify
    from .errors import IntegrityError as IntegrityError
    from .errors import VerityError as VerityError

_ERRORS = ("IntegrityError", "VerityError")


def __getattr__(name: str) -> Any:
    # PEP 562: the API module is imported on first use, so that `import verityfuse`
    # (which every command and the pytest plugin pay for) stays free.
    if name in __all__ and name != "__version__":
        import importlib

        module = importlib.import_module(".errors" if name in _ERRORS else ".api", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
