"""pandera validation: every check catches its fault and names the file and row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import smoke_config

from maskdiff.data import corrupt as corrupt_lib
from maskdiff.data.blocks import build_blocks
from maskdiff.data.contracts import blocks_schema, corruptions_schema, documents_schema
from maskdiff.data.corrupt import build_corruptions
from maskdiff.data.corruption_checks import CorruptionChecker
from maskdiff.data.ingest import ingest_documents
from maskdiff.data.stage import list_shards
from maskdiff.data.tokenizer import train_tokenizer
from maskdiff.data.validate import (
    StageValidationError,
    ValidationReport,
    validate_blocks,
    validate_corruptions,
    validate_documents,
    validate_stage,
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    cfg = smoke_config(tmp_path_factory.mktemp("runs"))
    docs = ingest_documents(cfg.data).path
    tok = train_tokenizer(cfg.tokenizer, docs, cfg.data.root).path
    blocks = build_blocks(cfg.data, docs, tok).path
    corr = build_corruptions(cfg.corruption, cfg.diffusion, blocks, cfg.data.root).path
    return cfg, docs, blocks, corr


def _copy(stage: Path, tmp_path: Path) -> Path:
    dst = tmp_path / stage.name
    shutil.copytree(stage, dst)
    return dst


def _rewrite(path: Path, column: str, values, schema: pa.Schema | None = None) -> None:
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index(column), column, values)
    pq.write_table(table.cast(schema) if schema else table, path)


def test_valid_stages_pass(smoke) -> None:
    for stage in smoke[1:]:
        report = validate_stage(stage)
        assert report.ok and report.rows > 0, report.summary()


def test_block_id_out_of_range(smoke, tmp_path: Path) -> None:
    _, _, blocks, _ = smoke
    folder = _copy(blocks, tmp_path)
    shard = list_shards(folder, "train")[1]
    table = pq.read_table(shard)
    ids = table["input_ids"].combine_chunks().flatten().to_numpy().copy().reshape(-1, 32)
    ids[5, 3] = 10  # vocab_size is 10 (8 symbols, EOS, [UNK]); 10 is [MASK]
    ids[7, 0] = -1
    flat = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1), pa.int32()), 32)
    _rewrite(shard, "input_ids", flat)
    report = validate_blocks(folder, 32, 10)
    messages = [str(f) for f in report.failures]
    assert any(shard.name in m and "row 5" in m and "vocab_size=10" in m for m in messages)
    assert any("row 7" in m and "ids >= 0" in m for m in messages)
    with pytest.raises(StageValidationError, match=shard.name):
        report.raise_if_failed()


def test_block_wrong_length_zero_bytes_and_duplicates(smoke, tmp_path: Path) -> None:
    _, _, blocks, _ = smoke
    folder = _copy(blocks, tmp_path)
    shard = list_shards(folder, "validation")[0]
    table = pq.read_table(shard)
    rows = table["input_ids"].to_pylist()
    rows[2] = rows[2][:-1]
    n_bytes = table["n_bytes"].to_numpy().copy()
    n_bytes[4] = 0
    block_id = table["block_id"].to_numpy().copy()
    block_id[6] = block_id[1]
    fixed = pa.table(
        {
            "block_id": block_id,
            "input_ids": pa.array(rows, pa.list_(pa.int32())),
            "n_bytes": pa.array(n_bytes),
        }
    )
    pq.write_table(fixed, shard)
    report = validate_blocks(folder, 32, 10)
    text = report.summary()
    assert f"{shard.name} row 2 column length" in text
    assert f"{shard.name} row 4 column n_bytes" in text
    assert "block_id" in text and "unique" in text


def test_documents_empty_text(smoke, tmp_path: Path) -> None:
    folder = _copy(smoke[1], tmp_path)
    shard = list_shards(folder, "train")[0]
    table = pq.read_table(shard)
    texts = table["text"].to_pylist()
    texts[3] = ""
    _rewrite(shard, "text", pa.array(texts), documents_schema())
    report = validate_documents(folder)
    assert any(f.row == 3 and f.column == "n_chars" for f in report.failures), report.summary()


def test_t_outside_unit_interval(smoke, tmp_path: Path) -> None:
    cfg, _, _, corr = smoke
    folder = _copy(corr, tmp_path)
    shard = list_shards(folder, "validation")[0]
    t = pq.read_table(shard)["t"].to_numpy().copy()
    t[0], t[9] = 0.0, 1.5
    _rewrite(shard, "t", pa.array(t), corruptions_schema(32))
    report = validate_corruptions(folder, 32, cfg.diffusion)
    bad = {(f.row, f.column) for f in report.failures if f.file == shard.name}
    assert (0, "t") in bad and (9, "t") in bad


def test_wrong_masking_rate(smoke, tmp_path: Path) -> None:
    cfg, _, _, corr = smoke
    folder = _copy(corr, tmp_path)
    shard = list_shards(folder, "validation")[0]
    table = pq.read_table(shard)
    t = table["t"].to_numpy().copy()
    # masks drawn for t but stamped with the mirrored time: rates no longer match 1 - alpha(t)
    _rewrite(shard, "t", pa.array(np.clip(1.0 - t, 1e-3, 1.0).astype(np.float32)))
    report = validate_corruptions(folder, 32, cfg.diffusion)
    rate = [f for f in report.failures if f.column and f.column.startswith("mask")]
    assert rate and all(f.file == shard.name for f in rate), report.summary()


def test_wrong_mask_width(smoke, tmp_path: Path) -> None:
    cfg, _, _, corr = smoke
    folder = _copy(corr, tmp_path)
    shard = list_shards(folder, "test")[0]
    table = pq.read_table(shard)
    masks = [m[:-1] for m in table["mask"].to_pylist()]
    _rewrite(shard, "mask", pa.array(masks, pa.binary(3)))
    report = validate_corruptions(folder, 32, cfg.diffusion)
    assert any(f.column == "mask_bytes" and f.row == 0 for f in report.failures)


def test_truncated_parquet_names_the_file(smoke, tmp_path: Path) -> None:
    folder = _copy(smoke[2], tmp_path)
    shard = list_shards(folder, "train")[2]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    report = validate_stage(folder)
    assert not report.ok
    assert any(f.file == shard.name and f.check == "readable parquet" for f in report.failures)
    with pytest.raises(StageValidationError, match=shard.name):
        report.raise_if_failed()
    assert blocks_schema(32)  # the contract itself is unchanged


def test_step_and_T_inconsistent(smoke, tmp_path: Path) -> None:
    cfg, _, _, corr = smoke
    folder = _copy(corr, tmp_path)
    shard = list_shards(folder, "validation")[0]
    table = pq.read_table(shard)
    T, step = table["T"].to_numpy().copy(), table["step"].to_numpy().copy()
    assert T[0] == 0 and step[0] == 0  # the first row of a block is a continuous-time draw
    step[0] = 3  # a step without a grid
    grid = int(np.flatnonzero(T > 0)[0])
    step[grid] = T[grid] + 1  # past the end of its grid
    _rewrite(shard, "step", pa.array(step), corruptions_schema(32))
    report = validate_corruptions(folder, 32, cfg.diffusion)
    found = {(f.row, f.check) for f in report.failures if f.file == shard.name}
    assert (0, "step == 0 iff T == 0") in found and (grid, "step <= T") in found, report.summary()
    assert {f.row for f in report.failures if f.row is not None} == {0, grid}


# ----------------------------------------------------------------------------- in the build


def test_build_validates_what_it_writes(smoke) -> None:
    """A fresh corruptions stage is checked in memory; a re-read finds the same rows."""
    _, _, _, corr = smoke
    manifest = json.loads((corr / "manifest.json").read_text())
    reread = validate_stage(corr)
    assert manifest["stats"]["validated"]["rows"] == reread.rows > 0
    assert manifest["timings"]["validate_s"] > 0


def test_build_refuses_wrong_masking_rate(smoke, tmp_path: Path, monkeypatch) -> None:
    """Masks drawn at the mirrored time fail the rate check before anything is published."""
    cfg, _, blocks, _ = smoke
    real = corrupt_lib.masking_probability
    monkeypatch.setattr(
        corrupt_lib, "masking_probability", lambda d, t: real(d, np.clip(1.0 - t, 1e-3, 1.0))
    )
    with pytest.raises(StageValidationError, match=r"train-00000\.parquet column mask \(t in"):
        build_corruptions(cfg.corruption, cfg.diffusion, blocks, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # neither published nor left half


def test_build_checks_the_written_file(smoke, tmp_path: Path, monkeypatch) -> None:
    """A writer that loses rows is caught by the footer check, naming the file."""
    cfg, _, blocks, _ = smoke
    real = corrupt_lib.write_parquet

    def lossy(table: pa.Table, path: Path, **options) -> None:
        real(table.slice(0, table.num_rows - 1), path, **options)

    monkeypatch.setattr(corrupt_lib, "write_parquet", lossy)
    with pytest.raises(StageValidationError, match=r"test-00000\.parquet: failed \d+ rows written"):
        build_corruptions(cfg.corruption, cfg.diffusion, blocks, tmp_path)


def test_checker_names_rows_of_an_in_memory_table(smoke) -> None:
    cfg, _, _, corr = smoke
    table = pq.read_table(list_shards(corr, "validation")[0])
    t = table["t"].to_numpy().copy()
    t[5] = -0.5
    table = table.set_column(table.schema.get_field_index("t"), "t", pa.array(t))
    # two record batches: rows of the second are numbered from the table's start
    table = pa.concat_tables([table.slice(0, 3), table.slice(3)])
    report = ValidationReport("corruptions", corr)
    checker = CorruptionChecker(32, cfg.diffusion, report)
    checker.check_table("validation-00000.parquet", table)
    checker.finish()
    assert {(f.file, f.row, f.column) for f in report.failures} == {
        ("validation-00000.parquet", 5, "t")
    }
    assert report.rows == table.num_rows


def test_corruptions_without_rows_pass(smoke, tmp_path: Path) -> None:
    """Shards of zero rows leave no (file, t bin) to rate-check: they pass (no crash), and so
    does a build that got no rows at all (online training masks, no evaluation blocks)."""
    cfg, _, _, corr = smoke
    folder = _copy(corr, tmp_path)
    shards = [s for split in ("train", "validation", "test") for s in list_shards(folder, split)]
    for shard in shards:
        pq.write_table(pq.read_table(shard).slice(0, 0), shard)
    report = validate_corruptions(folder, 32, cfg.diffusion)
    assert report.ok and report.rows == 0, report.summary()
    empty = CorruptionChecker(32, cfg.diffusion, ValidationReport("corruptions", folder))
    assert empty.finish().ok
