"""Write a table that a tool measured into README.md, between the two markers that hold it, or check it there."""

import sys
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def write_or_check(table, start, end, tool, check):
    """Put table between the markers start and end in README.md; with check, leave README.md as it is and return 1
    if its table differs (0 if not)."""
    readme = README.read_text(encoding="utf-8")
    before, rest = readme.split(start, 1)
    updated = before + f"{start}\n{table}\n{end}" + rest.split(end, 1)[1]
    if check:
        if updated != readme:
            print(f"README.md's table is out of date: run python tools/{tool}", file=sys.stderr)
        return int(updated != readme)
    README.write_text(updated, encoding="utf-8")
    return 0


def wrap(text):
    """A paragraph wrapped at README.md's width, never inside a name; Markdown joins the lines again."""
    return textwrap.fill(text, 115, break_long_words=False, break_on_hyphens=False)
