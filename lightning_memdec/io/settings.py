"""Typed argument groups of io: where ``memdec tokenize`` reads dataset rows from.

A frozen dataclass: its fields' docstrings are the help of ``--dataset.name``, ``--dataset.files``, …, so a setting
and its text exist once.
"""

from __future__ import annotations

from dataclasses import dataclass


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
