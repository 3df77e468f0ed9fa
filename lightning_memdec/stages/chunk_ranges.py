"""The progress of a chunked job (:mod:`~stages.chunked_predict`), recorded by item range: one marker
``<start>-<stop>`` in ``<work>/progress`` per finished chunk of items [start, stop).

A chunk's content depends on its range alone, so a resumed run may cut the work left (the gaps of [0, N) no finished
range covers) into chunks of another size (the size a CUDA OOM makes a user lower) and keep every finished chunk.
An unfinished run of an earlier version marked chunk numbers of its recorded size: :func:`convert_number_markers`
turns them into ranges.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from lightning_memdec.io.artifact_dirs import recorded_settings

log = logging.getLogger(__name__)
PROGRESS = "progress"
DIGITS = 12  # a range bound's zero-padded digits: names sort in item order up to 10^12 items
RANGE_NAME = re.compile(r"(\d+)-(\d+)")
Span = tuple[int, int]


def progress_dir(work: Path) -> Path:
    return Path(work) / PROGRESS


def range_name(start: int, stop: int) -> str:
    """The marker (and chunk file stem) of items [start, stop)."""
    return f"{start:0{DIGITS}d}-{stop:0{DIGITS}d}"


def parse_range(name: str) -> Span | None:
    """(start, stop) of a range marker's name; None for any other name (a number marker, a rank's check file)."""
    match = RANGE_NAME.fullmatch(name)
    if match is None or int(match[1]) >= int(match[2]):
        return None
    return int(match[1]), int(match[2])


def marker_names(work: Path) -> list[str]:
    directory = progress_dir(work)
    return os.listdir(directory) if directory.is_dir() else []


def done_ranges(work: Path) -> list[Span]:
    """The finished chunks' ranges, in item order."""
    return sorted(span for span in map(parse_range, marker_names(work)) if span is not None)


def mark_done(work: Path, start: int, stop: int) -> None:
    directory = progress_dir(work)
    directory.mkdir(exist_ok=True)
    (directory / range_name(start, stop)).touch()


def unmark(work: Path, spans) -> None:
    """Forget ``spans``' markers, so a resumed run computes them again (their files were found damaged)."""
    for start, stop in spans:
        (progress_dir(work) / range_name(start, stop)).unlink(missing_ok=True)


def drop_progress(work: Path) -> None:
    """Remove the progress markers: the last step before the artefact is published."""
    shutil.rmtree(progress_dir(work), ignore_errors=True)


def gaps(done: list[Span], total: int) -> list[Span]:
    """The parts of [0, total) that no range of ``done`` covers, in order."""
    found, covered = [], 0
    for start, stop in sorted(done):
        if start > covered:
            found.append((covered, min(start, total)))
        covered = max(covered, stop)
        if covered >= total:
            break
    if covered < total:
        found.append((covered, total))
    return [(a, b) for a, b in found if a < b]


def pending_chunks(total: int, chunk_size: int, done: list[Span]) -> list[Span]:
    """The work left: each gap cut into chunks of ``chunk_size`` from its start. With the size of the finished
    chunks (or none finished) these are the chunks an uninterrupted run computes, so the bytes are the same."""
    return [(lo, min(lo + chunk_size, b)) for a, b in gaps(done, total) for lo in range(a, b, chunk_size)]


def items_done(done: list[Span], total: int) -> int:
    return total - sum(b - a for a, b in gaps(done, total))


def tiling_problem(done: list[Span], total: int) -> str | None:
    """Why ``done`` (in order) does not tile [0, total) exactly, naming the first gap or overlap; None if it does."""
    end = 0
    for start, stop in done:
        if start != end:
            what = "a gap" if start > end else "an overlap"
            return f"{what} at item {min(start, end):,}: a chunk ends at {end:,}, the next runs {start:,}-{stop:,}"
        end = stop
    return None if end == total else f"the chunks end at item {end:,}, not at the {total:,} items"


def recorded_setting(work: Path, name: str):
    """A setting of the run recorded in ``work`` (None where not recorded)."""
    recorded = recorded_settings(work)
    return recorded.get(name) if isinstance(recorded, dict) else None


def number_markers(work: Path) -> list[int]:
    """The chunk numbers an earlier version marked done (``<number>``, zero-padded)."""
    return sorted(int(name) for name in marker_names(work) if name.isdigit())


def convert_number_markers(
    work: Path, chunk_size: int | None, total: int, files: Path | None = None, suffixes: tuple[str, ...] = ()
) -> list[Span]:
    """An unfinished run of an earlier version: its marker of chunk ``c`` (of its recorded ``chunk_size``) becomes
    that of items [c·size, min((c+1)·size, total)). Its files in ``files`` (``<c, 9 digits><suffix>``) are renamed
    first to their range's names (``<start>-<stop><suffix>``; one already moved is skipped); the number marker goes
    last, so a kill at any step leaves it, and the next resume finishes that chunk's conversion: nothing is lost. A
    number past the end, or without a recorded size, cannot be placed: its marker goes (its chunk is computed again).
    Returns the ranges converted."""
    converted = []
    for number in number_markers(work):
        marker = progress_dir(work) / f"{number:09d}"
        placed = isinstance(chunk_size, int) and chunk_size > 0
        start, stop = (number * chunk_size, min((number + 1) * chunk_size, total)) if placed else (0, 0)
        if start >= stop:
            log.warning("%s: chunk %d of an earlier version cannot be placed; it is computed again.", work, number)
        else:
            for suffix in suffixes:
                old = Path(files) / f"{number:09d}{suffix}"
                if old.exists():
                    os.replace(old, Path(files) / f"{range_name(start, stop)}{suffix}")
            mark_done(work, start, stop)
            converted.append((start, stop))
        marker.unlink(missing_ok=True)
    if converted:
        log.info("%s: %d chunks of an earlier version recorded by their ranges", work, len(converted))
    return converted
