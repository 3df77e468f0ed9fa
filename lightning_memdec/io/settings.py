"""Typed argument groups of io: where ``memdec tokenize`` reads dataset rows from; and the one positive-number check
every argument group's counts and sizes go through.

A frozen dataclass: its fields' docstrings are the help of ``--dataset.name``, ``--dataset.files``, …, so a setting
and its text exist once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real


def check_positive(flag: str, value, whole: bool = False, omitted: str | None = None) -> None:
    """A count or size must be > 0: a whole number (not a bool) when ``whole``, else a finite number. ``omitted`` says
    what leaving the setting out (None) gives, for settings that may be left out; the message names ``flag``."""
    if value is None and omitted is not None:
        return
    number = not isinstance(value, bool) and isinstance(value, Integral if whole else Real)
    if not (number and math.isfinite(value) and value > 0):
        kind = "a whole number" if whole else "a finite number"
        hint = f", or omitted for {omitted}" if omitted is not None else ""
        raise ValueError(f"{flag} must be positive ({kind}{hint}), got {value!r}.")


@dataclass(frozen=True)
class DatasetRows:
    """Dataset rows as the text to tokenize (instead of text files): a Hugging Face hub dataset or local files."""

    name: str | None = None
    """a Hugging Face hub dataset (e.g. wikitext), read with streaming=True"""
    config: str | None = None
    """the hub dataset's configuration (e.g. wikitext-103-raw-v1)"""
    split: str = "train"
    """the hub dataset's split"""
    files: list[str] | None = None
    """local dataset files instead of a hub dataset (.parquet, .json, .jsonl, .arrow, .csv, .txt: one row per
    line), read with streaming=True"""
    text_field: str = "text"
    """the column holding the text"""
    document_start: str | None = None
    """a regular expression; a document runs from a row matching it to the next one, rows joined by newlines
    (WikiText articles: '^ = [^=].* = $'). Without it, each non-blank row is a document"""
