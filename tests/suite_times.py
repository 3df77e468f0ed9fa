"""Seconds of a test run per marker: ``python tests/suite_times.py report.xml`` after ``pytest --junitxml report.xml``.

Each test case's time (set-up, call and tear-down, as pytest's junit writer reports it) counts once under every
registered marker it carries (``slow``, ``multiprocess``, ``benchmark``: see pyproject.toml) and under
``unmarked`` when it carries none; tests/conftest.py records the markers as each case's ``markers`` property.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def case_markers(case: ET.Element) -> list[str] | None:
    """The markers a junit test case recorded, or None when the run did not record them."""
    for prop in case.iter("property"):
        if prop.get("name") == "markers":
            return [m for m in (prop.get("value") or "").split(",") if m]
    return None


def seconds_per_marker(junit: Path) -> dict[str, tuple[int, float]]:
    """(tests, seconds) per marker, then ``unmarked`` and ``all``, from a pytest ``--junitxml`` file."""
    totals: dict[str, list] = defaultdict(lambda: [0, 0.0])
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    for case in cases:
        markers = case_markers(case)
        if markers is None:
            raise ValueError(
                f"{junit}: test case {case.get('classname')}::{case.get('name')} has no 'markers' property; "
                "run pytest with the tests/ directory collected, so that tests/conftest.py records them."
            )
        seconds = float(case.get("time", 0))
        for name in markers or ["unmarked"]:
            totals[name][0] += 1
            totals[name][1] += seconds
        totals["all"][0] += 1
        totals["all"][1] += seconds
    ordered = sorted(totals, key=lambda name: (name in ("unmarked", "all"), name == "all", name))
    return {name: (totals[name][0], totals[name][1]) for name in ordered}


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python tests/suite_times.py JUNIT_XML   (from pytest --junitxml JUNIT_XML)")
    rows = seconds_per_marker(Path(argv[0]))
    print("| marker | tests | seconds |\n|---|---:|---:|")
    for name, (count, seconds) in rows.items():
        print(f"| {name} | {count} | {seconds:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
