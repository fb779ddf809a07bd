"""`mcihn-live`: the live recognizer. Not built yet (a later issue); says so instead of failing obscurely."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("mcihn-live: the live recognizer is not implemented yet; use `mcihn train` / `mcihn eval` "
          "(see README.md)", file=sys.stderr)
    return 2
