#!/usr/bin/env python3
"""Generate the man pages and the bash completion from the CLI's own parsers.

    python tools/gendocs.py          # rewrite share/ from the parsers
    python tools/gendocs.py --check  # exit 1 (and name the files) if share/ is stale

The pages are committed (share/ mirrors where `pip install` puts them under the
prefix) and tests/test_docs_sync.py fails when a parser changes without them, so a
build needs neither tool nor an import of the package.  argparse-manpage writes the
pages and shtab the completion; both are in the [test] extra.
"""

from __future__ import annotations

import argparse
import os
import sys

import shtab
from argparse_manpage.manpage import Manpage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from verityfuse import __version__, cli, cli_mount, mountopts  # noqa: E402

MAN1 = "share/man/man1/verityfuse.1"
MAN8 = "share/man/man8/mount.fuse.verityfuse.8"
BASH = "share/bash-completion/completions/verityfuse"

# Completion by what an argument names (its metavar): paths complete as files or
# directories, everything else (algorithms, sizes, digests) completes as nothing.
DIRECTORY_METAVARS = {"SOURCE", "MOUNTPOINT", "DIR"}
FILE_METAVARS = {"FILE", "SIGFILE", "M", "OUT"}

EXAMPLES_1 = r"""
.nf
Seal a tree, sign its manifest and check it offline:
.RS
verityfuse keygen key.pem key.pub
verityfuse seal /srv/app --manifest app.manifest --sign-key key.pem
verityfuse verify /srv/app
.RE
Mount it; every read is checked against the tree:
.RS
verityfuse mount /srv/app /mnt/app --manifest app.manifest --trust-key key.pub
verityfuse status /mnt/app
verityfuse umount /mnt/app
.RE
Compute a digest as fsverity(1) does:
.RS
verityfuse digest --hash-alg sha256 --block-size 4096 file
.RE
.fi
"""

EXIT_1 = r"""
Every command: 0 success, 1 an error (said on standard error as ERROR: ...), 2 a usage
error (bad arguments or options); 130 interrupted by Ctrl-C.  mount.fuse.verityfuse(8) follows mount(8) instead, and so
does verityfuse SOURCE MOUNTPOINT -o OPTIONS (the form mount.fuse3 runs): 1 incorrect
invocation, 32 the mount failed.  Where a command says more:
"""

SEE_ALSO_1 = r"""
.BR mount.fuse.verityfuse (8),
.BR fsverity (1),
.BR mount (8),
.BR fusermount3 (1)
"""

EXAMPLES_8 = r"""
.nf
mount -t fuse.verityfuse -o ro,noatime,store=/srv/app.store /srv/app /mnt/app
.fi
An /etc/fstab line:
.nf
/srv/app  /mnt/app  fuse.verityfuse  ro,manifest=/etc/app.manifest,trust_key=/etc/app.pub  0 0
.fi
Link the helper where mount(8) finds it (once, as root):
.nf
verityfuse install-helper
.fi
"""

EXIT_8 = r"""
As mount(8) documents for helpers: 0 mounted, 1 incorrect invocation (a bad option or
argument), 32 the mount failed (the reason is said on standard error).
"""

SEE_ALSO_8 = r"""
.BR verityfuse (1),
.BR mount (8),
.BR fstab (5),
.BR fuse (8)
"""


def _walk(parser: argparse.ArgumentParser):
    yield parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for p in dict.fromkeys(a.choices.values()):  # an alias is the same parser
                yield from _walk(p)


def _mark_paths(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for p in _walk(parser):
        for a in p._actions:
            mv = a.metavar if isinstance(a.metavar, str) else None
            if mv in DIRECTORY_METAVARS:
                a.complete = shtab.DIRECTORY
            elif mv in FILE_METAVARS or (mv or "").endswith(".pem"):
                a.complete = shtab.FILE
    return parser


def _exit_status(parser: argparse.ArgumentParser) -> str:
    """The common text, then each command's own (its --help epilog), so a command
    added to the parser is listed here without anyone remembering to."""
    out = [EXIT_1.strip()]
    for p in list(_walk(parser))[1:]:
        if p.epilog and p.epilog != cli.EXIT_STATUS_TEXT:
            out += [".TP", f".B {p.prog}", p.epilog.removeprefix("exit status: ")]
    return "\n".join(out)


def _roff(text: str) -> str:
    """Text for a roff line: backslashes and hyphens escaped, no leading control dot."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def _mount_options(main: argparse.ArgumentParser) -> str:
    """verityfuse's -o options (mountopts' tables), each with the help of the
    `verityfuse mount` flag that sets the same setting."""
    mount = next(p for p in _walk(main) if p.prog.endswith(" mount"))
    by_dest = {a.dest: a for a in mount._actions}
    kinds = [(n, attr, "=") for n, (attr, _) in mountopts.VALUED.items()]
    kinds += [(n, attr, "+") for n, attr in mountopts.REPEATED.items()]
    kinds += [(n, attr, "") for n, attr in mountopts.FLAGS.items()]
    out = ["Besides the kernel's and libfuse's (ro, noatime, allow_other, ...), -o takes every "
           "setting of verityfuse mount (see verityfuse(1)):"]
    for name, attr, kind in kinds:
        a = by_dest.get(attr) or by_dest.get(name)  # (cache= sets cache_dir, as --cache does)
        if a is not None and a.choices:
            metavar = "|".join(a.choices)
        else:
            metavar = a.metavar if a is not None and isinstance(a.metavar, str) else "VALUE"
        what = a.help if a is not None and a.help not in (None, argparse.SUPPRESS) else ""
        if kind == "+" and "repeatable" not in what:
            what = f"{what} (repeatable)".strip()
        out += [".TP", f".B {name}" + (f"={_roff(metavar)}" if kind else ""), _roff(what)]
    return "\n".join(out)


def _page(parser, section: int, description: str, sections) -> str:
    parser.epilog = None  # said in EXIT STATUS
    m = Manpage(parser, {"project_name": "verityfuse", "version": __version__,
                         "manual_title": "verityfuse manual", "manual_section": section,
                         "description": description})
    m.date = ""  # reproducible: the version says which release the page describes
    for heading, text in sections:
        m.add_section(heading, "=", text.strip())
    return str(m)


def render() -> dict:
    """{path under ROOT: text} for everything generated."""
    main = cli.build_parser()
    helper = cli_mount.helper_parser()
    return {
        MAN1: _page(main, 1, "verified views of directories with fs-verity Merkle trees",
                    [("exit status", _exit_status(main)), ("examples", EXAMPLES_1), ("see also", SEE_ALSO_1)]),
        MAN8: _page(helper, 8, "mount a verityfuse view for mount(8) and fstab",
                    [("mount options", _mount_options(main)), ("exit status", EXIT_8), ("examples", EXAMPLES_8), ("see also", SEE_ALSO_8)]),
        BASH: shtab.complete(_mark_paths(cli.build_parser()), shell="bash"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only say which files are stale")
    args = ap.parse_args(argv)
    stale = []
    for rel, text in render().items():
        path = os.path.join(ROOT, rel)
        try:
            with open(path) as f:
                same = f.read() == text
        except FileNotFoundError:
            same = False
        if same:
            continue
        stale.append(rel)
        if not args.check:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
    if stale:
        print(("stale: " if args.check else "wrote: ") + " ".join(stale), file=sys.stderr)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
