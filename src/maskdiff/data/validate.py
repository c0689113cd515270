"""pandera validation of every stage's parquet shards, streamed in record batches.

Each shard is read batch by batch (``pyarrow.parquet.ParquetFile.iter_batches``), so memory stays
bounded whatever the corpus size. Per batch a small pandas frame of per-row facts (id, lengths,
smallest and largest token id, ...) is checked by a pandera schema with ``lazy=True``; every
failure is collected into a :class:`ValidationReport` that names the file and the row within it.
A file that does not open or read (truncated, not parquet) is a failure naming that file.
Across batches, ``doc_id`` and ``block_id`` must be unique per split (one int64 per row is kept).

Documents and blocks are checked here; corruptions in :mod:`maskdiff.data.corruption_checks`.
:func:`validate_stage` dispatches on a finished folder's manifest.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow
import pyarrow.compute as pc

from maskdiff.config import DiffusionConfig
from maskdiff.data.corruption_checks import validate_corruptions
from maskdiff.data.stage import read_manifest
from maskdiff.data.validation_report import (
    Failure,
    StageValidationError,
    ValidationReport,
    check_frame,
    read_batches,
    report_duplicates,
    validate_splits,
)

__all__ = [
    "Failure",
    "StageValidationError",
    "ValidationReport",
    "validate_blocks",
    "validate_corruptions",
    "validate_documents",
    "validate_stage",
]


# ----------------------------------------------------------------------------- documents

_DOCUMENTS = pa.DataFrameSchema(
    {
        "doc_id": pa.Column("int64", pa.Check.ge(0), unique=True),
        "n_chars": pa.Column("int64", pa.Check.gt(0, error="text is non-empty")),
        "source": pa.Column(str, nullable=False),
    },
)


def validate_documents(folder: str | os.PathLike[str]) -> ValidationReport:
    """Documents: unique non-negative ``doc_id``, non-empty ``text``, a ``source``."""

    def per_split(split: str, files: list[Path], report: ValidationReport) -> None:
        ids = []
        for path in files:
            for offset, batch in read_batches(path, ["doc_id", "text", "source"], report):
                n_chars = pc.fill_null(pc.utf8_length(batch.column("text")), 0)
                frame = pd.DataFrame(
                    {
                        "doc_id": batch.column("doc_id").to_numpy(zero_copy_only=False),
                        "n_chars": n_chars.to_numpy(zero_copy_only=False).astype(np.int64),
                        "source": batch.column("source").to_pandas(),
                    },
                    index=pd.RangeIndex(offset, offset + batch.num_rows),
                )
                check_frame(_DOCUMENTS, frame, path.name, report)
                ids.append(frame["doc_id"].to_numpy())
                report.rows += batch.num_rows
        report_duplicates(ids, split, "doc_id", report)

    return validate_splits("documents", folder, per_split)


# ----------------------------------------------------------------------------- blocks


def _row_lengths_and_range(column: pyarrow.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a list column: (length, min id, max id) as int64 arrays; empty rows get -1."""
    if isinstance(column, pyarrow.ChunkedArray):
        column = column.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy().astype(np.int64)
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    n = len(lengths)
    lo, hi = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    if isinstance(column.type, pyarrow.FixedSizeListType) and column.type.list_size > 0:
        rows = flat.reshape(n, column.type.list_size)
        return lengths, rows.min(axis=1), rows.max(axis=1)
    nonempty = lengths > 0
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[nonempty]
    if len(flat):
        lo[nonempty] = np.minimum.reduceat(flat, starts)
        hi[nonempty] = np.maximum.reduceat(flat, starts)
    return lengths, lo, hi


def _blocks_schema(seq_len: int, vocab_size: int) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "block_id": pa.Column("int64", pa.Check.ge(0), unique=True),
            "length": pa.Column("int64", pa.Check.eq(seq_len, error=f"length == L={seq_len}")),
            "id_min": pa.Column("int64", pa.Check.ge(0, error="ids >= 0")),
            "id_max": pa.Column(
                "int64", pa.Check.lt(vocab_size, error=f"ids < vocab_size={vocab_size}")
            ),
            "n_bytes": pa.Column("int64", pa.Check.gt(0)),
        }
    )


def validate_blocks(
    folder: str | os.PathLike[str], seq_len: int, vocab_size: int
) -> ValidationReport:
    """Blocks: unique ``block_id``, exactly L ids in [0, vocab_size), ``n_bytes > 0``."""
    schema = _blocks_schema(seq_len, vocab_size)

    def per_split(split: str, files: list[Path], report: ValidationReport) -> None:
        ids = []
        for path in files:
            for offset, batch in read_batches(path, ["block_id", "input_ids", "n_bytes"], report):
                length, lo, hi = _row_lengths_and_range(batch.column("input_ids"))
                frame = pd.DataFrame(
                    {
                        "block_id": batch.column("block_id").to_numpy(zero_copy_only=False),
                        "length": length,
                        "id_min": lo,
                        "id_max": hi,
                        "n_bytes": batch.column("n_bytes").to_numpy(zero_copy_only=False),
                    },
                    index=pd.RangeIndex(offset, offset + batch.num_rows),
                ).astype({"n_bytes": "int64", "block_id": "int64"})
                check_frame(schema, frame, path.name, report)
                ids.append(frame["block_id"].to_numpy())
                report.rows += batch.num_rows
        report_duplicates(ids, split, "block_id", report)

    return validate_splits("blocks", folder, per_split)


# ----------------------------------------------------------------------------- dispatch


def validate_stage(stage_dir: str | os.PathLike[str]) -> ValidationReport:
    """Validate a finished stage folder with the parameters its manifest records."""
    manifest = read_manifest(stage_dir)
    stage, stats = manifest["stage"], manifest["stats"]
    if stage == "documents":
        return validate_documents(stage_dir)
    if stage == "blocks":
        return validate_blocks(stage_dir, stats["seq_len"], stats["vocab_size"])
    if stage == "corruptions":
        diffusion = DiffusionConfig.model_validate(manifest["config"]["diffusion"])
        return validate_corruptions(stage_dir, stats["seq_len"], diffusion)
    return ValidationReport(stage, Path(stage_dir))
