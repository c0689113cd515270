"""DDP: ``torchrun --nproc_per_node 2`` of ``maskdiff.train.main`` on 2 CPU processes (gloo) trains
on the same global batches as one process and gives the same losses and weights within float
tolerance; the health metrics name the rank that a slow data loader holds back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import failure_text, tiny_config, write_corpus

from maskdiff.checkpoint import load_checkpoint
from maskdiff.train import train

V, L = 8, 16
DELAY = 0.3  # seconds rank 1 waits for each batch: a straggler (8 steps: + 2.4 s)

# maskdiff.train's entry point, with rank 1's loader slowed down (the losses do not change)
STRAGGLER = f"""
import os, time
from maskdiff.data import loader
if os.environ["RANK"] == "1":
    fetch = loader.BatchLoader.__next__
    loader.BatchLoader.__next__ = lambda self: (time.sleep({DELAY}), fetch(self))[1]
from maskdiff.distributed import end_worker
from maskdiff.train import main
end_worker(main())
"""


@pytest.mark.slow  # torchrun: not in `make test-fast`
def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    blocks, _ = write_corpus(tmp_path / "data", n_blocks=64, seq_len=L, vocab=V, strides=(0, 1))
    cfg = tiny_config(max_steps=8, grad_accum=2, log_every=2)
    conf = tmp_path / "tiny.yaml"
    conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = tmp_path / "straggler.py"
    script.write_text(STRAGGLER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), "--config", str(conf), "--blocks", str(blocks),
           "--out", str(tmp_path / "ddp"), "--vocab-size", str(V)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, failure_text(proc.stderr)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    ddp_losses = [x["loss"] for x in lines if "loss" in x]  # rank 0 only: one line per log
    assert len(ddp_losses) == 4
    windows = [x for x in lines if "loss" in x]
    for x in windows:  # the health of the ranks, per window
        assert x["step_time_max_s"] >= x["step_time_s"] >= x["work_time_s"] > 0
        assert x["straggler_ratio"] == pytest.approx(x["work_time_max_s"] / x["work_time_s"])
        assert x["memory_gb"] >= 0 and x["tokens_per_s"] > 0 and x["mfu"] > 0
    for x in windows[1:]:  # past the first window (start-up): rank 1 shows as the straggler
        assert x["work_time_max_s"] >= DELAY and x["straggler_ratio"] > 1.3
        assert x["step_time_s"] >= DELAY  # rank 0 waits for it at the all-reduce

    single = train(cfg, blocks, tmp_path / "single", vocab_size=V)
    single_losses = [m["loss"] for _, m in single.history]
    for _, m in single.history:  # one process: the slowest rank is the only one
        assert m["step_time_max_s"] == m["step_time_s"] >= m["work_time_s"] > 0
        assert m["work_time_max_s"] == m["work_time_s"] and m["straggler_ratio"] == 1.0
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4)
    a = load_checkpoint(tmp_path / "ddp" / "ckpt-00000008.pt")["model"]
    b = load_checkpoint(single.checkpoint_path)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


# a worker's last moments: buffered output, an exit handler, an object the interpreter's teardown
# would finalize, a chosen exit status
ENDING = """
import atexit, sys
from maskdiff.distributed import end_worker

class Finalized:
    def __del__(self, _open=open, _path=sys.argv[1]):  # module globals are gone by then
        with _open(_path, "w") as out:
            out.write("finalized")

keep = Finalized()
atexit.register(lambda: sys.stdout.write(" exit handler"))
print('{"result": true}', end="")  # stdout is a pipe: this sits in Python's buffer
end_worker(3)
"""


@pytest.mark.parametrize("under_torchrun", [True, False])
def test_end_worker_skips_only_the_teardown_under_torchrun(under_torchrun: bool, tmp_path) -> None:
    """Under torchrun a finished rank leaves without the interpreter's teardown (where a gloo
    rank can abort, see maskdiff.distributed.end_worker): its exit handlers run, its buffered
    output is written out, its exit status is kept, and no object is finalized. Elsewhere it
    is an ordinary ``sys.exit``, the teardown included."""
    hidden = ("TORCHELASTIC_RUN_ID", "PYTHONUNBUFFERED")  # buffered, as under a bare torchrun
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    if under_torchrun:
        env["TORCHELASTIC_RUN_ID"] = "end-worker-test"
    marker = tmp_path / "finalized"
    proc = subprocess.run([sys.executable, "-c", ENDING, str(marker)], capture_output=True,
                          text=True, env=env, timeout=60)  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == '{"result": true} exit handler'
    assert marker.exists() is not under_torchrun
