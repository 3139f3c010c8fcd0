"""Typed errors of the core, each carrying the errno the FUSE boundary returns.

The core raises these (or lets OSError through); only ``ops`` turns them into
errnos, in one place.
"""

import errno as _errno


# Errnos that mean "the daemon ran out of something", never "this does not match
# what was sealed": passed through as themselves, never turned into a Corruption.
RESOURCE_ERRNOS = frozenset({_errno.EMFILE, _errno.ENFILE, _errno.ENOMEM, _errno.ENOSPC,
                             _errno.EDQUOT, _errno.ENOBUFS})


class VerityError(Exception):
    """Base class; ``errno`` is what a FUSE request fails with."""

    errno = _errno.EIO


class InvalidParameters(VerityError, ValueError):
    """Bad hash algorithm, block size, salt ... (EINVAL, as the kernel)."""

    errno = _errno.EINVAL


class SaltTooLong(InvalidParameters):
    errno = _errno.EMSGSIZE


class FileTooLarge(InvalidParameters):
    """The tree would need more levels than the kernel allows."""

    errno = _errno.EFBIG


class InvalidDescriptor(VerityError):
    """A stored descriptor that fails the kernel's validation (EINVAL on open)."""

    errno = _errno.EINVAL


class Corruption(VerityError):
    """Base of everything that means "this does not match what was sealed" (EIO).

    ``path``: the file on the mount it is about, where the raiser knows it (the status
    groups failures by it); "" when not.  A raiser with a name found on demand (local
    mode's handles) passes the str it put in the message, so both say the same."""

    errno = _errno.EIO

    def __init__(self, message: object = "", path=""):
        super().__init__(message)
        self.path = str(path)  # a name found on demand is fixed now


class IntegrityError(Corruption):
    """Data or tree bytes do not hash to what the trusted digest says."""

    def __init__(self, path, offset, expected, actual, what="data block at offset"):
        name = str(path)  # a name found on demand: looked up once, while its file is open
        self.offset = offset
        self.expected = expected
        self.actual = actual
        self.what = what
        # Where in the file's data it failed; None for a tree block (the offset is the tree's).
        self.data_offset = offset if what.startswith("data block") else None
        super().__init__(
            f"{name}: {what} {offset}: expected hash {expected.hex()}, actual {actual.hex()}",
            name)

    def __reduce__(self):  # through a pipe (verify's worker processes): its own arguments
        return type(self), (self.path, self.offset, self.expected, self.actual, self.what)


class SizeMismatch(Corruption):
    """The backing file was truncated or extended after sealing."""


class StoreCorrupt(Corruption):
    """A store entry that is truncated, altered or malformed."""


class ContentMismatch(Corruption):
    """A file's bytes, taken whole, do not give what was sealed (a small file's do not
    give its manifest digest, and there is no tree to say which block differs):
    ``data_offset`` is 0 when its size is right and it has one block (that block
    differs), else None."""

    def __init__(self, message: object = "", path="", data_offset=None):
        super().__init__(message, path)
        self.data_offset = data_offset


class MissingObject(StoreCorrupt):
    """No tree object of a digest in the store: corruption where one is needed, by
    design for a manifest's file of one block (small_trees.small_tree does without)."""


class ManifestError(VerityError):
    """A manifest that is malformed, unauthenticated or of an unsupported version."""

    errno = _errno.EINVAL


class Errno(VerityError):
    """A request refused with a specific errno (ioctl and FUSE_FSVERITY argument checks)."""

    def __init__(self, err: int, message: str):
        self.errno = err
        super().__init__(message)


def replayed(e: BaseException) -> BaseException:
    """A copy of VerityError ``e`` for one more request to raise (an error handed to those that
    waited on the one that met it): each raise of one object would add its frames to that
    object's traceback, keeping every such request's frames alive; and a stall handed on
    is no new stall (``stall``: oci_http.TooSlow, ops_read.ThreadGates)."""
    cls = type(e)
    c = cls.__new__(cls, *e.args)  # not __init__: some take other arguments than args
    c.__dict__.update(e.__dict__)
    c.stall = False  # type: ignore[attr-defined]
    return c
