"""DDP: ``torchrun --nproc_per_node 2 -m maskdiff.train`` on 2 CPU processes (gloo) trains on the
same global batches as one process and gives the same losses and weights within float tolerance.
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
from helpers import tiny_config, write_corpus

from maskdiff.checkpoint import load_checkpoint
from maskdiff.train import train

V, L = 8, 16


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    blocks, _ = write_corpus(tmp_path / "data", n_blocks=64, seq_len=L, vocab=V, strides=(0, 1))
    cfg = tiny_config(max_steps=8, grad_accum=2, log_every=2)
    conf = tmp_path / "tiny.yaml"
    conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "maskdiff.train", "--config", str(conf), "--blocks", str(blocks),
           "--out", str(tmp_path / "ddp"), "--vocab-size", str(V)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    ddp_losses = [x["loss"] for x in lines if "loss" in x]  # rank 0 only: one line per log
    assert len(ddp_losses) == 4

    single = train(cfg, blocks, tmp_path / "single", vocab_size=V)
    single_losses = [m["loss"] for _, m in single.history]
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4)
    a = load_checkpoint(tmp_path / "ddp" / "ckpt-00000008.pt")["model"]
    b = load_checkpoint(single.checkpoint_path)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
