"""Prefect tasks called through ``.fn()``: the thin layer over the library, without a server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import smoke_config

from maskdiff.data.stage import read_manifest
from maskdiff.data.validate import StageValidationError
from tasks import data as data_tasks
from tasks import model as model_tasks
from tasks.caching import GENERATION, RootGeneration, root_generation


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks") / "data"
    cfg = smoke_config(root)
    root_generation(root)
    docs = data_tasks.ingest.fn(cfg.data, str(root))
    tok = data_tasks.tokenizer.fn(cfg.tokenizer, str(docs.path), str(root))
    blocks = data_tasks.build_blocks(cfg.data, str(docs.path), str(tok.path), str(root))
    corr = data_tasks.corrupt(cfg.corruption, cfg.diffusion, str(blocks.path), str(root))
    return cfg, root, {"documents": docs, "tokenizer": tok, "blocks": blocks, "corruptions": corr}


def test_data_tasks_build_stages(stages) -> None:
    cfg, root, built = stages
    for result in built.values():
        assert (result.path / "manifest.json").is_file()
        assert result.path.parent == root
    stats = read_manifest(built["blocks"].path)["stats"]
    assert stats["seq_len"] == cfg.data.seq_len
    assert not list(root.glob(".scratch/*"))  # the mapped shards' scratch files are gone


def test_validate_passes_and_names_the_damaged_file(stages, tmp_path) -> None:
    _, _, built = stages
    report = data_tasks.validate.fn(str(built["blocks"].path), "blocks")
    assert "passed" in report
    damaged = tmp_path / "blocks"
    shutil.copytree(built["blocks"].path, damaged)
    shard = sorted(damaged.glob("train-*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(StageValidationError) as info:
        data_tasks.validate.fn(str(damaged), "blocks")
    assert shard.name in str(info.value)


def test_root_generation_changes_when_root_is_wiped(tmp_path) -> None:
    root = tmp_path / "root"
    first = root_generation(root)
    assert root_generation(root) == first
    policy = RootGeneration()
    key = policy.compute_key(None, {"root": str(root)}, {})
    assert key == first
    shutil.rmtree(root)
    assert policy.compute_key(None, {"root": str(root)}, {}) is None
    assert root_generation(root) != first
    assert (root / GENERATION).is_file()


def test_train_task_resumes_an_unfinished_folder(stages) -> None:
    cfg, root, built = stages
    cfg = cfg.model_copy(update={"ar_baseline": False})
    blocks, corr = str(built["blocks"].path), str(built["corruptions"].path)
    out = model_tasks.train.fn(cfg, "mdm", blocks, corr, str(root.parent), None)
    assert out["step"] == cfg.train.max_steps and out["resumed_from"] == 0
    assert Path(out["checkpoint"]).is_file()
    assert (Path(out["run_dir"]) / "DONE").is_file()
    # a finished folder is not reused: the same call trains anew in the next folder
    again = model_tasks.train.fn(cfg, "mdm", blocks, corr, str(root.parent), None)
    assert again["run_dir"] != out["run_dir"]
    assert again["metrics"]["loss"] == pytest.approx(out["metrics"]["loss"], rel=1e-6)
