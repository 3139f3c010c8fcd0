"""``python -m verityfuse``: the ``verityfuse`` command."""

import sys


def _main() -> int:
    from .cli import main  # here: the package import stays free for `import verityfuse`

    return main()


if __name__ == "__main__":
    sys.exit(_main())
