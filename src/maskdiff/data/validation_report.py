"""The report every validation fills: failures named by file, row, column and check.

Also the plumbing the stage validators share: reading a shard batch by batch (an unreadable file
becomes a failure naming it), running a pandera schema lazily into the report, and walking the
shards of each split.
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
import pyarrow.parquet as pq
from pandera.errors import SchemaError, SchemaErrors

from maskdiff.data.contracts import SPLITS

__all__ = [
    "BATCH_ROWS",
    "Failure",
    "StageValidationError",
    "ValidationReport",
    "check_frame",
    "read_batches",
    "report_duplicates",
    "validate_splits",
]

BATCH_ROWS = 1 << 18


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


def read_batches(
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


def check_frame(
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


def report_duplicates(
    ids: list[np.ndarray], split: str, column: str, report: ValidationReport
) -> None:
    """One failure per value of ``column`` seen more than once in ``split`` (at most 100)."""
    if not ids:
        return
    values, counts = np.unique(np.concatenate(ids), return_counts=True)
    for value in values[counts > 1][:100]:
        report.failures.append(
            Failure(f"{split}-*", None, column, "unique across shards", str(value))
        )


def validate_splits(
    stage: str,
    folder: str | os.PathLike[str],
    per_split: Callable[[str, list[Path], ValidationReport], None],
) -> ValidationReport:
    """Call ``per_split(split, shard files, report)`` for each split of ``folder``; the report
    holds the stage name, the rows counted and the seconds taken."""
    start = time.perf_counter()
    report = ValidationReport(stage, Path(folder))
    for split in SPLITS:
        files = sorted(Path(folder).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].parquet"))
        per_split(split, files, report)
    report.seconds = round(time.perf_counter() - start, 4)
    return report
