"""Every number in the README's tables appears in the results file that the measuring command wrote.

Each table in README.md is preceded by a ``<!-- figures: PATH -->`` line naming that file (a report or benchmark
output committed verbatim, with its command); a table copied by hand from a run that is not in the repository, or
edited after the run, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!--\s*figures:\s*(\S+)\s*-->")
NUMBER = re.compile(r"[−+-]?\d[\d,]*(?:\.\d+)?")


def tables(markdown: str) -> list[tuple[str | None, list[str]]]:
    """(the figures file named before the table, the table's lines) for each markdown table."""
    found, source, rows = [], None, []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            rows.append(line)
            continue
        if rows:
            found.append((source, rows))
            rows, source = [], None
        marker = MARKER.search(line)
        if marker:
            source = marker.group(1)
        elif line.startswith("#"):
            source = None
    return found


def numbers(rows: list[str]) -> list[str]:
    """The numbers written in a table's cells (the separator row has none)."""
    return [m.group(0).lstrip("+") for row in rows for m in NUMBER.finditer(row)]


def missing_numbers(rows: list[str], text: str) -> list[str]:
    """Numbers of the table that do not occur in `text` as a whole number (so 12.3 does not match 112.34)."""
    absent = []
    for number in numbers(rows):
        pattern = r"(?<![\d.])" + re.escape(number) + r"(?![\d])(?!\.\d)"
        if not re.search(pattern, text):
            absent.append(number)
    return absent


def test_parser_finds_marked_tables_and_checks_whole_numbers():
    markdown = "intro\n<!-- figures: a.txt -->\n\n| x | y |\n|---|---:|\n| m | 12.30 |\n\n## next\n| z |\n"
    found = tables(markdown)
    assert [source for source, _ in found] == ["a.txt", None]
    assert numbers(found[0][1]) == ["12.30"]
    assert missing_numbers(found[0][1], "ppl 12.30 ok") == []
    assert missing_numbers(found[0][1], "ppl 112.30 and 12.305") == ["12.30"]
    assert missing_numbers(["| a | −68.4 % |"], "vs base −68.4 %") == []


README_TABLES = tables((ROOT / "README.md").read_text())


@pytest.mark.parametrize("source,rows", README_TABLES, ids=[f"table{i}" for i in range(len(README_TABLES))])
def test_readme_table_figures_come_from_a_results_file(source, rows):
    assert source, f"README table starting {rows[0]!r} names no results file: add <!-- figures: PATH --> before it"
    path = ROOT / source
    assert path.is_file(), f"README names {source} as a table's results file, but it is not in the repository"
    absent = missing_numbers(rows, path.read_text())
    assert not absent, f"README table numbers not found in {source}: {absent}"
