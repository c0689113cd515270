"""The parquet data contracts between stages: column names, Arrow schemas, and one reader each.

Every stage folder holds ``{split}-{shard:05d}.parquet`` files and a ``manifest.json`` written
last. ``split`` is one of :data:`SPLITS`. The pandera schemas that check these tables live in
:mod:`maskdiff.data.validate`; this module is the single definition both writers and readers import.

Documents   ``doc_id`` int64 (unique), ``text`` non-empty UTF-8 string, ``source`` string.
Blocks      ``block_id`` int64 (unique), ``input_ids`` fixed-size list of L int32 in [0, V),
            ``n_bytes`` int32 > 0 (UTF-8 bytes the block's tokens cover, for bits per byte).
Corruptions ``block_id`` int64, ``t`` float32 in (0, 1], ``T`` int32 (0 for continuous-time
            draws, else the size of the discrete grid), ``step`` int32 (i in 1..T, 0 when T=0),
            ``draw`` int32 (which of the K draws, or the epoch for training corruptions),
            ``mask`` fixed-size binary of ceil(L/8) bytes: bit l (little-endian bit order) = 1
            where token l is replaced by [M]. ``x_t = where(mask, [M], x0)`` is rebuilt by readers.

Every reader of these formats goes through here: :func:`read_blocks` for blocks and
:func:`mask_rows` / :func:`unpack_mask` for the mask column (manifests:
:func:`maskdiff.data.stage.read_manifest`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "CORRUPTION_FORMAT",
    "MANIFEST",
    "SPLITS",
    "Blocks",
    "blocks_schema",
    "corruptions_schema",
    "documents_schema",
    "mask_rows",
    "pack_mask",
    "read_blocks",
    "shard_name",
    "unpack_mask",
]

SPLITS: tuple[str, ...] = ("train", "validation", "test")
MANIFEST = "manifest.json"
# Written into every corruption manifest and schema: names the process whose masks these are,
# so later processes (uniform) can get their own format without breaking old stages.
CORRUPTION_FORMAT = "absorbing-bitmask-v1"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.parquet"


def documents_schema() -> pa.Schema:
    return pa.schema(
        [("doc_id", pa.int64()), ("text", pa.string()), ("source", pa.string())],
    )


def blocks_schema(seq_len: int) -> pa.Schema:
    return pa.schema(
        [
            ("block_id", pa.int64()),
            ("input_ids", pa.list_(pa.int32(), seq_len)),
            ("n_bytes", pa.int32()),
        ],
        metadata={b"seq_len": str(seq_len).encode()},
    )


def corruptions_schema(seq_len: int) -> pa.Schema:
    return pa.schema(
        [
            ("block_id", pa.int64()),
            ("t", pa.float32()),
            ("T", pa.int32()),
            ("step", pa.int32()),
            ("draw", pa.int32()),
            ("mask", pa.binary((seq_len + 7) // 8)),
        ],
        metadata={b"seq_len": str(seq_len).encode(), b"format": CORRUPTION_FORMAT.encode()},
    )


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """(N, L) bool -> (N, ceil(L/8)) uint8, little-endian bit order within each byte."""
    return np.packbits(mask.astype(bool), axis=-1, bitorder="little")


def unpack_mask(packed: np.ndarray, seq_len: int) -> np.ndarray:
    """(N, ceil(L/8)) uint8 -> (N, L) bool; the inverse of :func:`pack_mask`."""
    return np.unpackbits(packed, axis=-1, count=seq_len, bitorder="little").astype(bool)


def mask_rows(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The packed masks of a fixed-size binary column as (n, width) uint8 rows, read in place.

    The one reader of the ``mask`` column: a zero-copy view of the Arrow data buffer (a copy only
    when the column comes in several chunks). Null rows, which the contract forbids, read as the
    bytes under them. Unpack with :func:`unpack_mask`.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not isinstance(column.type, pa.FixedSizeBinaryType):
        raise TypeError(f"a mask column is fixed-size binary, not {column.type}")
    width, n = column.type.byte_width, len(column)
    buffer = column.buffers()[1]  # the buffers are validity, data
    if buffer is None:
        return np.zeros((n, width), dtype=np.uint8)
    data = np.frombuffer(buffer, dtype=np.uint8)
    start = column.offset * width
    return data[start : start + n * width].reshape(n, width)


@dataclass(frozen=True)
class Blocks:
    """Token blocks in memory, in the order their shards were read."""

    block_id: np.ndarray  # (n,) int64
    input_ids: np.ndarray  # (n, L) int32
    n_bytes: np.ndarray  # (n,) int32

    def __len__(self) -> int:
        return len(self.block_id)


def read_blocks(
    shards: Iterable[str | os.PathLike[str]],
    seq_len: int | None = None,
    max_blocks: int | None = None,
) -> Blocks:
    """The blocks of the given shard files, concatenated in the order given.

    ``seq_len``, when given, must be every shard's L (a mismatch is a ValueError naming the file);
    it also fixes the width when there is no shard. ``max_blocks`` keeps the first blocks of that
    order and stops reading once it has them. Pass ``list_shards(stage_dir, split)``
    (:mod:`maskdiff.data.stage`) for a split of a finished stage.
    """
    ids, bids, nbytes = [], [], []
    width, taken = seq_len, 0
    for shard in shards:
        if max_blocks is not None and taken >= max_blocks:
            break
        table = pq.read_table(shard, columns=["block_id", "input_ids", "n_bytes"])
        if max_blocks is not None:
            table = table.slice(0, max_blocks - taken)
        col = table.column("input_ids").combine_chunks()
        if width is not None and col.type.list_size != width:
            want = f"data.seq_len is {seq_len}" if seq_len else f"earlier shards hold {width}"
            raise ValueError(f"{shard}: blocks of {col.type.list_size} tokens, but {want}")
        width = col.type.list_size
        ids.append(col.flatten().to_numpy().reshape(-1, width))
        bids.append(table.column("block_id").to_numpy())
        nbytes.append(table.column("n_bytes").to_numpy())
        taken += table.num_rows
    if not ids:
        empty = np.zeros(0, dtype=np.int32)
        return Blocks(np.zeros(0, np.int64), np.zeros((0, width or 0), np.int32), empty)
    return Blocks(
        np.concatenate(bids).astype(np.int64, copy=False),
        np.concatenate(ids).astype(np.int32, copy=False),
        np.concatenate(nbytes).astype(np.int32, copy=False),
    )
