"""benchmarks/suite_timeline.py on a made-up timeline: the seconds per file it writes (the order
of the units of work, tests/conftest.py) and when each worker ran out of work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import REPO, load_benchmark


def test_seconds_per_file_and_the_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    t0 = 1_000_000.0
    rows = [  # gw0: a.py 0-30 (two tests), c.py 30-35; gw1: b.py 0-50 (setup included)
        ("gw0", "tests/test_a.py::test_one", 0, 10),
        ("gw0", "tests/test_a.py::test_two[x]", 10, 30),
        ("gw0", "tests/test_c.py::test_one", 30, 35),
        ("gw1", "tests/test_b.py::test_one", 0, 50),
    ]
    timeline = tmp_path / "timeline.jsonl"
    timeline.write_text("".join(
        json.dumps({"worker": w, "test": t, "start": t0 + a, "end": t0 + b}) + "\n"
        for w, t, a, b in rows
    ))  # fmt: skip
    out = tmp_path / "unit_seconds.json"
    argv = ["suite_timeline.py", str(timeline), "--write", str(out), "--label", "made up"]
    monkeypatch.setattr(sys, "argv", argv)
    load_benchmark("suite_timeline").main()
    written = json.loads(out.read_text())
    assert written["seconds"] == {"test_b.py": 50, "test_a.py": 30, "test_c.py": 5}
    assert list(written["seconds"]) == ["test_b.py", "test_a.py", "test_c.py"]  # longest first
    assert written["measured"].startswith("made up: 4 tests")
    printed = capsys.readouterr().out
    assert "gw0: 3 tests, busy 35 s, out of work at 35 s" in printed
    assert "the last worker ran out of work at 50 s, the first at 35 s (tail 15 s)" in printed
    assert "     0     30 s  test_a.py" in printed  # one stretch for the two tests of a file


def test_cpu_per_file_and_per_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [  # (test, worker's CPU, its children's)
        ("tests/test_a.py::test_one", 2.0, 10.0),
        ("tests/test_a.py::test_two", 1.0, 0.0),
        ("tests/test_b.py::test_one", 4.0, 1.5),
    ]
    timeline = tmp_path / "timeline.jsonl"
    timeline.write_text("".join(
        json.dumps({"worker": "gw0", "test": t, "start": i, "end": i + 1, "cpu": c,
                    "children_cpu": k}) + "\n"
        for i, (t, c, k) in enumerate(rows)
    ))  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["suite_timeline.py", str(timeline)])
    load_benchmark("suite_timeline").main()
    printed = capsys.readouterr().out
    total = "CPU within the tests: 18 s (7 s in the workers, 12 s in their child processes)"
    assert total in printed
    files = printed.split("CPU seconds per file")[1].split("CPU seconds per test")[0]
    assert files.splitlines()[1:] == [
        "        13  =     3 +    10  test_a.py",
        "         6  =     4 +     2  test_b.py",
    ]  # fmt: skip
    tests = printed.split("CPU seconds per test (worker + children):\n")[1].splitlines()
    assert tests == [
        "      12.0  tests/test_a.py::test_one",
        "       5.5  tests/test_b.py::test_one",
        "       1.0  tests/test_a.py::test_two",
    ]


def test_an_empty_timeline_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    timeline = tmp_path / "timeline.jsonl"
    timeline.write_text("")
    monkeypatch.setattr(sys, "argv", ["suite_timeline.py", str(timeline)])
    with pytest.raises(SystemExit, match="no test recorded"):
        load_benchmark("suite_timeline").main()


def test_the_suite_reads_its_order_from_the_measured_table(pytestconfig: pytest.Config) -> None:
    """tests/unit_seconds.json is what tests/conftest.py orders the units by."""
    (conftest,) = [
        plugin
        for plugin in pytestconfig.pluginmanager.get_plugins()
        if str(getattr(plugin, "__file__", "")).endswith(str(Path("tests", "conftest.py")))
    ]
    table = json.loads((REPO / "tests" / "unit_seconds.json").read_text())["seconds"]
    assert table == conftest.UNIT_SECONDS
    assert table["test_workpool.py"] > table["test_tokenizer.py"]
