"""Build the optional native helper; everything else is in pyproject.toml.

_hashblocks is optional: without a compiler or OpenSSL headers the install
still succeeds and verityfuse hashes with hashlib (slower, same bytes).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("verityfuse._hashblocks", ["verityfuse/_hashblocks.c"],
                  libraries=["crypto"], extra_compile_args=["-O2"], optional=True),
    ],
)
