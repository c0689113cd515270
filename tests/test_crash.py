"""Crashes: SIGKILL mid-tokenization, mid-corruption, mid-ingest holding a stage lock and
mid-training, then the same command again.

The rerun completes, never reads the killed run's partial stage (the published folders equal a
clean run's, byte for byte by content hash), and training resumes from the last checkpoint
with the same final metrics and weights as an uninterrupted run on CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import build_stages, cli_command, spawn, train_yaml

from maskdiff.checkpoint import latest_checkpoint, load_checkpoint
from maskdiff.config import Config, load_config
from maskdiff.data.stage import content_hash, read_manifest
from maskdiff.train import train

STAGES = ("documents", "tokenizer", "blocks", "corruptions")
STEPS = 240  # the training run killed and resumed

# Big enough that the kill, polled every 20 ms, lands inside each stage: on an idle core the blocks
# stage takes 0.8 s and the corruptions 0.4 s.
DATA_YAML = """\
name: crash-data
data:
  source: builtin
  builtin: markov
  seq_len: 64
  shard_rows: 512
  root: {root}
  markov: {{vocab_size: 8, order: 1, n_documents: 8000, doc_length: 256}}
tokenizer: {{kind: char}}
corruption: {{eval_draws: 2, train_epochs: 8}}
diffusion: {{T: [4, 16, 64]}}
model: {{preset: custom, n_layers: 2, d_model: 32, n_heads: 2, max_seq_len: 64}}
"""

# The data stages as a notebook or a task would call them; prints the stage folders.
DATA_SCRIPT = """
import json, sys
from maskdiff.data.blocks import build_blocks
from maskdiff.config import load_config
from maskdiff.data.corrupt import build_corruptions
from maskdiff.data.ingest import ingest_documents
from maskdiff.data.tokenizer import train_tokenizer
cfg = load_config(sys.argv[1])
docs = ingest_documents(cfg.data).path
tok = train_tokenizer(cfg.tokenizer, docs, cfg.data.root).path
blocks = build_blocks(cfg.data, docs, tok).path
corr = build_corruptions(cfg.corruption, cfg.diffusion, blocks, cfg.data.root).path
print(json.dumps([str(docs), str(tok), str(blocks), str(corr)]))
"""


def kill_group(child: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's whole process group and wait until nothing of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait(30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(child.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes of group {child.pid} survived SIGKILL")


def kill_when(
    child: subprocess.Popen[bytes], ready: Callable[[], bool], log: Path, timeout: float = 120
) -> None:
    """Poll ``ready`` and SIGKILL the child's group as soon as it holds."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert child.poll() is None, f"finished before the kill:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"phase never started:\n{log.read_text()[-3000:]}"
            time.sleep(0.02)
    finally:
        kill_group(child)


def run_to_end(cmd: list[str], log: Path, timeout: float = 150) -> str:
    """Run ``cmd`` to completion (killing its group on timeout); returns the last stdout line."""
    child = spawn(cmd, log)
    try:
        rc = child.wait(timeout)
    finally:
        if child.poll() is None:
            kill_group(child)
    assert rc == 0, log.read_text()[-4000:]
    return log.read_text().strip().splitlines()[-1]


def stage_folders(root: Path) -> dict[str, Path]:
    """Each stage's published folder; there must be exactly one per stage."""
    out = {}
    for name in STAGES:
        found = [p for p in root.glob(f"{name}-*") if p.is_dir()]
        assert len(found) == 1, found
        out[name] = found[0]
    return out


@pytest.fixture(scope="module")
def clean_hashes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Content hashes of the four stages built once without interruption."""
    root = tmp_path_factory.mktemp("clean") / "runs"
    cfg = load_config(_write(root.parent / "data.yaml", DATA_YAML.format(root=root)))
    return {r.name: r.content_hash for r in build_stages(cfg, root)}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _partial(root: Path, stage: str, with_shard: bool) -> bool:
    for tmp in root.glob(f".{stage}-*.tmp-*"):
        if not with_shard or any(tmp.glob("*.parquet")):
            return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["blocks", "corruptions"])
def test_sigkill_during_a_data_stage_then_rerun(
    tmp_path: Path, clean_hashes: dict[str, str], stage: str
) -> None:
    """Killed while tokenizing (blocks) or precomputing corruptions: the stage was never
    published; the same command then completes with the clean run's stages."""
    root = tmp_path / "runs"
    config = _write(tmp_path / "data.yaml", DATA_YAML.format(root=root))
    cmd = [sys.executable, "-c", DATA_SCRIPT, str(config)]
    log = tmp_path / "data.log"
    child = spawn(cmd, log)
    if stage == "blocks":  # tokenization runs before the first block shard is written
        kill_when(child, lambda: _partial(root, "blocks", with_shard=False), log)
    else:
        kill_when(child, lambda: _partial(root, "corruptions", with_shard=True), log)
    assert not list(root.glob(f"{stage}-*")), "the killed stage must not be published"
    assert _partial(root, stage, with_shard=False), "the kill must land inside the stage"

    folders = [Path(p) for p in json.loads(run_to_end(cmd, log))]
    assert folders == list(stage_folders(root).values())
    for name, folder in zip(STAGES, folders, strict=True):
        manifest = read_manifest(folder)
        assert manifest["content_hash"] == content_hash(folder) == clean_hashes[name], name
    assert not list(root.glob(".*.tmp-*")), "the killed run's partial folder was not cleaned"


def _held_locks(locks: Path) -> list[dict[str, object]]:
    """The notes of the held (non-empty) transaction lock files under ``locks``."""
    notes = []
    for path in locks.glob("*.lock"):
        with contextlib.suppress(OSError, ValueError):
            notes.append(json.loads(path.read_text()))
    return notes


@pytest.mark.slow
def test_sigkill_while_a_run_holds_a_stage_lock_then_rerun(
    tmp_path: Path, clean_hashes: dict[str, str]
) -> None:
    """``maskdiff run --stage data`` killed while its ingest task holds the stage's Prefect
    transaction lock: the lock does not outlive the run, so the same command completes (with
    Prefect's own file lock it would wait for the dead run forever) with the clean stages."""
    root = tmp_path / "runs"
    config = _write(tmp_path / "data.yaml", DATA_YAML.format(root=root))
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--stage", "data",
           "--no-progress"]  # fmt: skip
    log = tmp_path / "data.log"
    child = spawn(cmd, log)
    locks = Path(os.environ["PREFECT_HOME"]) / "locks"  # the suite's (tests/conftest.py)
    # inside the ingest task: its lock taken (the transaction begins first), the stage unfinished
    kill_when(child, lambda: _partial(root / "data", "documents", False) and _held_locks(locks),
              log)  # fmt: skip
    notes = _held_locks(locks)  # the killed run's: its lock file still names it
    assert len(notes) == 1 and isinstance(notes[0]["pid"], int), notes
    with pytest.raises(ProcessLookupError):
        os.kill(notes[0]["pid"], 0)
    assert not list((root / "data").glob("documents-*")), "the kill must land inside ingest"

    summary = json.loads(Path(run_to_end(cmd, log, timeout=120)).read_text())
    folders = stage_folders(root / "data")
    assert {name: str(folders[name]) for name in STAGES} == {
        name: summary["stages"][name] for name in STAGES
    }
    for name, folder in folders.items():
        assert read_manifest(folder)["content_hash"] == clean_hashes[name], name
    assert not _held_locks(locks), "every lock is released after the rerun"
    # the run's own temporary server stopped with it: the closing lines point at the database
    assert f"This run is in Prefect's database in {os.environ['PREFECT_HOME']}" in log.read_text()


def _checkpoint_step(root: Path) -> int:
    """The newest finished checkpoint's step in an unfinished training folder, else 0."""
    for folder in (root / "train").glob("mdm-*"):
        latest = latest_checkpoint(folder)
        if latest is not None and not (folder / "DONE").exists():
            return int(latest.stem.split("-")[1])
    return 0


@pytest.mark.slow
def test_sigkill_during_training_resumes_with_identical_results(tmp_path: Path) -> None:
    """The real ``maskdiff run`` command killed mid-training and run again: it resumes from the
    last checkpoint and ends with the metrics and EMA weights of an uninterrupted run."""
    root = tmp_path / "runs"
    # 240 steps: the kill lands at a checkpoint >= 60 (polled every 20 ms, steps of a few ms)
    # with more than a hundred steps still to go, so the rerun resumes mid-training
    config = _write(tmp_path / "train.yaml", train_yaml(root, max_steps=STEPS))
    log = tmp_path / "cli.log"
    child = spawn(cli_command(config), log)
    kill_when(child, lambda: (root / "train").is_dir() and _checkpoint_step(root) >= 60, log)
    killed_at = _checkpoint_step(root)
    assert 60 <= killed_at < STEPS, killed_at

    summary = json.loads(Path(run_to_end(cli_command(config), log)).read_text())
    mdm = summary["models"]["mdm"]
    assert mdm["resumed_from"] >= killed_at and mdm["resumed_from"] % 20 == 0
    assert mdm["step"] == STEPS
    assert len(list((root / "train").glob("mdm-*"))) == 1, "the rerun must reuse the folder"

    cfg: Config = load_config(config)
    stats = read_manifest(summary["stages"]["blocks"])["stats"]
    straight = train(
        cfg,
        summary["stages"]["blocks"],
        tmp_path / "straight",
        vocab_size=stats["vocab_size"],
        corruptions_dir=summary["stages"]["corruptions"],
        tokenizer_hash=stats["tokenizer_hash"],
    )
    for key in ("loss", "grad_norm", "lr"):
        assert mdm["metrics"][key] == straight.metrics[key], key
    resumed = load_checkpoint(mdm["checkpoint"])
    uninterrupted = load_checkpoint(straight.checkpoint_path)
    for name, tensor in uninterrupted["ema"].items():
        assert torch.equal(resumed["ema"][name], tensor), name
