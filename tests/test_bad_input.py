"""The bad-input matrix: every unusable input fails loudly, names what is wrong, and harms nothing.

One row per case. Each asserts the exception type, that the message names the offending file,
row or config key, and that every file already written (a finished data root with all four
stages and a training run) is byte-identical before and after the failing call.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
import torch
from helpers import CPU, SMOKE, build_stages, disk_full_after_one_shard
from helpers import smoke_config as smoke_preset
from tokenizers import models

from maskdiff.checkpoint import CheckpointError
from maskdiff.config import Config, ConfigError, load_config
from maskdiff.data.blocks import build_blocks
from maskdiff.data.corrupt import build_corruptions
from maskdiff.data.ingest import IngestError, ingest_documents
from maskdiff.data.stage import StageError, list_shards, read_manifest
from maskdiff.data.tokenizer import TokenizerError, train_tokenizer
from maskdiff.data.validate import StageValidationError, validate_stage
from maskdiff.train import train


@dataclass(frozen=True)
class Built:
    """A finished data root: the four stages and one training run folder with checkpoints."""

    root: Path
    cfg: Config
    documents: Path
    tokenizer: Path
    blocks: Path
    corruptions: Path
    run: Path


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder`` (lock files are empty markers)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def smoke_config(root: Path, *overrides: str) -> Config:
    """The smoke preset on the CPU, one thread."""
    return smoke_preset(root, *CPU, *overrides)


def build_all(root: Path) -> Built:
    cfg = smoke_config(root)
    docs, tok, blocks, corr = (stage.path for stage in build_stages(cfg, root))
    run = root / "train" / "mdm-run"
    stats = read_manifest(blocks)["stats"]
    train(
        cfg,
        blocks,
        run,
        vocab_size=stats["vocab_size"],
        corruptions_dir=corr,
        tokenizer_hash=stats["tokenizer_hash"],
    )
    return Built(root, cfg, docs, tok, blocks, corr, run)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_all(tmp_path_factory.mktemp("bad-input") / "runs")


def fails_without_harm(
    watched: Path, call: Callable[[], object], error: type[BaseException], *named: str
) -> str:
    """Run ``call``; it must raise ``error`` whose message holds every string of ``named``, and
    leave every file under ``watched`` as it was. Returns the message."""
    before = snapshot(watched)
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for part in named:
        assert part in message, f"{part!r} not in: {message}"
    assert snapshot(watched) == before, "a failing call changed files already written"
    assert not list(watched.rglob("*.tmp-*")), "a half-written stage was left behind"
    return message


def write_yaml(tmp_path: Path, root: Path, body: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(f"data:\n  root: {root}\n{body}", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- config


def test_unknown_config_key_names_key_and_file(built: Built, tmp_path: Path) -> None:
    bad = write_yaml(tmp_path, built.root, "train:\n  max_stepz: 10\n")
    fails_without_harm(
        built.root,
        lambda: load_config(bad),
        ConfigError,
        str(bad),
        "train.max_stepz",
        "unknown key",
    )
    fails_without_harm(
        built.root,
        lambda: load_config(SMOKE, ["model.widht=3"]),
        ConfigError,
        "--set",
        "model.widht",
    )


def test_the_command_line_reports_a_config_error_before_any_work(
    built: Built, tmp_path: Path
) -> None:
    from flows.cli import main

    bad = write_yaml(tmp_path, built.root, "train:\n  max_stepz: 10\n")
    message = fails_without_harm(
        built.root, lambda: main(["run", "--config", str(bad)]), SystemExit, "train.max_stepz"
    )
    assert message.startswith("maskdiff: config error:") and str(bad) in message


def test_wrong_type_names_key(built: Built, tmp_path: Path) -> None:
    bad = write_yaml(tmp_path, built.root, "train:\n  lr: fast\n")
    fails_without_harm(built.root, lambda: load_config(bad), ConfigError, str(bad), "train.lr")


@pytest.mark.parametrize(
    "key",
    [
        "data.seq_len=0",
        "data.shard_rows=-1",
        "train.batch_size=0",
        "model.d_model=-8",
        "tokenizer.vocab_size=0",
        "corruption.eval_draws=0",
        "diffusion.T=[10, 0]",
    ],
)
def test_negative_or_zero_sizes_name_key(built: Built, key: str) -> None:
    name = key.split("=")[0]
    fails_without_harm(built.root, lambda: smoke_config(built.root, key), ConfigError, name)


def test_sequence_longer_than_the_model_takes(built: Built) -> None:
    fails_without_harm(
        built.root,
        lambda: smoke_config(built.root, "data.seq_len=128"),
        ConfigError,
        "data.seq_len=128",
        "model.max_seq_len=64",
    )


# ----------------------------------------------------------------------------- corpora


def _local(built: Built, *paths: Path | str, unit: str = "paragraph") -> Config:
    return smoke_config(
        built.root,
        "data.source=local",
        f"data.paths={[str(p) for p in paths]}",
        f"data.text_unit={unit}",
    )


@pytest.mark.parametrize(
    ("content", "unit", "says"),
    [
        (b"", "paragraph", "no documents"),
        (b"\n\n   \n\t\n\n", "line", "no documents"),
        (bytes(range(128, 256)) * 8, "paragraph", "not UTF-8"),
    ],
    ids=["empty-corpus", "only-empty-lines", "non-utf8-bytes"],
)
def test_unusable_corpus_names_the_file(
    built: Built, tmp_path: Path, content: bytes, unit: str, says: str
) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    cfg = _local(built, path, unit=unit)
    fails_without_harm(built.root, lambda: ingest_documents(cfg.data), IngestError, str(path), says)


def test_missing_local_path_is_named(built: Built, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "corpus.txt"
    cfg = _local(built, missing)
    fails_without_harm(
        built.root, lambda: ingest_documents(cfg.data), IngestError, str(missing), "does not exist"
    )


def test_hub_dataset_offline_says_how_to_go_local(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = smoke_config(built.root, "data.source=hub", "data.hub_name=nobody/no-such-corpus")
    fails_without_harm(
        built.root,
        lambda: ingest_documents(cfg.data),
        IngestError,
        "nobody/no-such-corpus",
        "data.source=local",
    )


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_file_that_does_not_parse(built: Built, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text('{"version": "1.0", "model": ', encoding="utf-8")
    cfg = smoke_config(built.root, "tokenizer.kind=file", f"tokenizer.path={path}")
    fails_without_harm(
        built.root,
        lambda: train_tokenizer(cfg.tokenizer, built.documents, built.root),
        TokenizerError,
        str(path),
        "not a valid tokenizer.json",
    )


def test_tokenizer_vocabulary_larger_than_configured(built: Built, tmp_path: Path) -> None:
    vocab = {f"w{i}": i for i in range(100)} | {"[UNK]": 100}
    path = tmp_path / "big.json"
    tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")).save(str(path))
    cfg = smoke_config(
        built.root, "tokenizer.kind=file", f"tokenizer.path={path}", "tokenizer.vocab_size=64"
    )
    fails_without_harm(
        built.root,
        lambda: train_tokenizer(cfg.tokenizer, built.documents, built.root),
        TokenizerError,
        str(path),
        "tokenizer.vocab_size=64",
    )


def test_blocks_vocabulary_larger_than_the_checkpoint_model(built: Built) -> None:
    stats = read_manifest(built.blocks)["stats"]
    bigger = stats["vocab_size"] + 5
    fails_without_harm(
        built.root,
        lambda: train(
            built.cfg,
            built.blocks,
            built.run,
            vocab_size=bigger,
            corruptions_dir=built.corruptions,
            tokenizer_hash=stats["tokenizer_hash"],
        ),
        CheckpointError,
        str(built.run),
        "vocab_size",
        str(bigger),
    )


# ----------------------------------------------------------------------------- damaged shards


def _damaged_copy(stage: Path, tmp_path: Path) -> Path:
    copy = tmp_path / stage.name
    shutil.copytree(stage, copy)
    return copy


def test_truncated_blocks_shard_is_named_by_validation(built: Built, tmp_path: Path) -> None:
    folder = _damaged_copy(built.blocks, tmp_path)
    shard = list_shards(folder, "train")[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    fails_without_harm(
        tmp_path,
        lambda: validate_stage(folder).raise_if_failed(),
        StageValidationError,
        shard.name,
        "readable parquet",
    )


def test_truncated_documents_shard_is_named_when_tokenizing(built: Built, tmp_path: Path) -> None:
    docs = _damaged_copy(built.documents, tmp_path)
    shard = list_shards(docs, "train")[0]
    shard.write_bytes(shard.read_bytes()[:100])
    cfg = smoke_config(built.root, "data.seq_len=16")  # a blocks stage not built yet
    fails_without_harm(
        built.root,
        lambda: build_blocks(cfg.data, docs, built.tokenizer),
        StageError,
        str(shard),
        "unreadable documents shard",
    )
    assert not [p for p in built.root.glob("blocks-*") if p != built.blocks]


def test_token_id_out_of_range_names_file_and_row(built: Built, tmp_path: Path) -> None:
    folder = _damaged_copy(built.blocks, tmp_path)
    vocab = read_manifest(folder)["stats"]["vocab_size"]
    shard = list_shards(folder, "train")[0]
    table = pq.read_table(shard)
    ids = table.column("input_ids").combine_chunks()
    flat = ids.flatten().to_numpy().copy()
    L = ids.type.list_size
    flat[3 * L + 5] = vocab  # row 3
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int32()), L)
    pq.write_table(table.set_column(1, "input_ids", column), shard)
    fails_without_harm(
        tmp_path,
        lambda: validate_stage(folder).raise_if_failed(),
        StageValidationError,
        f"{shard.name} row 3",
        f"vocab_size={vocab}",
    )


def test_corruption_shard_with_wrong_masking_rate(built: Built, tmp_path: Path) -> None:
    folder = _damaged_copy(built.corruptions, tmp_path)
    shard = list_shards(folder, "validation")[0]
    table = pq.read_table(shard)
    width = table.schema.field("mask").type.byte_width
    none_masked = pa.array([bytes(width)] * table.num_rows, pa.binary(width))
    pq.write_table(
        table.set_column(table.schema.get_field_index("mask"), "mask", none_masked), shard
    )
    fails_without_harm(
        tmp_path,
        lambda: validate_stage(folder).raise_if_failed(),
        StageValidationError,
        shard.name,
        "masked fraction",
    )


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_from_another_config_names_the_keys(built: Built) -> None:
    other = smoke_config(built.root, "model.d_model=64", "train.lr=0.01")
    stats = read_manifest(built.blocks)["stats"]
    fails_without_harm(
        built.root,
        lambda: train(
            other,
            built.blocks,
            built.run,
            vocab_size=stats["vocab_size"],
            corruptions_dir=built.corruptions,
            tokenizer_hash=stats["tokenizer_hash"],
        ),
        CheckpointError,
        str(built.run),
        "model.d_model",
        "train.lr",
    )


@pytest.mark.parametrize(
    "content",
    [b"these bytes are not a checkpoint", "torch-without-header"],
    ids=["garbage-bytes", "torch-file-without-header"],
)
def test_checkpoint_file_that_is_not_a_checkpoint(
    built: Built, tmp_path: Path, content: bytes | str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(built.run, run)
    bad = run / "ckpt-99999999.pt"  # the newest: the one a resume reads
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        torch.save({"step": 3, "weights": torch.zeros(2)}, bad)
    stats = read_manifest(built.blocks)["stats"]
    fails_without_harm(
        tmp_path,
        lambda: train(
            built.cfg,
            built.blocks,
            run,
            vocab_size=stats["vocab_size"],
            corruptions_dir=built.corruptions,
            tokenizer_hash=stats["tokenizer_hash"],
        ),
        CheckpointError,
        str(bad),
        "checkpoint",
    )


# ----------------------------------------------------------------------------- disk full


@contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[bool]:
    """A tmpfs of ``size`` at ``path`` when this process may mount one (root), else a plain
    folder; yields whether the mount happened."""
    path.mkdir(parents=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            timeout=10,
            check=False,
        )
        mounted = done.returncode == 0
    except OSError:
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(
                ["umount", "-l", str(path)], capture_output=True, timeout=10, check=False
            )


def _fill(folder: Path) -> None:
    """Write a filler file until the filesystem refuses more bytes."""
    with open(folder / "filler.bin", "wb", buffering=0) as fh:
        chunk = b"\0" * 4096
        try:
            while True:
                fh.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_disk_full_while_writing_a_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a real 8 MiB tmpfs filled up (as root), or with ENOSPC injected into the blocks writer
    after its first shard where mounting is not permitted."""
    with small_filesystem(tmp_path / "disk", "8m") as mounted:
        root = tmp_path / "disk" / "runs"
        cfg = smoke_config(root)
        docs = ingest_documents(cfg.data).path
        tok = train_tokenizer(cfg.tokenizer, docs, root).path
        blocks = build_blocks(cfg.data, docs, tok).path
        if mounted:
            _fill(root)
        else:
            disk_full_after_one_shard(monkeypatch)
        other = smoke_config(root, "data.seq_len=16", "data.shard_rows=8")
        fails_without_harm(
            root,
            lambda: build_blocks(other.data, docs, tok),
            StageError,
            "stage 'blocks'",
            str(root),
            "no space left",
        )
        assert [p.name for p in root.glob("blocks-*")] == [blocks.name]
        assert not list(root.glob(".blocks-*.tmp-*"))
        assert validate_stage(blocks).ok  # the finished stage still reads and validates
        if mounted:
            (root / "filler.bin").unlink()
            rebuilt = build_blocks(other.data, docs, tok)  # space again: the same command works
            assert validate_stage(rebuilt.path).ok


def test_a_partial_stage_folder_is_never_read(built: Built, tmp_path: Path) -> None:
    """A stage folder without a manifest (a crash before publishing) is refused by name."""
    partial = tmp_path / built.blocks.name
    shutil.copytree(built.blocks, partial)
    (partial / "manifest.json").unlink()
    cfg = smoke_config(tmp_path)
    fails_without_harm(
        tmp_path,
        lambda: build_corruptions(cfg.corruption, cfg.diffusion, partial, tmp_path),
        StageError,
        str(partial),
        "unfinished",
    )
    assert not list(tmp_path.glob("corruptions-*")), "a partial corruption stage was published"
