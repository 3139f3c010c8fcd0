"""Build the optional native helpers; everything else is in pyproject.toml.

Both are optional: without a compiler or headers the install still succeeds.
- _hashblocks: batch hashing with libcrypto; otherwise hashlib (slower, same bytes).
- _fuseshim: FUSE_IOCTL for pyfuse3 (fs-verity ioctls, lsattr); otherwise the
  daemon logs one warning and every ioctl answers ENOTTY.
_fuseshim is a plain shared library loaded with ctypes, not a Python module.

The man pages and the bash completion are installed under the prefix (share/, as
committed; tools/gendocs.py writes them from the parsers).
"""

import shlex
import subprocess

from setuptools import Extension, setup


def pkg_config(*args):
    try:
        out = subprocess.run(["pkg-config", *args, "fuse3"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return shlex.split(out)


# Where pip puts them: <prefix>/share/man/man{1,8} (man(1) finds them next to the
# prefix's bin/ on PATH) and <prefix>/share/bash-completion/completions.
DATA_FILES = [
    ("share/man/man1", ["share/man/man1/verityfuse.1"]),
    ("share/man/man8", ["share/man/man8/mount.fuse.verityfuse.8"]),
    ("share/bash-completion/completions", ["share/bash-completion/completions/verityfuse"]),
]

setup(
    data_files=DATA_FILES,
    ext_modules=[
        # _hashblocks.c #includes the SHA-NI engine, the helper-thread pool,
        # read_verify (pread + hash + compare in one call), fast_read (reads
        # answered from the FUSE request, through _fuseshim), seal_small (a
        # seal worker's small files, a chunk a call) and hash_mapped (a tree built
        # from the page cache).
        Extension("verityfuse._hashblocks", ["verityfuse/_hashblocks.c"],
                  depends=["verityfuse/_sha256x2.c", "verityfuse/_hbpool.c",
                           "verityfuse/_readverify.c", "verityfuse/_leaftable.c",
                           "verityfuse/_replybufs.c", "verityfuse/_fastread.c",
                           "verityfuse/_fastopen.c", "verityfuse/_fastlookup.c",
                           "verityfuse/_indexentry.c",
                           "verityfuse/_sealsmall.c", "verityfuse/_sealchunk.c",
                           "verityfuse/_mapped.c", "verityfuse/_regular.h"],
                  libraries=["crypto"], extra_compile_args=["-O2", "-Wall", "-Wextra"],
                  optional=True),
        # The open path's system calls without ctypes (fsutil and identity fall back).
        Extension("verityfuse._sysopen", ["verityfuse/_sysopen.c"],
                  depends=["verityfuse/_regular.h"],
                  extra_compile_args=["-O2", "-Wall", "-Wextra"], optional=True),
        Extension("verityfuse._fuseshim", ["verityfuse/_fuseshim.c"],
                  depends=["verityfuse/_shimreplies.c"],
                  extra_compile_args=pkg_config("--cflags") or ["-I/usr/include/fuse3"],
                  # DT_NEEDED on libfuse3: RTLD_NEXT searches our own dependencies.
                  extra_link_args=(pkg_config("--libs") or ["-lfuse3"]) + ["-ldl"],
                  optional=True),
    ],
)
