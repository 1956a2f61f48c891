"""The README and benchmarks/RESULTS.md render as written: their headings and table rows begin their own lines (a
rewrap once ran three README sections' headings and tables into one paragraph, and nothing noticed)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = pytest.mark.parametrize("doc", ["README.md", "benchmarks/RESULTS.md"])


def _prose_lines(doc):
    fence = False
    for number, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
        if line.startswith("```"):
            fence = not fence
        elif not fence:
            yield number, line


@DOCS
def test_headings_and_tables_begin_their_lines(doc):
    misplaced = [
        (number, line)
        for number, line in _prose_lines(doc)
        if re.search(r"\S\s+#{2,4} [A-Z]", line) or (not line.startswith("|") and re.search(r"\|-{3}\|", line))
    ]
    assert misplaced == []


@DOCS
def test_tables_are_separated_from_prose(doc):
    lines = dict(_prose_lines(doc))
    for number, line in lines.items():
        if line.startswith("|---"):
            header, before = lines.get(number - 1, ""), lines.get(number - 2, "")
            assert header.startswith("|") and before == "", (number, header, before)
