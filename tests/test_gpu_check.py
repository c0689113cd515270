"""The CPU dry run of ``make gpu-check``: every check runs at tiny size or is skipped with its
reason, nothing fails, and the report lands where the caller said (docs/gpu-check.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check

EXPECTED = ["environment", "imports", "stages", "pytest -m gpu", "sdpa kernel", "no host sync",
            "gpu idle", "bench eager", "bench compiled", "largest batch small",
            "largest batch medium", "train entry point", "evaluator bound", "samples"]  # fmt: skip
CPU_RUN = [
    "stages",
    "sdpa kernel",
    "bench eager",
    "train entry point",
    "evaluator bound",
    "samples",
]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU path")
def test_cpu_dry_run_reports_every_line(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu",
         "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    lines = {ln["name"]: ln for ln in report["lines"]}
    assert list(lines) == EXPECTED
    assert report["ok"] and report["complete"]
    assert report["environment"]["torch"] == torch.__version__
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
    assert all(f"| {name} |" in table for name in EXPECTED) and "INCOMPLETE" not in table
    assert "| fail |" not in table and "card none" in table
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.parquet"))  # bulk stays out


def test_library_imports_without_the_pipeline_packages() -> None:
    """The modules the GPU side needs import with prefect, mlflow, pandera and datasets blocked."""
    line = gpu_check.check_imports()
    assert line.status == "pass", line.figure


def test_a_missing_stage_is_a_fail_line(tmp_path: Path) -> None:
    """A train run on an empty stages folder reports fail with the reason, never passes."""
    (tmp_path / "stages").mkdir()
    line, ckpt = gpu_check.check_train_run("cpu", tmp_path / "stages", tmp_path, tmp_path)
    assert line.status == "fail" and ckpt is None
    assert (tmp_path / "train-run.log").read_text()


def test_sync_window_hooks_bracket_one_metric_window(tmp_path: Path) -> None:
    """The no-host-sync check's hooks (run on the GPU only) fire once each, around exactly the
    steps of one metric window, and leave the loop's reporting as it was."""
    from helpers import V, tiny_config, write_corpus

    from maskdiff import train as train_mod

    blocks, _ = write_corpus(tmp_path)
    steps: list[tuple[str, int]] = []
    original = train_mod._Meter.report
    calls = {"n": 0}

    def count(module: torch.nn.Module, args: tuple) -> None:
        calls["n"] += 1

    model_hook = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        gpu_check._short_train(tiny_config(), blocks, tmp_path / "run", V, 4,
                               lambda: steps.append(("first", calls["n"])),
                               lambda: steps.append(("second", calls["n"])))  # fmt: skip
    finally:
        model_hook.remove()
    assert [name for name, _ in steps] == ["first", "second"]
    assert steps[1][1] > steps[0][1]  # forwards ran between the two
    per_step = steps[0][1] / 4
    assert (steps[1][1] - steps[0][1]) / per_step == 4  # one window of 4 steps
    assert train_mod._Meter.report is original


def test_idle_share_counts_only_uncovered_time() -> None:
    """Overlapping kernels count once; the gaps between them are the idle time."""
    idle, total = gpu_check.idle_share([(0.0, 4.0), (2.0, 6.0), (8.0, 10.0), (9.0, 9.5)])
    assert total == 10.0 and idle == pytest.approx(0.2)  # busy 0-6 and 8-10: 8 of 10
    assert gpu_check.idle_share([(0.0, 1.0)]) == (0.0, 1.0)
    assert gpu_check.idle_share([])[1] == 0.0


def test_largest_batch_bisection_finds_the_limit() -> None:
    """Doubling then bisection lands within 8 of the true limit, never above it."""
    tries: list[int] = []

    def fits(batch: int) -> float | None:
        tries.append(batch)
        return None if batch > 100 else 10.0 * batch

    batch, rate = gpu_check.largest_fitting(fits)
    assert 92 < batch <= 100 and rate == 10.0 * batch
    assert len(tries) <= 6 + 4  # 8..128 doubling, then at most 4 bisections
    assert gpu_check.largest_fitting(lambda b: None) == (0, None)
    assert gpu_check.largest_fitting(lambda b: 1.0, cap=64) == (64, 1.0)
