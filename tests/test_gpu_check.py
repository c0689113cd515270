"""The CPU dry run of ``make gpu-check``: every check runs at tiny size or is skipped with its
reason, nothing fails, and the report lands where the caller said (docs/gpu-check.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

EXPECTED = ["environment", "imports", "stages", "pytest -m gpu", "sdpa kernel", "no host sync",
            "gpu idle", "bench eager", "bench compiled", "largest batch small",
            "largest batch medium", "train entry point", "evaluator bound", "samples"]  # fmt: skip
CPU_RUN = ["stages", "bench eager", "train entry point", "evaluator bound", "samples"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU path")
def test_cpu_dry_run_reports_every_line(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu",
         "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    lines = {ln["name"]: ln for ln in report["lines"]}
    assert list(lines) == EXPECTED
    assert report["ok"] and report["environment"]["torch"] == torch.__version__
    for name, ln in lines.items():
        assert ln["status"] in ("pass", "skipped"), (name, ln)
        assert ln["status"] == "pass" or ln["reason"].startswith("no CUDA"), (name, ln)
    for name in CPU_RUN:  # exercised on the CPU, with a figure
        assert lines[name]["status"] == "pass" and lines[name]["figure"], name
    assert "7 skipped" in lines["pytest -m gpu"]["figure"]  # collected, then skipped
    first, last = (
        lines["train entry point"]["data"]["first"],
        lines["train entry point"]["data"]["last"],
    )
    assert last["loss"] < first["loss"]
    table = (out / "report.md").read_text()
    assert all(f"| {name} |" in table for name in EXPECTED)
    assert "| fail |" not in table and "card none" in table


def test_library_imports_without_the_pipeline_packages() -> None:
    """The modules the GPU side needs import with prefect, mlflow, pandera and datasets blocked."""
    line = gpu_check.check_imports()
    assert line.status == "pass", line.figure


def test_a_missing_stage_is_a_fail_line(tmp_path: Path) -> None:
    """A train run on an empty stages folder reports fail with the reason, never passes."""
    (tmp_path / "stages").mkdir()
    line, ckpt = gpu_check.check_train_run("cpu", tmp_path / "stages", tmp_path)
    assert line.status == "fail" and ckpt is None
    assert (tmp_path / "train-run.log").read_text()
