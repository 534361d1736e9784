"""`python -m uhd_jax.yopo COMMAND ...`: the visual-savings tools. Commands:

    calibrate   measure which attention heads attend to visual tokens and save the head mask (.npz)
"""

from __future__ import annotations

import sys

COMMANDS = {"calibrate": "uhd_jax.yopo.calibrate"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"python -m uhd_jax.yopo: error: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})",
                  file=sys.stderr)
            return 2
        return 0 if argv else 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
