"""Token blocks: documents -> ids -> joined with EOS -> fixed blocks of L tokens in parquet.

Per split, every document's ids are followed by one EOS and the documents are concatenated in
stored order into one token stream; the stream is cut into consecutive blocks of exactly
``L = data.seq_len`` tokens (no padding). Only the final ``< L`` tokens of each split are
dropped, and counted as ``remainder_tokens`` in the manifest.

``n_bytes`` of a block is the sum over its tokens of the UTF-8 bytes each token stands for
(:meth:`maskdiff.data.tokenizer.Tokenizer.token_bytes`; EOS counts as one byte, the document
separator), so the bytes of all blocks plus the remainder equal the corpus bytes plus one per
document, whatever the tokenizer: bits per byte stay comparable across tokenizers.

Tokenization is sharded: :func:`tokenize_shard` turns one documents shard into its token
stream and is what a task runner maps over workers (``map_fn``); packing is a cheap ordered pass.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from maskdiff.config import DataConfig
from maskdiff.data.contracts import SPLITS, blocks_schema, shard_name
from maskdiff.data.stage import (
    StageError,
    StageResult,
    build_stage,
    list_shards,
    read_manifest,
    write_parquet,
)
from maskdiff.data.tokenizer import Tokenizer, load_tokenizer
from maskdiff.data.validate import validate_blocks

__all__ = ["BlockWriter", "build_blocks", "tokenize_shard"]

_READ_ROWS = 2048  # documents per encode_batch call


@lru_cache(maxsize=4)
def _cached_tokenizer(stage_dir: str) -> Tokenizer:
    return load_tokenizer(stage_dir)


def tokenize_shard(tokenizer_dir: str, shard: str) -> np.ndarray:
    """One documents shard -> its token stream, (n_tokens,) int32, EOS after every document."""
    tok = _cached_tokenizer(str(tokenizer_dir))
    eos = [tok.eos_id]
    parts: list[np.ndarray] = []
    try:
        for batch in pq.ParquetFile(shard).iter_batches(columns=["text"], batch_size=_READ_ROWS):
            ids = tok.encode(batch.column(0).to_pylist())
            total = sum(len(x) for x in ids) + len(ids)
            flat = itertools.chain.from_iterable(
                itertools.chain.from_iterable((x, eos) for x in ids)
            )
            parts.append(np.fromiter(flat, dtype=np.int32, count=total))
    except (pa.ArrowException, OSError) as exc:
        raise StageError(
            f"{shard}: unreadable documents shard ({exc}); the documents stage is damaged: "
            "delete its folder and run again"
        ) from exc
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


class BlockWriter:
    """Cuts a token stream into (N, L) blocks and writes shards of ``shard_rows`` blocks."""

    def __init__(
        self, folder: Path, split: str, seq_len: int, shard_rows: int, token_bytes: np.ndarray
    ) -> None:
        self.folder, self.split, self.L, self.shard_rows = folder, split, seq_len, shard_rows
        self.token_bytes = token_bytes
        self.carry = np.zeros(0, dtype=np.int32)
        self.pending: list[np.ndarray] = []
        self.n_pending = self.blocks = self.shards = self.bytes = 0
        self.schema = blocks_schema(seq_len)

    def add(self, stream: np.ndarray) -> None:
        """Append tokens; full blocks are queued, the tail waits for the next call."""
        stream = np.concatenate([self.carry, stream])
        n_full = len(stream) // self.L
        self.carry = stream[n_full * self.L :]
        if n_full:
            self.pending.append(stream[: n_full * self.L].reshape(n_full, self.L))
            self.n_pending += n_full
        while self.n_pending >= self.shard_rows:
            self._write(self.shard_rows)

    def close(self) -> int:
        """Write what is queued; returns the dropped remainder (tokens, < L)."""
        while self.n_pending:
            self._write(min(self.n_pending, self.shard_rows))
        return len(self.carry)

    def _write(self, n: int) -> None:
        queued = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        ids, rest = queued[:n], queued[n:]
        self.pending, self.n_pending = ([rest] if len(rest) else []), len(rest)
        n_bytes = self.token_bytes[ids].sum(axis=1, dtype=np.int64)  # (n,)
        flat = pa.array(ids.reshape(-1), type=pa.int32())
        table = pa.Table.from_arrays(
            [
                pa.array(np.arange(self.blocks, self.blocks + n, dtype=np.int64)),
                pa.FixedSizeListArray.from_arrays(flat, self.L),
                pa.array(n_bytes.astype(np.int32)),
            ],
            schema=self.schema,
        )
        write_parquet(table, self.folder / shard_name(self.split, self.shards))
        self.blocks += n
        self.shards += 1
        self.bytes += int(n_bytes.sum())


def _pack_split(
    writer: BlockWriter, streams: Iterable[np.ndarray], tok: Tokenizer
) -> dict[str, int]:
    tokens = unk = 0
    for stream in streams:
        tokens += len(stream)
        if tok.unk_id is not None:
            unk += int(np.count_nonzero(stream == tok.unk_id))
        writer.add(stream)
    remainder = writer.close()
    return {
        "blocks": writer.blocks,
        "tokens": writer.blocks * writer.L,
        "stream_tokens": tokens,
        "remainder_tokens": remainder,
        "bytes": writer.bytes,
        "unk_tokens": unk,
        "shards": writer.shards,
    }


def build_blocks(
    cfg: DataConfig,
    documents: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    map_fn: Callable[..., Iterator[np.ndarray]] = map,
    validate: bool = True,
) -> StageResult:
    """Build (or reuse) the ``blocks`` stage from documents and tokenizer stage folders.

    ``map_fn(tokenize_shard, tokenizer_dirs, shard_paths)`` must yield streams in shard order
    (the builtin ``map`` or ``Executor.map``). The manifest's ``stats`` hold ``seq_len``,
    ``vocab_size``, ``eos_id``, ``mask_id``, ``tokenizer_hash`` and per split ``blocks``,
    ``tokens``, ``bytes``, ``remainder_tokens``, ``unk_tokens``.
    """
    documents, tokenizer = Path(documents), Path(tokenizer)
    tok_hash = read_manifest(tokenizer)["content_hash"]
    inputs = {"documents": read_manifest(documents)["content_hash"], "tokenizer": tok_hash}
    config = {"seq_len": cfg.seq_len, "shard_rows": cfg.shard_rows}

    def build(folder: Path) -> dict[str, Any]:
        tok = load_tokenizer(tokenizer)
        table = tok.token_bytes()
        splits = {}
        for split in SPLITS:
            shards = [str(p) for p in list_shards(documents, split)]
            writer = BlockWriter(folder, split, cfg.seq_len, cfg.shard_rows, table)
            streams = map_fn(tokenize_shard, [str(tokenizer)] * len(shards), shards)
            splits[split] = _pack_split(writer, streams, tok)
        if splits["train"]["blocks"] == 0:
            raise StageError(
                f"the train split has {splits['train']['stream_tokens']} tokens, fewer than "
                f"data.seq_len={cfg.seq_len}: no training block"
            )
        stats: dict[str, Any] = {
            "seq_len": cfg.seq_len,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "mask_id": tok.mask_id,
            "tokenizer_hash": tok_hash,
            "splits": splits,
        }
        if validate:
            report = validate_blocks(folder, cfg.seq_len, tok.vocab_size)
            report.raise_if_failed()
            stats["timings"] = {"validate_s": report.seconds}
        return stats

    return build_stage("blocks", root or cfg.root, config, inputs, build)
