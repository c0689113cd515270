"""pandera validation of every stage's parquet shards, streamed in record batches.

Each shard is read batch by batch (``pyarrow.parquet.ParquetFile.iter_batches``), so memory stays
bounded whatever the corpus size. Per batch a small pandas frame of per-row facts (id, lengths,
smallest and largest token id, t, ...) is checked by a pandera schema with ``lazy=True``; every
failure is collected into a :class:`ValidationReport` that names the file and the row within it.
A file that does not open or read (truncated, not parquet) is a failure naming that file.

Checks across batches: unique ``doc_id`` / ``block_id`` per split (one int64 per row is kept),
and for corruptions the masked fraction per (file, t bin) against ``1 - alpha(t)``: with
expected count ``E = sum_rows L p(t)`` and variance ``V = sum_rows L p (1 - p)`` the bin fails
when ``|masked - E| > Z_TOL sqrt(V) + 1``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pandera.errors import SchemaError, SchemaErrors

from maskdiff.config import DiffusionConfig
from maskdiff.contracts import SPLITS
from maskdiff.schedule import make_schedule
from maskdiff.stage import read_manifest

__all__ = [
    "Failure",
    "StageValidationError",
    "ValidationReport",
    "validate_blocks",
    "validate_corruptions",
    "validate_documents",
    "validate_stage",
]

BATCH_ROWS = 1 << 18
Z_TOL = 5.0
N_BINS = 20


class StageValidationError(ValueError):
    """A stage's data broke its contract; the message lists failures by file and row."""


@dataclass(frozen=True)
class Failure:
    file: str
    row: int | None
    column: str | None
    check: str
    value: str

    def __str__(self) -> str:
        where = self.file if self.row is None else f"{self.file} row {self.row}"
        col = f" column {self.column}" if self.column else ""
        return f"{where}{col}: failed {self.check} (value {self.value})"


@dataclass
class ValidationReport:
    stage: str
    folder: Path
    rows: int = 0
    seconds: float = 0.0
    failures: list[Failure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self, limit: int = 20) -> str:
        head = f"{self.stage} at {self.folder}: {self.rows} rows, {len(self.failures)} failures"
        lines = [str(f) for f in self.failures[:limit]]
        if len(self.failures) > limit:
            lines.append(f"... and {len(self.failures) - limit} more")
        return "\n".join([head, *lines])

    def raise_if_failed(self) -> None:
        if self.failures:
            raise StageValidationError(self.summary())


# ----------------------------------------------------------------------------- plumbing


def _batches(
    path: Path, columns: list[str], report: ValidationReport
) -> Iterator[tuple[int, pyarrow.RecordBatch]]:
    """(first row, batch) of a shard; an unreadable file becomes a failure naming it."""
    offset = 0
    try:
        pf = pq.ParquetFile(path)
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            report.failures.append(
                Failure(path.name, None, ",".join(missing), "has column", "missing")
            )
            return
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            yield offset, batch
            offset += batch.num_rows
    except (pyarrow.ArrowException, OSError) as exc:
        report.failures.append(
            Failure(path.name, offset or None, None, "readable parquet", str(exc))
        )


def _check(
    schema: pa.DataFrameSchema, frame: pd.DataFrame, name: str, report: ValidationReport
) -> None:
    """Validate lazily; every failure case becomes a :class:`Failure` (index = file row)."""
    try:
        schema.validate(frame, lazy=True)
    except SchemaErrors as exc:
        for case in exc.failure_cases.itertuples(index=False):
            row = None if pd.isna(case.index) else int(case.index)
            report.failures.append(
                Failure(name, row, case.column, str(case.check), str(case.failure_case))
            )
    except SchemaError as exc:  # pragma: no cover - lazy mode raises SchemaErrors
        report.failures.append(Failure(name, None, None, "schema", str(exc)))


def _int64(column: pyarrow.Array) -> np.ndarray:
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.int64)


def _duplicates(ids: list[np.ndarray], split: str, column: str, report: ValidationReport) -> None:
    if not ids:
        return
    values, counts = np.unique(np.concatenate(ids), return_counts=True)
    for value in values[counts > 1][:100]:
        report.failures.append(
            Failure(f"{split}-*", None, column, "unique across shards", str(value))
        )


def _run(
    stage: str,
    folder: str | os.PathLike[str],
    per_split: Callable[[str, list[Path], ValidationReport], None],
) -> ValidationReport:
    start = time.perf_counter()
    report = ValidationReport(stage, Path(folder))
    for split in SPLITS:
        files = sorted(Path(folder).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].parquet"))
        per_split(split, files, report)
    report.seconds = round(time.perf_counter() - start, 4)
    return report


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
            for offset, batch in _batches(path, ["doc_id", "text", "source"], report):
                n_chars = pc.fill_null(pc.utf8_length(batch.column("text")), 0)
                frame = pd.DataFrame(
                    {
                        "doc_id": batch.column("doc_id").to_numpy(zero_copy_only=False),
                        "n_chars": n_chars.to_numpy(zero_copy_only=False).astype(np.int64),
                        "source": batch.column("source").to_pandas(),
                    },
                    index=pd.RangeIndex(offset, offset + batch.num_rows),
                )
                _check(_DOCUMENTS, frame, path.name, report)
                ids.append(frame["doc_id"].to_numpy())
                report.rows += batch.num_rows
        _duplicates(ids, split, "doc_id", report)

    return _run("documents", folder, per_split)


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
            for offset, batch in _batches(path, ["block_id", "input_ids", "n_bytes"], report):
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
                _check(schema, frame, path.name, report)
                ids.append(frame["block_id"].to_numpy())
                report.rows += batch.num_rows
        _duplicates(ids, split, "block_id", report)

    return _run("blocks", folder, per_split)


# ----------------------------------------------------------------------------- corruptions


def _corruptions_schema(seq_len: int) -> pa.DataFrameSchema:
    width = (seq_len + 7) // 8
    return pa.DataFrameSchema(
        {
            "block_id": pa.Column("int64", pa.Check.ge(0)),
            "t": pa.Column("float64", [pa.Check.gt(0.0), pa.Check.le(1.0)]),
            "T": pa.Column("int64", pa.Check.ge(0)),
            "step": pa.Column("int64", pa.Check.ge(0)),
            "draw": pa.Column("int64", pa.Check.ge(0)),
            "mask_bytes": pa.Column("int64", pa.Check.eq(width, error=f"mask is {width} bytes")),
        },
        checks=[
            pa.Check(lambda df: df["step"] <= df["T"], error="step <= T"),
            pa.Check(lambda df: (df["T"] == 0) == (df["step"] == 0), error="step == 0 iff T == 0"),
        ],
    )


_RATE_SCHEMA = pa.DataFrameSchema(
    {"z": pa.Column("float64", pa.Check.le(Z_TOL, error=f"masked fraction within {Z_TOL} sd"))}
)


def _mask_counts(column: pyarrow.Array) -> tuple[np.ndarray, np.ndarray]:
    """(bytes per mask, masked positions per row) of a binary column; both (rows,) int64."""
    if isinstance(column, pyarrow.ChunkedArray):
        column = column.combine_chunks()
    lengths = pc.fill_null(pc.binary_length(column), 0).to_numpy().astype(np.int64)
    if isinstance(column.type, pyarrow.FixedSizeBinaryType):
        width = column.type.byte_width
        data = np.frombuffer(column.buffers()[-1], dtype=np.uint8)
        start = column.offset * width
        rows = data[start : start + len(column) * width].reshape(len(column), width)
        if width % 8 == 0:
            rows = rows.view(np.uint64)
        return lengths, np.bitwise_count(rows).sum(axis=1, dtype=np.int64)
    # variable-width masks (a broken writer): count row by row
    counts = [np.bitwise_count(np.frombuffer(v or b"", np.uint8)).sum() for v in column.to_pylist()]
    return lengths, np.asarray(counts, dtype=np.int64)


def _rate_failures(
    name: str, t: np.ndarray, masked: np.ndarray, p: np.ndarray, seq_len: int
) -> pd.DataFrame:
    """Per t bin of one file: observed masked tokens vs the binomial expectation, as z."""
    bins = np.minimum((t * N_BINS).astype(np.int64), N_BINS - 1)
    obs = np.bincount(bins, weights=masked, minlength=N_BINS)
    exp = np.bincount(bins, weights=p * seq_len, minlength=N_BINS)
    var = np.bincount(bins, weights=p * (1 - p) * seq_len, minlength=N_BINS)
    z = np.abs(obs - exp) / (np.sqrt(var) + 1.0 / Z_TOL)
    used = np.bincount(bins, minlength=N_BINS) > 0
    labels = [f"t in [{b / N_BINS:.2f}, {(b + 1) / N_BINS:.2f})" for b in range(N_BINS)]
    return pd.DataFrame({"z": z[used]}, index=np.array(labels)[used])


def validate_corruptions(
    folder: str | os.PathLike[str], seq_len: int, diffusion: DiffusionConfig
) -> ValidationReport:
    """Corruptions: t in (0, 1], step/T consistent, mask of ceil(L/8) bytes, masking rates."""
    schedule = make_schedule(diffusion)
    schema = _corruptions_schema(seq_len)
    cols = ["block_id", "t", "T", "step", "draw", "mask"]

    def per_split(split: str, files: list[Path], report: ValidationReport) -> None:
        for path in files:
            ts, masked = [], []
            for offset, batch in _batches(path, cols, report):
                width, count = _mask_counts(batch.column("mask"))
                frame = pd.DataFrame(
                    {c: _int64(batch.column(c)) for c in cols[:-1] if c != "t"}
                    | {"t": batch.column("t").to_numpy(zero_copy_only=False).astype(np.float64)}
                    | {"mask_bytes": width},
                    index=pd.RangeIndex(offset, offset + batch.num_rows),
                )
                _check(schema, frame, path.name, report)
                ok = (frame["t"] > 0).to_numpy() & (frame["t"] <= 1).to_numpy()
                ts.append(frame["t"].to_numpy()[ok])
                masked.append(count[ok])
                report.rows += batch.num_rows
            if ts:
                t = np.concatenate(ts)
                p = schedule.one_minus_alpha(torch.from_numpy(t)).numpy()  # (rows,)
                rates = _rate_failures(path.name, t, np.concatenate(masked), p, seq_len)
                _check_rates(rates, path.name, report)

    return _run("corruptions", folder, per_split)


def _check_rates(rates: pd.DataFrame, name: str, report: ValidationReport) -> None:
    try:
        _RATE_SCHEMA.validate(rates, lazy=True)
    except SchemaErrors as exc:
        for case in exc.failure_cases.itertuples(index=False):
            report.failures.append(
                Failure(
                    name,
                    None,
                    f"mask ({case.index})",
                    str(case.check),
                    f"z={case.failure_case:.2f}",
                )
            )


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
