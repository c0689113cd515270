"""Ingestion: documents from the Hub, local files or a built-in corpus, split by content hash.

One entry point, :func:`ingest_documents`, writes the ``documents`` stage: parquet shards
``{split}-{shard:05d}.parquet`` with :func:`maskdiff.data.contracts.documents_schema` and a
manifest.

* ``hub``: ``datasets.load_dataset(hub_name, hub_config, split=hub_split, streaming=...)``;
  offline it fails with a message saying how to use local files instead.
* ``local``: files, folders (recursively) and globs of ``.txt`` (one document per file, line
  or blank-line paragraph, ``data.text_unit``), ``.jsonl`` and ``.parquet`` (``data.text_column``).
* ``builtin``: ``pydoc`` (CPython's help topics), ``stdlib`` (the standard library's source
  of this interpreter) or ``markov`` (a seeded chain with a known entropy rate).

With ``data.chunk_chars`` each document is first cut into chunks of at most that many
characters (:func:`chunk_text`: just after the last ASCII whitespace of each window, so no
character is lost), and each chunk is a document from then on.

``data.split_by`` picks how documents go to train/validation/test:

* ``hash`` (default): by a hash of the text alone, so adding documents never moves old ones.
* ``position``: by where the document lies in the character stream of all kept documents in
  corpus order (N characters): characters ``[0, N - n_val - n_test)`` go to train, the next
  ``n_val = round(N val_fraction)`` to validation, the last ``n_test = round(N test_fraction)``
  to test; a document that straddles a boundary is cut exactly there. This is the contiguous
  split of single-document corpora such as text8 (first 90M characters train, next 5M
  validation, last 5M test). It is deterministic; adding documents at the end moves only the
  tail (train keeps its prefix). The source is read twice (once to count N), duplicates are
  kept (dropping them would cut holes in the stream) and ``doc_id`` is the document's ordinal.

Invalid UTF-8 bytes are dropped and counted (a file that is mostly invalid is an error naming
it), empty documents (and with ``hash`` exact duplicates) are skipped and counted. Reading the
sources is :mod:`maskdiff.data.sources`; splitting, counting and writing are here.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from maskdiff.config import DataConfig
from maskdiff.data.contracts import SPLITS, documents_schema, shard_name
from maskdiff.data.markov import make_chain
from maskdiff.data.sources import IngestError, SourceCounts, documents, expand_paths
from maskdiff.data.stage import StageResult, build_stage, write_parquet
from maskdiff.data.validate import validate_documents

__all__ = [
    "DOC_SHARD_BYTES",
    "IngestError",
    "chunk_text",
    "doc_hash",
    "expand_paths",
    "ingest_documents",
    "split_of",
]

DOC_SHARD_BYTES = 8 << 20  # text bytes per documents shard (before compression)
_WHITESPACE = " \n\t\r\f\v"  # where chunk_text prefers to cut


# ----------------------------------------------------------------------------- writing


class _SplitWriter:
    """Buffers one split's documents and writes a shard every ``DOC_SHARD_BYTES`` of text."""

    def __init__(self, folder: Path, split: str) -> None:
        self.folder, self.split = folder, split
        self.ids: list[int] = []
        self.texts: list[str] = []
        self.sources: list[str] = []
        self.buffered = self.shards = self.rows = self.bytes = self.chars = 0

    def add(self, doc_id: int, text: str, source: str, n_bytes: int) -> None:
        self.ids.append(doc_id)
        self.texts.append(text)
        self.sources.append(source)
        self.buffered += n_bytes
        self.bytes += n_bytes
        self.chars += len(text)
        self.rows += 1
        if self.buffered >= DOC_SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.ids:
            return
        table = pa.table(
            {"doc_id": self.ids, "text": self.texts, "source": self.sources},
            schema=documents_schema(),
        )
        write_parquet(table, self.folder / shard_name(self.split, self.shards))
        self.shards += 1
        self.ids, self.texts, self.sources, self.buffered = [], [], [], 0


# ----------------------------------------------------------------------------- splitting


def doc_hash(text: str) -> int:
    """A 63-bit hash of the text: the document id and the key of its split."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def chunk_text(text: str, limit: int | None) -> Iterator[str]:
    """``text`` in pieces of at most ``limit`` characters that concatenate back to ``text``.

    Each piece ends just after the last ASCII whitespace character of its window of ``limit``
    characters (the whitespace stays with the piece before the cut, so words stay whole); a
    window without whitespace is cut at the limit. ``limit=None`` yields ``text`` whole.
    """
    if limit is None or len(text) <= limit:
        yield text
        return
    start = 0
    while len(text) - start > limit:
        end = start + limit
        space = max(text.rfind(c, start, end) for c in _WHITESPACE)  # -1: none in the window
        cut = space + 1 if space >= start else end
        yield text[start:cut]
        start = cut
    yield text[start:]


def split_of(doc_id: int, val_fraction: float, test_fraction: float) -> str:
    """validation if u < val_fraction, test if u < val + test, else train; u = id / 2^63."""
    u = doc_id / float(1 << 63)
    if u < val_fraction:
        return "validation"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


# ----------------------------------------------------------------------------- the stage


def _source_config(cfg: DataConfig) -> dict[str, Any]:
    """The part of ``data`` that decides the documents, plus a fingerprint of the inputs."""
    keys = ["source", "max_documents", "val_fraction", "test_fraction"]
    if cfg.source == "hub":
        keys += ["hub_name", "hub_config", "hub_split", "text_column"]
    elif cfg.source == "local":
        keys += ["paths", "text_unit", "text_column"]
    else:
        keys += ["builtin", "text_unit"]
    if cfg.chunk_chars is not None or cfg.split_by != "hash":  # defaults keep old stage keys
        keys += ["chunk_chars", "split_by"]
    out: dict[str, Any] = {k: getattr(cfg, k) for k in keys}
    if cfg.source == "builtin" and cfg.builtin == "markov":
        out["markov"] = cfg.markov.model_dump(mode="json")
    elif cfg.source == "builtin":
        out["python"] = sys.version  # pydoc and stdlib ship with the interpreter
    elif cfg.source == "local":  # a changed input file must give a new stage folder
        out["files"] = [
            [str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
            for p in expand_paths(cfg.paths)
        ]
    return out


def _markov_stats(cfg: DataConfig) -> dict[str, Any]:
    chain = make_chain(cfg.markov)
    n, rate = cfg.markov.doc_length, chain.entropy_rate()
    doc_entropy = chain.document_entropy(n)
    return {
        "entropy_rate_nats_per_symbol": rate,
        "initial_entropy_nats": chain.initial_entropy(),
        "doc_length": n,
        "doc_entropy_nats": doc_entropy,
        "nll_floor_nats_per_symbol": doc_entropy / n,
        "nll_floor_nats_per_token": doc_entropy / (n + 1),
        "convention": (
            "With the char tokenizer one symbol is one token. Documents have a fixed length and "
            "are joined by one EOS token each, so EOS carries no entropy in the stream: the floor "
            "per token counting EOS is doc_entropy/(doc_length+1), per non-EOS token it is "
            "doc_entropy/doc_length. A block model that does not see where documents start pays "
            "slightly more than either floor; no model can go below them."
        ),
    }


def _kept_documents(cfg: DataConfig, counts: SourceCounts) -> Iterator[tuple[int, str, str]]:
    """(content hash, text, source) of the documents (chunks) to keep, in corpus order.

    Blank ones are skipped, and with ``split_by='hash'`` exact duplicates; at most
    ``max_documents``. Skips and the number kept are counted in ``counts``.
    """
    seen: set[int] = set()
    for text, source in documents(cfg, counts):
        for piece in chunk_text(text, cfg.chunk_chars):
            if not piece.strip():
                counts.empty_documents += 1
                continue
            doc_id = doc_hash(piece)
            if cfg.split_by == "hash":
                if doc_id in seen:
                    counts.duplicate_documents += 1
                    continue
                seen.add(doc_id)
            yield doc_id, piece, source
            counts.kept_documents += 1
            if cfg.max_documents is not None and counts.kept_documents >= cfg.max_documents:
                return


def _n_bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _split_by_hash(cfg: DataConfig, counts: SourceCounts, writers: dict[str, _SplitWriter]) -> None:
    for doc_id, text, source in _kept_documents(cfg, counts):
        split = split_of(doc_id, cfg.val_fraction, cfg.test_fraction)
        writers[split].add(doc_id, text, source, _n_bytes(text))


def _split_by_position(
    cfg: DataConfig, counts: SourceCounts, writers: dict[str, _SplitWriter]
) -> None:
    """Contiguous split of the character stream; documents are cut at the two boundaries."""
    total = sum(len(text) for _, text, _ in _kept_documents(cfg, SourceCounts()))  # first pass
    n_val, n_test = round(total * cfg.val_fraction), round(total * cfg.test_fraction)
    val_start, test_start = total - n_val - n_test, total - n_test
    pos = doc_id = 0
    for _, text, source in _kept_documents(cfg, counts):
        end = pos + len(text)
        cuts = sorted({pos, end, *(b for b in (val_start, test_start) if pos < b < end)})
        for a, b in itertools.pairwise(cuts):
            split = "train" if a < val_start else "validation" if a < test_start else "test"
            part = text[a - pos : b - pos]
            writers[split].add(doc_id, part, source, _n_bytes(part))
            doc_id += 1
        pos = end


def _write_documents(folder: Path, cfg: DataConfig) -> dict[str, Any]:
    """Stream the source into per-split shards; returns the manifest stats."""
    counts = SourceCounts()
    writers = {split: _SplitWriter(folder, split) for split in SPLITS}
    if cfg.split_by == "position":
        _split_by_position(cfg, counts, writers)
    else:
        _split_by_hash(cfg, counts, writers)
    for writer in writers.values():
        writer.flush()
    kept = counts.kept_documents
    where = cfg.paths if cfg.source == "local" else cfg.hub_name or cfg.builtin
    if kept == 0:
        raise IngestError(
            f"no documents in {where}: {counts.empty_documents} empty, "
            f"{counts.duplicate_documents} duplicates"
        )
    if writers["train"].rows == 0:
        raise IngestError(f"{where}: the train split is empty ({kept} documents in all)")
    stats: dict[str, Any] = {
        "documents": {s: w.rows for s, w in writers.items()},
        "bytes": {s: w.bytes for s, w in writers.items()},
        "chars": {s: w.chars for s, w in writers.items()},
        "shards": {s: w.shards for s, w in writers.items()},
        "files": counts.files,
        "invalid_utf8_bytes": counts.invalid_utf8_bytes,
        "files_with_invalid_utf8": counts.files_with_invalid_utf8[:100],
        "empty_documents": counts.empty_documents,
        "duplicate_documents": counts.duplicate_documents,
        "capped_at_max_documents": cfg.max_documents is not None and kept >= cfg.max_documents,
    }
    if cfg.source == "builtin" and cfg.builtin == "markov":
        stats["markov"] = _markov_stats(cfg)
    return stats


def ingest_documents(
    cfg: DataConfig, root: str | os.PathLike[str] | None = None, validate: bool = True
) -> StageResult:
    """Build (or reuse) the ``documents`` stage under ``root`` (default ``cfg.root``).

    Returns the stage's :class:`StageResult`. The manifest's ``stats`` hold per-split document
    counts and bytes, invalid UTF-8 bytes, empty and duplicate documents, and for ``markov``
    the exact entropy rate (``stats.markov``). With ``validate`` the shards are checked by
    :func:`maskdiff.data.validate.validate_documents` before the stage is published.
    """

    def build(folder: Path) -> dict[str, Any]:
        stats = _write_documents(folder, cfg)
        if validate:
            report = validate_documents(folder)
            report.raise_if_failed()
            stats["timings"] = {"validate_s": report.seconds}
        return stats

    return build_stage("documents", root or cfg.root, _source_config(cfg), {}, build)
