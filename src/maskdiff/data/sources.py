"""Where documents come from: local files, a Hugging Face Hub dataset, or a built-in corpus.

:func:`documents` yields ``(text, source name)`` pairs for a :class:`DataConfig`; the ingestion
stage (:mod:`maskdiff.data.ingest`) splits, de-duplicates and writes them. Invalid UTF-8 bytes are
dropped and counted in a :class:`SourceCounts`; unusable input raises :class:`IngestError`
naming the file, line or config key.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from maskdiff.config import DataConfig
from maskdiff.data.markov import make_chain

__all__ = ["IngestError", "SourceCounts", "documents", "expand_paths"]

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n")
_MAX_INVALID_FRACTION = 0.5  # a file with more invalid bytes than this is not text


class IngestError(ValueError):
    """Unusable input; the message names the file, row or config key."""


@dataclass
class SourceCounts:
    """What reading the sources found: files, invalid bytes, and (filled by the stage) empty,
    duplicate and kept documents."""

    files: int = 0
    invalid_utf8_bytes: int = 0
    files_with_invalid_utf8: list[str] = field(default_factory=list)
    empty_documents: int = 0
    duplicate_documents: int = 0
    kept_documents: int = 0


def _decode(raw: bytes, where: str, counts: SourceCounts, whole_file: bool = True) -> str:
    """UTF-8 text; invalid bytes are dropped and counted. A file that is mostly invalid bytes
    (more than half) is not text: an error naming it."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="ignore")
    invalid = len(raw) - len(text.encode("utf-8"))
    if whole_file and invalid > _MAX_INVALID_FRACTION * len(raw):
        raise IngestError(f"{where}: {invalid} of {len(raw)} bytes are not UTF-8; not a text file")
    counts.invalid_utf8_bytes += invalid
    if not counts.files_with_invalid_utf8 or counts.files_with_invalid_utf8[-1] != where:
        counts.files_with_invalid_utf8.append(where)
    return text


def _split_text(text: str, unit: str) -> list[str]:
    """One text -> documents: itself (``file``), its lines, or its blank-line paragraphs."""
    if unit == "file":
        return [text]
    if unit == "line":
        return text.splitlines()
    return [para.strip("\n") for para in _PARAGRAPH.split(text)]


def _txt_documents(path: Path, unit: str, counts: SourceCounts) -> Iterator[str]:
    yield from _split_text(_decode(path.read_bytes(), str(path), counts), unit)


def _jsonl_documents(path: Path, column: str, counts: SourceCounts) -> Iterator[str]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(_decode(raw, str(path), counts, whole_file=False))
            except json.JSONDecodeError as exc:
                raise IngestError(f"{path}:{lineno}: not a JSON line ({exc})") from exc
            if not isinstance(row, dict) or column not in row:
                raise IngestError(f"{path}:{lineno}: no key {column!r} (data.text_column)")
            if not isinstance(row[column], str):
                raise IngestError(f"{path}:{lineno}: {column!r} is not a string")
            yield row[column]


def _parquet_documents(path: Path, column: str) -> Iterator[str]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise IngestError(f"{path}: not a readable parquet file ({exc})") from exc
    if column not in pf.schema_arrow.names:
        raise IngestError(
            f"{path}: no column {column!r} (data.text_column); has {pf.schema_arrow.names}"
        )
    for batch in pf.iter_batches(columns=[column], batch_size=4096):
        for text in batch.column(0).to_pylist():
            yield text or ""


def expand_paths(paths: list[str]) -> list[Path]:
    """Files named by ``data.paths``: files as given, folders recursively, globs sorted."""
    known = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
    files: list[Path] = []
    for entry in paths:
        expanded = os.path.expanduser(entry)
        if glob.has_magic(expanded):
            matches = sorted(glob.glob(expanded, recursive=True))
            if not matches:
                raise IngestError(f"data.paths: the glob {entry!r} matches no file")
            files.extend(Path(m) for m in matches if Path(m).is_file())
        elif Path(expanded).is_dir():
            files.extend(sorted(p for p in Path(expanded).rglob("*") if p.suffix in known))
        elif Path(expanded).is_file():
            files.append(Path(expanded))
        else:
            raise IngestError(f"data.paths: {entry!r} does not exist")
    if not files:
        raise IngestError(f"data.paths={paths}: no .txt, .jsonl or .parquet file found")
    return files


def _local_documents(cfg: DataConfig, counts: SourceCounts) -> Iterator[tuple[str, str]]:
    for path in expand_paths(cfg.paths):
        counts.files += 1
        if path.suffix in JSONL_SUFFIXES:
            docs = _jsonl_documents(path, cfg.text_column, counts)
        elif path.suffix in PARQUET_SUFFIXES:
            docs = _parquet_documents(path, cfg.text_column)
        else:
            docs = _txt_documents(path, cfg.text_unit, counts)
        for text in docs:
            yield text, path.name


def _hub_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    import datasets  # heavy; imported only for Hub sources

    where = f"Hub dataset {cfg.hub_name!r} (config={cfg.hub_config!r}, split={cfg.hub_split!r})"
    try:
        ds = datasets.load_dataset(
            cfg.hub_name, cfg.hub_config, split=cfg.hub_split, streaming=cfg.streaming
        )
    except Exception as exc:
        raise IngestError(
            f"could not load the {where}: {type(exc).__name__}: {exc}. Without network access, "
            "download the files and set data.source=local with data.paths=[<files, folders or "
            "globs of .txt/.jsonl/.parquet>] (data.text_column names the text field)"
        ) from exc
    for i, row in enumerate(ds):
        if cfg.text_column not in row:
            raise IngestError(f"{where} row {i}: no column {cfg.text_column!r} (data.text_column)")
        yield row[cfg.text_column] or "", cfg.hub_name or "hub"


def _stdlib_documents(counts: SourceCounts) -> Iterator[tuple[str, str]]:
    """The standard library's ``.py`` files, one document each, in a fixed pseudo-random order
    (by a hash of the relative path): ``data.max_documents`` then keeps a uniform sample of the
    library rather than its alphabetical head."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
    order = {p: hashlib.sha1(p.relative_to(root).as_posix().encode()).hexdigest() for p in files}
    for path in sorted(files, key=order.__getitem__):
        rel = path.relative_to(root)
        counts.files += 1
        yield _decode(path.read_bytes(), str(path), counts), rel.as_posix()


def _pydoc_documents(unit: str) -> Iterator[tuple[str, str]]:
    """CPython's help topics; ``data.text_unit`` applies as if each topic were a file."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for text in _split_text(topics[name], unit):
            yield text, name


def _markov_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    chain = make_chain(cfg.markov)
    rng = np.random.Generator(np.random.Philox(key=[cfg.markov.seed, 1]))
    symbols = chain.sample(cfg.markov.n_documents, cfg.markov.doc_length, rng)
    for text in chain.render(symbols):
        yield text, "markov"


def documents(cfg: DataConfig, counts: SourceCounts) -> Iterator[tuple[str, str]]:
    if cfg.source == "hub":
        return _hub_documents(cfg)
    if cfg.source == "local":
        return _local_documents(cfg, counts)
    builtins = {
        "pydoc": lambda: _pydoc_documents(cfg.text_unit),
        "stdlib": lambda: _stdlib_documents(counts),
        "markov": lambda: _markov_documents(cfg),
    }
    return builtins[cfg.builtin]()
