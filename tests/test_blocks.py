"""Token blocks: packing invariants, bytes, shards, sharded tokenization."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from maskdiff.config import DataConfig, TokenizerConfig
from maskdiff.data.blocks import build_blocks
from maskdiff.data.contracts import SPLITS, read_blocks
from maskdiff.data.ingest import ingest_documents
from maskdiff.data.stage import StageError, list_shards
from maskdiff.data.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> tuple[DataConfig, Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    data = DataConfig(builtin="pydoc", seq_len=64, shard_rows=300, root=str(root))
    docs = ingest_documents(data).path
    tok = train_tokenizer(TokenizerConfig(vocab_size=512), docs, root).path
    return data, docs, tok


def _doc_texts(docs: Path, split: str) -> list[str]:
    return [t for s in list_shards(docs, split) for t in pq.read_table(s)["text"].to_pylist()]


def test_blocks_equal_the_eos_joined_stream(stages) -> None:
    data, docs, tok_dir = stages
    res = build_blocks(data, docs, tok_dir)
    tok = load_tokenizer(tok_dir)
    stats = res.manifest["stats"]
    assert (stats["seq_len"], stats["vocab_size"], stats["mask_id"]) == (64, 512, 512)
    for split in SPLITS:
        texts = _doc_texts(docs, split)
        stream = np.array([i for ids in tok.encode(texts) for i in [*ids, tok.eos_id]])
        blocks = read_blocks(list_shards(res.path, split), 64)
        ids, n_bytes = blocks.input_ids, blocks.n_bytes
        s = stats["splits"][split]
        assert ids.shape == (s["blocks"], 64)
        assert s["remainder_tokens"] == len(stream) - ids.size < 64
        np.testing.assert_array_equal(ids.reshape(-1), stream[: ids.size])
        # bytes: every UTF-8 byte of the split plus one per EOS, the remainder's bytes aside
        total = sum(len(t.encode()) for t in texts) + len(texts)
        remainder = int(tok.token_bytes()[stream[ids.size :]].sum())
        assert int(n_bytes.sum()) + remainder == total == s["bytes"] + remainder
        assert (n_bytes > 0).all()
        block_ids = np.concatenate(
            [pq.read_table(p)["block_id"].to_numpy() for p in list_shards(res.path, split)]
        )
        np.testing.assert_array_equal(block_ids, np.arange(s["blocks"]))


def test_shards_are_bounded_and_zstd(stages) -> None:
    data, docs, tok_dir = stages
    res = build_blocks(data, docs, tok_dir)
    shards = list_shards(res.path, "train")
    assert len(shards) == res.manifest["stats"]["splits"]["train"]["shards"] > 1
    rows = [pq.ParquetFile(p).metadata.num_rows for p in shards]
    assert max(rows) == 300 and all(r <= 300 for r in rows)
    assert pq.ParquetFile(shards[0]).metadata.row_group(0).column(1).compression == "ZSTD"


def test_parallel_map_gives_identical_stage(stages, tmp_path: Path) -> None:
    data, docs, tok_dir = stages
    serial = build_blocks(data, docs, tok_dir)
    with ThreadPoolExecutor(2) as pool:
        parallel = build_blocks(data, docs, tok_dir, root=tmp_path, map_fn=pool.map)
    assert parallel.content_hash == serial.content_hash
    assert parallel.path.name == serial.path.name and parallel.path != serial.path


def test_rerun_reuses_and_seq_len_change_makes_new_folder(stages) -> None:
    data, docs, tok_dir = stages
    first = build_blocks(data, docs, tok_dir)
    again = build_blocks(data, docs, tok_dir)
    assert again.reused and again.path == first.path
    other = build_blocks(data.model_copy(update={"seq_len": 32}), docs, tok_dir)
    assert other.path != first.path and other.manifest["stats"]["seq_len"] == 32


def test_train_split_shorter_than_a_block_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("just a few words")
    data = DataConfig(
        source="local",
        paths=[str(tmp_path / "c.txt")],
        seq_len=512,
        val_fraction=0.0,
        test_fraction=0.0,
        root=str(tmp_path / "runs"),
    )
    docs = ingest_documents(data).path
    tok = train_tokenizer(TokenizerConfig(kind="char"), docs, data.root).path
    with pytest.raises(StageError, match="fewer than data.seq_len=512"):
        build_blocks(data, docs, tok)
    assert not list(Path(data.root).glob("blocks-*"))
