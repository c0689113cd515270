"""Determinism on CPU: the same config and seeds give the same stages and the same model, bit for
bit; another seed gives other corruptions and other weights.

Which seed controls what: ``data.markov.seed`` the synthetic corpus, ``corruption.seed`` the
precomputed masks and times, ``train.seed`` the initial weights, the batch order and online
masks, ``sample.seed`` the samples.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import CPU, smoke_config

from maskdiff.checkpoint import load_checkpoint
from maskdiff.config import Config
from maskdiff.data.blocks import build_blocks
from maskdiff.data.corrupt import build_corruptions
from maskdiff.data.ingest import ingest_documents
from maskdiff.data.stage import StageResult
from maskdiff.data.tokenizer import train_tokenizer
from maskdiff.train import TrainResult, train

_TIMING = {"tokens_per_s", "mfu", "step_time_s", "memory_gb", "step_time_max_s", "work_time_s",
           "work_time_max_s", "straggler_ratio"}  # wall-clock, not results  # fmt: skip


def config(root: Path, *overrides: str) -> Config:
    return smoke_config(root, *CPU, *overrides)


def stages(cfg: Config) -> dict[str, StageResult]:
    root = cfg.data.root
    docs = ingest_documents(cfg.data)
    tok = train_tokenizer(cfg.tokenizer, docs.path, root)
    blocks = build_blocks(cfg.data, docs.path, tok.path)
    corr = build_corruptions(cfg.corruption, cfg.diffusion, blocks.path, root)
    return {r.name: r for r in (docs, tok, blocks, corr)}


def fit(cfg: Config, built: dict[str, StageResult], out: Path) -> TrainResult:
    stats = built["blocks"].manifest["stats"]
    return train(
        cfg,
        built["blocks"].path,
        out,
        vocab_size=stats["vocab_size"],
        corruptions_dir=built["corruptions"].path,
        tokenizer_hash=stats["tokenizer_hash"],
    )


def results(history: list[tuple[int, dict[str, float]]]) -> list[tuple[int, dict[str, float]]]:
    return [(step, {k: v for k, v in m.items() if k not in _TIMING}) for step, m in history]


def weights(result: TrainResult) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(result.checkpoint_path)
    return {
        **{f"model.{k}": v for k, v in ckpt["model"].items()},
        **{f"ema.{k}": v for k, v in ckpt["ema"].items()},
    }


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, dict, TrainResult]:
    cfg = config(tmp_path_factory.mktemp("first") / "runs")
    built = stages(cfg)
    return cfg, built, fit(cfg, built, Path(cfg.data.root) / "train")


def test_same_config_and_seed_give_identical_stages_metrics_and_weights(
    first: tuple[Config, dict, TrainResult], tmp_path: Path
) -> None:
    _, built_a, run_a = first
    cfg_b = config(tmp_path / "runs")  # another root: nothing shared but the config
    built_b = stages(cfg_b)
    for name in built_a:
        assert built_a[name].path.name == built_b[name].path.name, name  # same stage key
        assert built_a[name].content_hash == built_b[name].content_hash, name
    run_b = fit(cfg_b, built_b, tmp_path / "runs" / "train")
    assert results(run_a.history) == results(run_b.history)
    assert len(run_a.history) == 4  # smoke: 20 steps, a log every 5
    assert same_tensors(weights(run_a), weights(run_b))


def test_another_corruption_seed_changes_only_the_corruptions(
    first: tuple[Config, dict, TrainResult],
) -> None:
    """In the same root, the documents, tokenizer and blocks stages are reused as they are (same
    folder, same contents); only the corruptions stage is built anew, with other contents."""
    cfg, built, _ = first
    other = stages(config(Path(cfg.data.root), "corruption.seed=1"))
    for name in ("documents", "tokenizer", "blocks"):
        assert other[name].reused and other[name].path == built[name].path, name
        assert other[name].content_hash == built[name].content_hash, name
    corr = other["corruptions"]
    assert not corr.reused and corr.path != built["corruptions"].path
    assert corr.content_hash != built["corruptions"].content_hash


def test_another_training_seed_changes_the_weights(
    first: tuple[Config, dict, TrainResult], tmp_path: Path
) -> None:
    cfg, built, run = first
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 1})})
    run_b = fit(other, built, tmp_path / "other-seed")
    assert not same_tensors(weights(run), weights(run_b))
    assert results(run.history) != results(run_b.history)


def test_another_corpus_seed_changes_every_stage(
    first: tuple[Config, dict, TrainResult],
) -> None:
    """In the same root, every stage is built anew under another key, and every stage made from
    the documents' text has other contents. (The tokenizer's contents, a character vocabulary,
    are the same: both corpora use the same 8 symbols.)"""
    cfg, built, _ = first
    other = stages(config(Path(cfg.data.root), "data.markov.seed=7"))
    assert set(other) == set(built) == {"documents", "tokenizer", "blocks", "corruptions"}
    for name in built:
        assert not other[name].reused, name
        assert other[name].path.name != built[name].path.name, name  # the stage key
    for name in ("documents", "blocks", "corruptions"):
        assert other[name].content_hash != built[name].content_hash, name
