"""One rank of a launched job goes wrong alone (torchrun, 2 CPU processes, gloo, through the
``train`` task): rank 1 raises before its third batch while rank 0 waits for it in the gradient
all-reduce, or rank 1 hangs there. Either way the task fails within a bounded time, with rank 1
named in its error; nothing is left running.

The fault is planted with a ``sitecustomize.py`` on the children's ``PYTHONPATH``
(:func:`helpers.child_hook`): it wraps rank 1's batch loader and nothing else.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from helpers import CPU, build_stages, child_hook, kill_launches_after, smoke_config

from maskdiff.launch import LaunchError
from tasks import model as model_tasks

FAULT = """
import os
if os.environ.get("RANK") == "1" and os.environ.get("FAULT"):
    import pathlib, time
    from maskdiff.data import loader
    fetch, seen = loader.BatchLoader.__next__, [0]
    def faulty(self):
        seen[0] += 1
        if seen[0] == 3:
            pathlib.Path(os.environ["FAULT_MARK"]).write_text(repr(time.time()))
            if os.environ["FAULT"] == "raise":
                raise RuntimeError("rank 1 gives up before its third batch")
            time.sleep(3600)
        return fetch(self)
    loader.BatchLoader.__next__ = faulty
"""
pytestmark = pytest.mark.slow  # torchrun jobs of tens of seconds: not in `make test-fast`
TIMEOUT = 8  # runtime.collective_timeout of the hang test, seconds


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    root = tmp_path_factory.mktemp("faults") / "runs"
    cfg = smoke_config(root, *CPU)
    _, _, blocks, corr = build_stages(cfg, root)
    return root, str(blocks.path), str(corr.path)


def _fail(stages, tmp_path: Path, monkeypatch, fault: str, *overrides: str) -> tuple[str, float]:
    """Run the train task on 2 processes with rank 1's ``fault``; its error message and the
    seconds from the fault to the task's failure."""
    root, blocks, corr = stages
    cfg = smoke_config(root, *CPU, "ar_baseline=false", "train.max_steps=40",
                       "runtime.nproc_per_node=2", f"train.seed={len(fault)}",
                       *overrides)  # fmt: skip
    mark = tmp_path / "fault-time"
    monkeypatch.setenv("PYTHONPATH", child_hook(tmp_path / "hook", FAULT))
    monkeypatch.setenv("FAULT", fault)
    monkeypatch.setenv("FAULT_MARK", str(mark))
    with kill_launches_after(TIMEOUT + 150) as killed, pytest.raises(LaunchError) as info:
        model_tasks.train.fn(cfg, "mdm", blocks, corr, str(root), None)
    failed_at = time.time()
    assert not killed, "the launch hung: the test's guard had to kill it"
    assert mark.is_file(), str(info.value)  # rank 1 did reach its fault
    return str(info.value), failed_at - float(mark.read_text())


def test_a_rank_that_raises_fails_the_task_with_its_error_at_once(stages, tmp_path, monkeypatch):
    message, seconds = _fail(stages, tmp_path, monkeypatch, "raise")
    assert re.search(r"rank 1 \(local_rank: 1\): RuntimeError: rank 1 gives up before its "
                     r"third batch", message), message  # fmt: skip
    # torchrun sees rank 1's exit within its monitor interval and stops rank 0, which was
    # waiting for rank 1 in the all-reduce (not for the 30 min of a collective timeout)
    assert seconds < 20, (seconds, message)


def test_a_hung_rank_ends_the_task_at_the_collective_timeout_named(stages, tmp_path, monkeypatch):
    message, seconds = _fail(stages, tmp_path, monkeypatch, "hang",
                             f"runtime.collective_timeout={TIMEOUT}")  # fmt: skip
    assert re.search(rf"rank 0 \(local_rank: 0\): .*CollectiveTimeoutError: rank 0: a collective "
                     rf"waited more than runtime.collective_timeout={TIMEOUT} s; rank\(s\) 1 "
                     r"never reached it", message), message  # fmt: skip
    # rank 0 waits the timeout, then up to 30 s for a roll call of the ranks
    assert TIMEOUT - 1 < seconds < TIMEOUT + 40, (seconds, message)
