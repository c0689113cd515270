"""pandera validation of the corruptions stage: per-row rules and the masking rate per t bin.

Corruption stages are the big ones (K draws and whole discrete grids per block), so rows are
screened in numpy, in cache-sized chunks, by the very rule functions the pandera schema is built
from; pandera then reports the rows that fail (file, row, column, check). Mask widths come from
the Arrow type, masked counts from a popcount of the packed bytes in place, and the rate tallies
are per-bin sums: with expected count ``E = sum_rows L p(t)`` and variance
``V = sum_rows L p (1 - p)`` a (file, t bin) fails when ``|masked - E| > Z_TOL sqrt(V) + 1``.

A :class:`CorruptionChecker` takes record batches from anywhere: :func:`validate_corruptions`
streams a finished folder's shards through it, and the corruptions builder hands it each shard's
table before writing it, then checks the written file's footer (rows and schema), so a fresh
stage is validated without decompressing what it has just compressed.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable
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
from pandera.errors import SchemaErrors

from maskdiff.config import DiffusionConfig
from maskdiff.data.contracts import corruptions_schema, mask_rows
from maskdiff.data.validation_report import (
    Failure,
    ValidationReport,
    check_frame,
    read_batches,
    validate_splits,
)
from maskdiff.schedule import make_schedule

__all__ = ["CorruptionChecker", "validate_corruptions"]

BATCH_ROWS_CORRUPTIONS = 1 << 20  # read size; about 40 bytes a row: 40 MB a batch at L = 128
CHUNK_ROWS = 1 << 14  # compute size: temporaries stay in cache and need no fresh pages
Z_TOL = 5.0
N_BINS = 20
COLUMNS = ["block_id", "t", "T", "step", "draw", "mask"]


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
        rows = mask_rows(column)
        width = rows.shape[1]
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
    check_frame(schema, frame, name, report)


class CorruptionChecker:
    """Validates corruption rows file by file, from parquet or from memory, into ``report``.

    Call :meth:`check_batches` once per file with its (first row, record batch) pairs, then
    :meth:`finish` once for the rate checks over every file. ``seconds`` is the time spent
    checking (reading excluded).
    """

    def __init__(self, seq_len: int, diffusion: DiffusionConfig, report: ValidationReport) -> None:
        self.seq_len = seq_len
        self.schedule = make_schedule(diffusion)
        self.rules, self.schema = _corruptions_contract(seq_len)
        self.report = report
        self.rates: list[tuple[str, str, float]] = []
        self.seconds = 0.0

    def check_batches(self, name: str, batches: Iterable[tuple[int, pyarrow.RecordBatch]]) -> None:
        """Check every row of file ``name``; rows are numbered from each batch's first row."""
        tally = _RateTally()
        for offset, batch in batches:
            start = time.perf_counter()
            for first in range(0, batch.num_rows, CHUNK_ROWS):
                self._check_chunk(batch.slice(first, CHUNK_ROWS), offset + first, name, tally)
            self.report.rows += batch.num_rows
            self.seconds += time.perf_counter() - start
        z = tally.z()
        for b in np.flatnonzero(tally.rows):
            label = f"t in [{b / N_BINS:.2f}, {(b + 1) / N_BINS:.2f})"
            self.rates.append((name, label, float(z[b])))

    def check_table(self, name: str, table: pyarrow.Table) -> None:
        """Check the in-memory ``table`` that is about to be written as file ``name``."""
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            failure = Failure(name, None, ",".join(missing), "has column", "missing")
            self.report.failures.append(failure)
            return
        batches = table.select(COLUMNS).to_batches()
        firsts = np.cumsum([0] + [b.num_rows for b in batches])[: len(batches)].tolist()
        self.check_batches(name, zip(firsts, batches, strict=True))

    def check_written(self, path: Path, rows: int) -> None:
        """The footer of the file just written: readable, ``rows`` rows, the contract's schema."""
        start = time.perf_counter()
        try:
            meta = pq.read_metadata(path)
            schema = meta.schema.to_arrow_schema()
        except (pyarrow.ArrowException, OSError) as exc:
            failure = Failure(path.name, None, None, "readable parquet", str(exc))
            self.report.failures.append(failure)
            return
        if meta.num_rows != rows:
            self.report.failures.append(
                Failure(path.name, None, None, f"{rows} rows written", f"{meta.num_rows} rows")
            )
        expected = corruptions_schema(self.seq_len)
        if not schema.remove_metadata().equals(expected.remove_metadata()):
            self.report.failures.append(
                Failure(path.name, None, None, f"schema {expected}", str(schema))
            )
        self.seconds += time.perf_counter() - start

    def finish(self) -> ValidationReport:
        """The rate check of every (file, t bin) seen; returns the report."""
        start = time.perf_counter()
        _check_rates(pd.DataFrame(self.rates, columns=["file", "bin", "z"]), self.report)
        self.seconds += time.perf_counter() - start
        return self.report

    def _check_chunk(
        self, chunk: pyarrow.RecordBatch, first: int, name: str, tally: _RateTally
    ) -> None:
        """Screen rows ``first..`` of file ``name``, report the failing ones, tally the rates."""
        facts, masked, passed = _screen(chunk, self.rules)
        t = facts["t"]
        if not passed.all():
            _report_rows(self.schema, facts, np.flatnonzero(~passed), first, name, self.report)
            t_ok = (t > 0.0) & (t <= 1.0)  # the rate check needs only a valid t
            t, masked = t[t_ok], masked[t_ok]
        t = t.astype(np.float64)
        p = self.schedule.one_minus_alpha(torch.from_numpy(t)).numpy()  # (rows,)
        tally.add(t, masked, p, self.seq_len)


def validate_corruptions(
    folder: str | os.PathLike[str], seq_len: int, diffusion: DiffusionConfig
) -> ValidationReport:
    """Corruptions of a folder: t in (0, 1], step/T consistent, mask of ceil(L/8) bytes, masking
    rates. Shards are streamed in batches of ``BATCH_ROWS_CORRUPTIONS`` rows, tallies are per
    bin, so memory stays bounded."""
    checker: CorruptionChecker | None = None

    def per_split(split: str, files: list[Path], report: ValidationReport) -> None:
        nonlocal checker
        checker = checker or CorruptionChecker(seq_len, diffusion, report)
        for path in files:
            checker.check_batches(
                path.name, read_batches(path, COLUMNS, report, BATCH_ROWS_CORRUPTIONS)
            )

    report = validate_splits("corruptions", folder, per_split)
    if checker is None:
        return report
    start = time.perf_counter()
    checker.finish()
    report.seconds = round(report.seconds + time.perf_counter() - start, 4)
    return report


def _check_rates(rates: pd.DataFrame, report: ValidationReport) -> None:
    """One pandera check of z per (file, t bin); a failure names the file and the bin.

    No rows at all (splits without corruptions, or shards of zero rows) leave no (file, bin)
    to check, and pass."""
    if rates.empty:
        return
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
