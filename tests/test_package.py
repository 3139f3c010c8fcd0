"""The sdist is the whole source tree, installs with pip into a fresh virtualenv, and its
own tests pass from the unpacked sdist against the installed package; mypy is clean on
the typed modules."""

import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

import verityfuse
from verityfuse import merkle

ROOT = pathlib.Path(__file__).resolve().parent.parent
NAME = f"verityfuse-{verityfuse.__version__}"
# Only the environment a user's shell would have: no PYTHONPATH, no pytest internals.
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYTEST", "VIRTUAL_ENV"))}
# What a user needs from the sdist beyond the package itself.
MUST = [
    "LICENSE", "README.md", "Makefile", "MANIFEST.in", "pyproject.toml", "setup.py", "PKG-INFO",
    "docs/api.md", "tests/conftest.py", "tests/test_merkle.py", "tests/test_api.py",
    "examples/demo.sh", "examples/test_with_fixture.py", "protocol/vectors/fuse_fsverity.json",
    "protocol/fuse_fsverity.h", "protocol/store-format.md", "e2e/run.py", "bench/bench.py",
    "verityfuse/py.typed", "verityfuse/_hashblocks.c", "verityfuse/_fuseshim.c",
    "verityfuse/_sysopen.c",
]
# Run from the unpacked sdist against the installed package: no FUSE needed, a few seconds.
SDIST_TESTS = ["tests/test_merkle.py", "tests/test_api.py"]


def run(cmd, **kw):
    kw.setdefault("env", ENV)
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """(the .tar.gz, the unpacked tree), built as `python -m build --sdist` does (PEP 517).

    Built from a copy of the checkout as it is (built modules and caches included, which
    the sdist must leave out), not in it: the build writes its egg-info and staging
    directory where it runs, which would leave files in the checkout and clash with the
    same fixture in another pytest worker (`-n 2`)."""
    src = tmp_path_factory.mktemp("checkout") / "tree"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".mypy_cache", ".pytest_cache", "*.egg-info", "build", "dist",
        f"{NAME}"))
    out = tmp_path_factory.mktemp("sdist")
    r = run([sys.executable, "-c", "import sys, setuptools.build_meta as b; "
             "print(b.build_sdist(sys.argv[1]))", out], cwd=src)
    tar = out / r.stdout.strip().splitlines()[-1]
    assert tar.name == f"{NAME}.tar.gz"
    with tarfile.open(tar) as t:
        if hasattr(tarfile, "data_filter"):
            t.extractall(out, filter="data")
        else:  # pragma: no cover - Python before 3.11.4
            t.extractall(out)
    return tar, out / NAME


def files_under(root):
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_sdist_is_the_whole_source_tree(sdist):
    tar, tree = sdist
    have = files_under(tree)
    assert not [f for f in MUST if f not in have]
    if (ROOT / ".git").exists() and shutil.which("git"):
        tracked = run(["git", "ls-files"], cwd=ROOT).stdout.split()
        missing = [f for f in tracked if f not in have and f != ".gitignore"
                   and (ROOT / f).exists()]
        assert not missing, f"tracked files missing from the sdist: {missing}"
    junk = [f for f in have if f.endswith((".so", ".pyc", ".o")) or "__pycache__" in f
            or f.startswith((".venv/", "build/", "dist/"))]
    assert not junk
    with tarfile.open(tar) as t:  # scripts stay executable
        assert t.getmember(f"{NAME}/examples/demo.sh").mode & 0o111


def test_license_matches_the_metadata(sdist):
    _, tree = sdist
    assert (tree / "LICENSE").read_text().startswith("MIT License\n")
    pkg_info = (tree / "PKG-INFO").read_text()
    assert "License: MIT\n" in pkg_info
    assert "Classifier: License :: OSI Approved :: MIT License" in pkg_info
    assert "Classifier: Typing :: Typed" in pkg_info


@pytest.mark.slow
def test_sdist_installs_with_pip_and_its_tests_pass(sdist, tmp_path):
    tar, tree = sdist
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])  # ensurepip costs seconds
    py = venv / "bin" / "python"
    # A plain virtualenv (no system site-packages): pip builds the sdist in an isolated
    # build environment and fetches the dependencies, as `pip install verityfuse` does.
    run([sys.executable, "-m", "pip", "--python", py, "install", "-q",
         "--disable-pip-version-check", tar, "pytest"])
    where = run([py, "-P", "-c",
                 "import importlib.metadata as md, pathlib, verityfuse, verityfuse.merkle as m\n"
                 "d = pathlib.Path(verityfuse.__file__).parent\n"
                 "print(d); print(m.NATIVE); print(sorted(p.name for p in d.iterdir()))\n"
                 "print([e.value for e in md.entry_points(group='pytest11')])\n"], cwd=tmp_path)
    pkg, native, names, plugins = where.stdout.splitlines()
    assert pkg.startswith(str(venv))
    assert "py.typed" in names and "'verityfuse.pytest_plugin'" in plugins
    assert not [n for n in eval(names) if n.endswith(".c")]  # sources stay in the sdist
    if merkle.NATIVE:  # this machine builds the native hasher: so must the sdist
        assert native == "True"
        assert any(n.startswith("_hashblocks") and n.endswith(".so") for n in eval(names))
    r = run([venv / "bin" / "verityfuse", "digest", tree / "LICENSE"])
    assert r.stdout == f"{verityfuse.digest(tree / 'LICENSE')} {tree / 'LICENSE'}\n"
    # The sdist's own tests, from the unpacked tree, importing the installed package
    # (-P: the tree's verityfuse/ is not on sys.path).
    r = run([py, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", *SDIST_TESTS], cwd=tree)
    assert " passed" in r.stdout and "failed" not in r.stdout


def test_mypy_is_clean_on_the_typed_modules():
    pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[test]')")
    typed = ["verityfuse/api.py", "verityfuse/__init__.py", "verityfuse/__main__.py",
             "verityfuse/testing.py", "verityfuse/pytest_plugin.py"]
    r = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir=/dev/null", *typed], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
