"""What every command (scripts/, benchmarks/) shares: a parser made from its docstring, its one
line of error, and `--set KEY=VALUE`."""

from __future__ import annotations

import argparse
import sys


def parser(prog: str | None, doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the docstring's first paragraph and whose epilog (examples,
    exit codes) is the rest, kept as written."""
    first, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=first, epilog=rest,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def error(prog: str, message: str) -> int:
    """Bad input: one line naming the culprit, on stderr -> exit code 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def add_overrides(p: argparse.ArgumentParser, help: str) -> None:
    """--set KEY=VALUE, repeatable, into `overrides` (config.parse_overrides reads them)."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=help)
