"""verityfuse: a userspace fs-verity implementation over FUSE.

The pure core (``uapi``, ``errors``, ``merkle``, ``store``, ``verify``,
``reader``) imports neither pyfuse3 nor trio and is usable on its own.
"""

__version__ = "0.1.0"
