"""The declared view interface (verityfuse.view.View), checked without a mount.

mypy checks the signatures (daemon.make_view returns each view as a View); these tests check
what mypy cannot: that every member exists on each concrete view class, and that the
read-only base answers every change with EROFS.
"""

import errno
import inspect

import pytest

from verityfuse.view import ReadOnlyView, View
from verityfuse.view_local import LocalView
from verityfuse.view_manifest import ManifestView
from verityfuse.view_oci import OciView

MEMBERS = sorted(n for n in dir(View) if not n.startswith("_")) + sorted(View.__annotations__)
MUTATING = ["setattr", "mknod", "mkdir", "symlink", "unlink", "rmdir", "rename", "link", "create",
            "setxattr", "removexattr", "set_flags", "enable_check", "enable_sync", "enable_build",
            "enable_commit", "enable_finish"]


def test_the_protocol_lists_what_the_adapter_calls():
    assert "lookup" in MEMBERS and "enable_commit" in MEMBERS and "cache" in MEMBERS
    assert set(MUTATING) <= set(MEMBERS)


@pytest.mark.parametrize("cls", [LocalView, ManifestView, OciView])
def test_every_view_has_every_member(cls):
    # Attributes set in __init__ (cache) are not on the class: look for them in its source.
    source = "".join(inspect.getsource(c) for c in cls.__mro__ if c.__module__.startswith("verityfuse"))
    missing = [m for m in MEMBERS if not hasattr(cls, m) and f"self.{m} =" not in source]
    assert missing == []


@pytest.mark.parametrize("cls", [ManifestView, OciView])
def test_read_only_views_inherit_the_refusals(cls):
    assert issubclass(cls, ReadOnlyView)
    for name in MUTATING:
        assert getattr(cls, name) is getattr(ReadOnlyView, name), name


@pytest.mark.parametrize("name", MUTATING)
def test_every_change_is_erofs(name):
    method = getattr(ReadOnlyView(), name)
    args = [None] * (len(inspect.signature(method).parameters))
    with pytest.raises(OSError) as e:
        method(*args)
    assert e.value.errno == errno.EROFS
    assert e.value.strerror == "read-only: the manifest defines this tree"
