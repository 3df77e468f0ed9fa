"""tests/suite_times.py totals a junit report per marker: each case once per marker, unmarked ones apart."""

import pytest
from suite_times import main, seconds_per_marker

CASES = [("a", "slow,multiprocess", 2.5), ("b", "", 0.25), ("c", "benchmark,slow", 4.0), ("d", "", 1.0)]


def junit(path, cases, with_properties=True):
    rows = []
    for name, markers, seconds in cases:
        props = f'<properties><property name="markers" value="{markers}" /></properties>' if with_properties else ""
        rows.append(f'<testcase classname="tests.test_x" name="{name}" time="{seconds}">{props}</testcase>')
    path.write_text(f'<testsuites><testsuite name="pytest">{"".join(rows)}</testsuite></testsuites>')
    return path


def test_seconds_per_marker_and_unmarked(tmp_path, capsys):
    report = junit(tmp_path / "r.xml", CASES)
    assert seconds_per_marker(report) == {
        "benchmark": (1, 4.0),
        "multiprocess": (1, 2.5),
        "slow": (2, 6.5),
        "unmarked": (2, 1.25),
        "all": (4, 7.75),
    }
    main([str(report)])
    assert capsys.readouterr().out.splitlines()[-1] == "| all | 4 | 7.8 |"


def test_a_report_without_markers_is_refused(tmp_path):
    with pytest.raises(ValueError, match="test_x::a has no 'markers' property; run pytest with the tests/ dir"):
        seconds_per_marker(junit(tmp_path / "r.xml", CASES, with_properties=False))
