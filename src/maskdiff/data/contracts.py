"""The parquet data contracts between stages: column names, Arrow schemas, mask bit packing.

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
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = [
    "CORRUPTION_FORMAT",
    "MANIFEST",
    "SPLITS",
    "blocks_schema",
    "corruptions_schema",
    "documents_schema",
    "pack_mask",
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
