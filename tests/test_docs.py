"""The README renders as written: its headings and table rows begin their own lines (a rewrap once ran three
sections' headings and tables into one paragraph, and nothing noticed)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _prose_lines():
    fence = False
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("```"):
            fence = not fence
        elif not fence:
            yield number, line


def test_headings_and_tables_begin_their_lines():
    misplaced = [
        (number, line)
        for number, line in _prose_lines()
        if re.search(r"\S\s+#{2,4} [A-Z]", line) or (not line.startswith("|") and re.search(r"\|-{3}\|", line))
    ]
    assert misplaced == []


def test_tables_are_separated_from_prose():
    lines = dict(_prose_lines())
    for number, line in lines.items():
        if line.startswith("|---"):
            header, before = lines.get(number - 1, ""), lines.get(number - 2, "")
            assert header.startswith("|") and before == "", (number, header, before)
