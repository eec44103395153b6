"""`python -m clipsearch <command> [flags]`: any command of clipsearch/cli/, as ./clipsearch runs it."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

from clipsearch.cli.common import run_command

# Modules of cli/ that hold shared flags and helpers, not commands.
HELPERS = {"__init__", "common", "train_args"}


def commands() -> list[str]:
    return sorted(path.stem for path in (Path(__file__).parent / "cli").glob("*.py") if path.stem not in HELPERS)


def main(argv: list[str]) -> None:
    known = commands()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m clipsearch <command> [flags]; <command> --help for its flags\n"
              f"commands: {' '.join(known)}")
        sys.exit(0 if argv else 2)
    command = argv[0].replace("-", "_")
    if command not in known:
        print(f"error: unknown command {argv[0]!r}; one of: {' '.join(known)}", file=sys.stderr)
        sys.exit(2)
    run_command(importlib.import_module(f"clipsearch.cli.{command}").main, argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
