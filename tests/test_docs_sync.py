"""The man pages and the bash completion are generated from the CLI's parsers
(tools/gendocs.py) and committed under share/; they must say what the parsers say."""

import os
import pathlib
import subprocess
import sys

import pytest

from verityfuse import __version__, cli, mountopts

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import gendocs  # noqa: E402


def plain(rel, text=None):
    """A page's text with roff's escaped hyphens as typed."""
    return (text if text is not None else (ROOT / rel).read_text()).replace("\\-", "-")


def test_committed_pages_match_the_parsers():
    stale = [rel for rel, text in gendocs.render().items()
             if not (ROOT / rel).exists() or (ROOT / rel).read_text() != text]
    assert not stale, f"stale: {stale}; run `python tools/gendocs.py` and commit share/"


def test_an_option_added_to_the_parser_makes_the_pages_stale(monkeypatch):
    """The check can fail: an option the pages do not have is noticed in all three."""
    real = cli.build_parser

    def with_new_option():
        parser = real()
        sub = next(a for a in parser._actions if a.choices and "mount" in a.choices)
        sub.choices["mount"].add_argument("--brand-new-option", metavar="FILE",
                                          help="not in any committed page")
        return parser

    monkeypatch.setattr(cli, "build_parser", with_new_option)
    pages = gendocs.render()
    for rel in (gendocs.MAN1, gendocs.BASH):
        assert "brand-new-option" in plain(rel, pages[rel]) and "brand-new-option" not in plain(rel)
    assert gendocs.main(["--check"]) == 1


def test_pages_document_every_command_and_the_exit_codes():
    man1 = plain(gendocs.MAN1)
    for name in cli.COMMANDS:
        assert f"verityfuse {name}" in man1 or name == "dump_metadata", name
    assert ".SH EXIT STATUS" in man1 and ".SH EXAMPLES" in man1
    assert "verityfuse verify\n0 every sealed file is intact" in man1
    man8 = plain(gendocs.MAN8)
    assert ".TH MOUNT.FUSE.VERITYFUSE \"8\"" in man8
    assert "32 the mount failed" in man8 and "-N NS" in man8
    for name in [*mountopts.VALUED, *mountopts.REPEATED, *mountopts.FLAGS]:  # every -o setting
        assert f"\n.B {name}" in man8, name
    assert ".B policy=enforce|require\nenforce: verify verity files" in man8


def test_an_o_option_added_to_mountopts_is_in_the_helper_page(monkeypatch):
    monkeypatch.setitem(mountopts.FLAGS, "brand_new_flag", "debug")
    assert "\n.B brand_new_flag\nlog every request" in plain(gendocs.MAN8, gendocs.render()[gendocs.MAN8])


def test_man_renders_the_pages_without_warnings():
    for rel in (gendocs.MAN1, gendocs.MAN8):
        r = subprocess.run(["man", "--warnings", "-l", "-E", "UTF-8", str(ROOT / rel)],
                           capture_output=True, text=True, env=dict(os.environ, MANWIDTH="80"))
        assert r.returncode == 0 and "EXIT STATUS" in r.stdout, r.stderr
        # "cannot adjust line" is typography (a long synopsis line), not a markup error
        assert not [w for w in r.stderr.splitlines() if "cannot adjust line" not in w], r.stderr


def test_bash_completion_completes_commands_options_and_paths(tmp_path):
    (tmp_path / "subdir").mkdir()
    script = f"""
source {ROOT / gendocs.BASH}
comp() {{ COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMPREPLY=(); _shtab_verityfuse; echo "${{COMPREPLY[*]}}"; }}
comp verityfuse umo
comp verityfuse mount --pol
cd {tmp_path} && comp verityfuse mount sub
"""
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["umount", "--policy", "subdir"]


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version_flag(flag):
    r = subprocess.run([sys.executable, "-m", "verityfuse", flag], capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"verityfuse {__version__}\n", "")


def test_setup_installs_every_generated_file_where_its_path_says():
    """setup.py's data_files install share/X/Y as <prefix>/share/X/Y: every file the
    generator writes, in the directory its path names."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    data = next(n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", None) == "DATA_FILES")
    installed = {f: d for d, files in ast.literal_eval(data) for f in files}
    assert installed == {rel: os.path.dirname(rel) for rel in gendocs.render()}
