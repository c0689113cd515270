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

Corruption stages are the big ones (K draws and whole discrete grids per block), so their rows
are screened in numpy, in cache-sized chunks, by the very rule functions the pandera schema is
built from; pandera then reports the rows that fail (file, row, column, check). Mask widths come
from the Arrow type, masked counts from a popcount of the packed bytes in place, and the rate
tallies are per-bin sums, so a corruption shard costs little more than reading it.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
BATCH_ROWS_CORRUPTIONS = 1 << 20  # read size; about 40 bytes a row: 40 MB a batch at L = 128
CHUNK_ROWS = 1 << 14  # compute size: temporaries stay in cache and need no fresh pages
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
    path: Path, columns: list[str], report: ValidationReport, batch_rows: int = BATCH_ROWS
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
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
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


@dataclass(frozen=True)
class _Rule:
    """One row condition of the corruption contract: ``holds(columns)`` is True where a row passes.

    ``columns`` is a mapping of column name to values: numpy arrays (or scalars) when a batch is
    screened, a pandas Series or DataFrame inside pandera. ``column`` names the column the rule
    is about; None for a rule across columns. The same function screens every row in numpy and
    builds the pandera check that reports the failing rows, so the contract is written once.
    """

    column: str | None
    error: str
    holds: Callable[[Any], Any]


def _corruption_rules(seq_len: int) -> list[_Rule]:
    width = (seq_len + 7) // 8
    return [
        _Rule("block_id", "block_id >= 0", lambda c: c["block_id"] >= 0),
        _Rule("t", "t > 0", lambda c: c["t"] > 0.0),
        _Rule("t", "t <= 1", lambda c: c["t"] <= 1.0),
        _Rule("T", "T >= 0", lambda c: c["T"] >= 0),
        _Rule("step", "step >= 0", lambda c: c["step"] >= 0),
        _Rule("draw", "draw >= 0", lambda c: c["draw"] >= 0),
        _Rule("mask_bytes", f"mask is {width} bytes", lambda c: c["mask_bytes"] == width),
        _Rule(None, "step <= T", lambda c: c["step"] <= c["T"]),
        _Rule(None, "step == 0 iff T == 0", lambda c: (c["T"] == 0) == (c["step"] == 0)),
    ]


_CORRUPTION_DTYPES = {
    "block_id": "int64",
    "t": "float64",
    "T": "int64",
    "step": "int64",
    "draw": "int64",
    "mask_bytes": "int64",
}


@functools.cache
def _corruptions_contract(seq_len: int) -> tuple[list[_Rule], pa.DataFrameSchema]:
    """The rules for blocks of ``seq_len`` tokens and their pandera schema (built once)."""
    rules = _corruption_rules(seq_len)
    return rules, _corruptions_schema(rules)


def _corruptions_schema(rules: list[_Rule]) -> pa.DataFrameSchema:
    """The pandera schema of the per-row facts, one check per :class:`_Rule`."""

    def check(rule: _Rule, per_column: bool) -> pa.Check:
        if per_column:
            name = rule.column
            return pa.Check(lambda s: rule.holds({name: s}), error=rule.error)
        return pa.Check(rule.holds, error=rule.error)

    columns = {
        name: pa.Column(dtype, [check(r, True) for r in rules if r.column == name])
        for name, dtype in _CORRUPTION_DTYPES.items()
    }
    return pa.DataFrameSchema(columns, checks=[check(r, False) for r in rules if r.column is None])


_RATE_SCHEMA = pa.DataFrameSchema(
    {
        "file": pa.Column(str),
        "bin": pa.Column(str),
        "z": pa.Column("float64", pa.Check.le(Z_TOL, error=f"masked fraction within {Z_TOL} sd")),
    }
)


def _mask_facts(column: pyarrow.Array) -> tuple[np.ndarray | int, np.ndarray]:
    """(bytes per mask, masked positions per row) of a binary column.

    A fixed-size binary column without nulls has one width for every row, returned as an int
    from its Arrow type (no per-row work); the counts are a popcount of the packed bytes, read
    in place from the Arrow buffer (as uint64 words where the width allows). Both (rows,) int64.
    """
    if isinstance(column, pyarrow.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    if isinstance(column.type, pyarrow.FixedSizeBinaryType):
        width = column.type.byte_width
        data = np.frombuffer(column.buffers()[-1], dtype=np.uint8)
        start = column.offset * width
        rows = data[start : start + n * width].reshape(n, width)
        if width % 8 == 0 and width:
            rows = rows.view(np.uint64)
        bits = np.bitwise_count(rows)  # (rows, words) uint8
        counts = np.zeros(n, dtype=np.int64)
        for word in range(bits.shape[1]):  # column sums: far faster than sum(axis=1) on few words
            counts += bits[:, word]
        if column.null_count == 0:
            return width, counts
        lengths = pc.fill_null(pc.binary_length(column), 0).to_numpy().astype(np.int64)
        return lengths, counts
    # variable-width masks (a broken writer): count row by row
    lengths = pc.fill_null(pc.binary_length(column), 0).to_numpy().astype(np.int64)
    counts = [np.bitwise_count(np.frombuffer(v or b"", np.uint8)).sum() for v in column.to_pylist()]
    return lengths, np.asarray(counts, dtype=np.int64)


@dataclass
class _RateTally:
    """Per t bin of one file: observed masked tokens, their binomial mean and variance, rows."""

    masked: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS))
    mean: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS))
    var: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS))
    rows: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS, np.int64))

    def add(self, t: np.ndarray, masked: np.ndarray, p: np.ndarray, seq_len: int) -> None:
        """Accumulate rows with times ``t``, masked counts and masking probabilities ``p``."""
        bins = np.minimum((t * N_BINS).astype(np.int64), N_BINS - 1)  # (rows,)
        self.masked += np.bincount(bins, weights=masked, minlength=N_BINS)
        self.mean += seq_len * np.bincount(bins, weights=p, minlength=N_BINS)
        self.var += seq_len * np.bincount(bins, weights=p * (1.0 - p), minlength=N_BINS)
        self.rows += np.bincount(bins, minlength=N_BINS)

    def z(self) -> np.ndarray:
        """|observed - E| / (sd + 1 / Z_TOL) per bin: above Z_TOL means |obs - E| > Z_TOL sd + 1."""
        return np.abs(self.masked - self.mean) / (np.sqrt(self.var) + 1.0 / Z_TOL)


def _screen(
    batch: pyarrow.RecordBatch, rules: list[_Rule]
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Per-row facts of a batch (numpy, zero-copy where Arrow allows), masked counts, and the
    boolean (rows,) array of rows that pass every rule."""
    facts: dict[str, Any] = {
        name: batch.column(name).to_numpy(zero_copy_only=False)
        for name in _CORRUPTION_DTYPES
        if name != "mask_bytes"
    }
    facts["mask_bytes"], counts = _mask_facts(batch.column("mask"))
    passed = np.ones(batch.num_rows, dtype=bool)
    for rule in rules:
        passed &= rule.holds(facts)
    return facts, counts, passed


def _report_rows(
    schema: pa.DataFrameSchema,
    facts: dict[str, Any],
    rows: np.ndarray,
    offset: int,
    name: str,
    report: ValidationReport,
) -> None:
    """Hand the screened-out ``rows`` of a batch to pandera, indexed by their row in the file."""
    n = len(facts["t"])
    frame = pd.DataFrame(
        {
            col: np.broadcast_to(np.asarray(facts[col]), (n,))[rows].astype(dtype)
            for col, dtype in _CORRUPTION_DTYPES.items()
        },
        index=pd.Index(offset + rows),
    )
    _check(schema, frame, name, report)


def validate_corruptions(
    folder: str | os.PathLike[str], seq_len: int, diffusion: DiffusionConfig
) -> ValidationReport:
    """Corruptions: t in (0, 1], step/T consistent, mask of ceil(L/8) bytes, masking rates.

    Every row is screened in numpy by the rules of the pandera schema; the rows that fail any
    rule (usually none) go through pandera, which names the file, row, column and check. Per
    (file, t bin) the masked count is compared with ``1 - alpha(t)`` by one pandera check over
    all files at the end. Batches are of ``BATCH_ROWS_CORRUPTIONS`` rows, tallies are per bin,
    so memory stays bounded.
    """
    schedule = make_schedule(diffusion)
    rules, schema = _corruptions_contract(seq_len)
    cols = ["block_id", "t", "T", "step", "draw", "mask"]
    rates: list[tuple[str, str, float]] = []

    def check_chunk(
        chunk: pyarrow.RecordBatch,
        first: int,
        name: str,
        tally: _RateTally,
        report: ValidationReport,
    ) -> None:
        """Screen rows ``first..`` of file ``name``, report the failing ones, tally the rates."""
        facts, masked, passed = _screen(chunk, rules)
        t = facts["t"]
        if not passed.all():
            _report_rows(schema, facts, np.flatnonzero(~passed), first, name, report)
            t_ok = (t > 0.0) & (t <= 1.0)  # the rate check needs only a valid t
            t, masked = t[t_ok], masked[t_ok]
        t = t.astype(np.float64)
        p = schedule.one_minus_alpha(torch.from_numpy(t)).numpy()  # (rows,)
        tally.add(t, masked, p, seq_len)

    def per_split(split: str, files: list[Path], report: ValidationReport) -> None:
        for path in files:
            tally = _RateTally()
            for offset, batch in _batches(path, cols, report, BATCH_ROWS_CORRUPTIONS):
                for start in range(0, batch.num_rows, CHUNK_ROWS):
                    chunk = batch.slice(start, CHUNK_ROWS)
                    check_chunk(chunk, offset + start, path.name, tally, report)
                report.rows += batch.num_rows
            z = tally.z()
            for b in np.flatnonzero(tally.rows):
                label = f"t in [{b / N_BINS:.2f}, {(b + 1) / N_BINS:.2f})"
                rates.append((path.name, label, float(z[b])))

    report = _run("corruptions", folder, per_split)
    start = time.perf_counter()
    _check_rates(pd.DataFrame(rates, columns=["file", "bin", "z"]), report)
    report.seconds = round(report.seconds + time.perf_counter() - start, 4)
    return report


def _check_rates(rates: pd.DataFrame, report: ValidationReport) -> None:
    """One pandera check of z per (file, t bin); a failure names the file and the bin."""
    try:
        _RATE_SCHEMA.validate(rates, lazy=True)
    except SchemaErrors as exc:
        for case in exc.failure_cases.itertuples(index=False):
            row = rates.iloc[int(case.index)]
            report.failures.append(
                Failure(
                    row["file"],
                    None,
                    f"mask ({row['bin']})",
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
