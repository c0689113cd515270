"""benchmarks/suite_processes.py: the names it gives processes, its sums, and a real recording of
a process tree (a grandchild that burns CPU, a sibling that is not the command's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, load_benchmark

SCRIPT = REPO / "benchmarks" / "suite_processes.py"


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["/v/bin/python", "-m", "flows.cli", "run", "--config", "x"], "python -m flows.cli run"),
        (["/v/bin/python3.11", "-u", "-X", "importtime", "-m", "maskdiff.train", "--config", "x"],
         "python -m maskdiff.train"),
        (["/v/bin/python", "/v/bin/prefect", "server", "start"], "prefect server"),
        (["/v/bin/python", "/v/bin/mlflow", "--port", "5"], "mlflow"),
        (["/v/bin/python", "/r/benchmarks/gpu_check.py", "--device", "cpu"],
         "python gpu_check.py"),
        (["/v/bin/python", "-c", "import os, runpy\nparent = 1\nrunpy.run_module('x')", "9"],
         "python -c parent = 1"),
        (["/usr/lib/gcc/x86_64-linux-gnu/12/cc1plus", "-quiet"], "cc1plus"),
        (["postgres: checkpointer"], "postgres: checkpointer"),
        ([], "?"),
    ],
)  # fmt: skip
def test_kind_names_what_a_process_runs(argv: list[str], name: str) -> None:
    assert load_benchmark("suite_processes").kind(argv) == name


def test_sums_per_kind_and_per_test() -> None:
    rows = [
        {"argv": ["python", "-m", "flows.cli", "run"], "test": "t.py::a", "cpu": 6.0},
        {"argv": ["python", "-m", "flows.cli", "run"], "test": "t.py::b", "cpu": 4.0},
        {"argv": ["g++", "-O3"], "test": "t.py::a", "cpu": 1.5},
        {"argv": ["python", "x.py"], "test": "", "cpu": 0.5},
    ]
    script = load_benchmark("suite_processes")
    assert script.sums(rows, "kind") == [
        ("python -m flows.cli run", 2, 10.0), ("g++", 1, 1.5), ("python x.py", 1, 0.5)
    ]  # fmt: skip
    assert script.sums(rows, "test") == [
        ("t.py::a", 2, 7.5), ("t.py::b", 1, 4.0), ("(no test)", 1, 0.5)
    ]  # fmt: skip


# The command: a shell that starts a Python grandchild burning about 0.6 s of CPU in a pretend
# test, and exits 3. The Python process beside it (started here, not by the command) must not
# be recorded.
BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_a_recording_holds_the_descendants_and_their_cpu(tmp_path: Path) -> None:
    out = tmp_path / "procs.jsonl"
    stranger = subprocess.Popen([sys.executable, "-c", BURN.replace("0.6", "3")])
    try:
        command = ["sh", "-c", f'PYTEST_CURRENT_TEST="t.py::burn (call)" '
                   f'{sys.executable} -c "$0"; sleep 0.3; exit 3', BURN]  # fmt: skip
        done = subprocess.run(
            [sys.executable, str(SCRIPT), "--out", str(out), "--interval", "0.05", "--", *command],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        stranger.kill()
        stranger.wait()
    assert done.returncode == 3, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    summary = rows.pop()
    assert summary["summary"] and summary["returncode"] == 3 and summary["waited_cpu"] >= 0.5
    assert stranger.pid not in {r["pid"] for r in rows}
    (burn,) = [r for r in rows if r["argv"][:2] == [sys.executable, "-c"]]
    # the 0.6 s it burned, less at most one interval missed at its end and the clock's tick
    assert 0.45 <= burn["cpu"] <= 1.5, burn
    assert burn["test"] == "t.py::burn"
    shell = next(r for r in rows if r["argv"][:1] == ["sh"])
    assert burn["ppid"] == shell["pid"]
    assert "processes sampled" in done.stdout and "t.py::burn" in done.stdout
