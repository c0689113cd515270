"""Stage folders keyed by content: build once, write atomically, publish with a manifest.

A stage is one step of the data pipeline (``documents``, ``tokenizer``, ``blocks``,
``corruptions``). Its folder is ``<data.root>/<name>-<key>`` where ``key`` hashes the stage's
config and the content hashes of its inputs, so

* a rerun with the same config and inputs finds the folder and does no work;
* any change of config or of an input's content gives a new folder;
* a folder counts as finished only when ``manifest.json`` exists in it.

Building happens in a hidden temporary folder beside the final one; the builder writes its
files there, :func:`build_stage` hashes them, writes ``manifest.json`` (atomically) and only then
renames the temporary folder into place. A crash or a full disk leaves at most a ``.tmp`` folder,
which is never read and is removed by the next build. Two processes building the same stage
serialise on ``fcntl.flock`` of a lock file beside the folder: the second waits, then reuses.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from maskdiff.data.contracts import MANIFEST

__all__ = [
    "StageError",
    "StageResult",
    "build_stage",
    "config_hash",
    "data_root",
    "library_versions",
    "list_shards",
    "read_manifest",
    "stage_result",
    "write_json_atomic",
    "write_parquet",
]

_HASH_CHARS = 16
_LIBRARIES = ("maskdiff", "numpy", "pyarrow", "tokenizers", "datasets", "pandera")


class StageError(RuntimeError):
    """A stage folder is missing, unfinished, or its inputs are unusable."""


@dataclass(frozen=True)
class StageResult:
    """What a stage function returns: small, picklable, what tasks pass to the next stage."""

    name: str
    path: Path
    content_hash: str
    manifest: dict[str, Any] = field(repr=False, compare=False)
    reused: bool = field(default=False, compare=False)


def config_hash(obj: Any) -> str:
    """sha256 (first 16 hex chars) of the canonical JSON of ``obj`` (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:_HASH_CHARS]


def data_root(root: str | os.PathLike[str]) -> Path:
    """The data root as an absolute path; refuses a root that climbs out through ``..``."""
    raw = Path(root)
    if ".." in raw.parts:
        raise StageError(f"data.root={str(root)!r} contains '..'; give a path without it")
    return raw.resolve()


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file, fsync, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_manifest(stage_dir: str | os.PathLike[str], missing_ok: bool = False) -> dict[str, Any]:
    """The manifest of a finished stage; a folder without one is unfinished and refused.

    ``missing_ok`` returns {} instead, for callers that also take hand-made folders of shards
    (``python -m maskdiff.train`` with ``--vocab-size``); a manifest that does not parse is
    refused either way.
    """
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        if missing_ok:
            return {}
        raise StageError(f"{stage_dir}: no {MANIFEST}; the stage is missing or unfinished")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise StageError(f"{path}: manifest does not parse: {exc}") from exc


def stage_result(stage_dir: str | os.PathLike[str]) -> StageResult:
    """A :class:`StageResult` for an existing finished stage folder."""
    manifest = read_manifest(stage_dir)
    return StageResult(manifest["stage"], Path(stage_dir), manifest["content_hash"], manifest)


def list_shards(stage_dir: str | os.PathLike[str], split: str) -> list[Path]:
    """The ``{split}-{shard:05d}.parquet`` files of a finished stage, in shard order."""
    read_manifest(stage_dir)
    return sorted(Path(stage_dir).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].parquet"))


def content_hash(folder: Path) -> str:
    """Hash of every file but the manifest: names and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        file_digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                file_digest.update(chunk)
        digest.update(file_digest.digest())
    return digest.hexdigest()[:_HASH_CHARS]


@contextmanager
def _disk_full_named(name: str, base: Path) -> Iterator[None]:
    """Turn "no space left on device" into a :class:`StageError` that names the stage and root."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise StageError(
            f"stage {name!r}: no space left on the device of {base} ({exc}); the unfinished "
            "folder was removed, finished stages are untouched: free space and run again"
        ) from exc


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def build_stage(
    name: str,
    root: str | os.PathLike[str],
    config: dict[str, Any],
    inputs: dict[str, str],
    builder: Callable[[Path], dict[str, Any]],
) -> StageResult:
    """Build stage ``name`` under ``root`` unless a finished folder for (config, inputs) exists.

    ``config``: the stage's JSON-able config; ``inputs``: input name -> content hash.
    ``builder(tmp_dir)`` writes the stage files into ``tmp_dir`` and returns the manifest's
    ``stats`` (row counts and the like). Returns the finished stage's :class:`StageResult`.
    """
    base = data_root(root)
    with _disk_full_named(name, base):
        base.mkdir(parents=True, exist_ok=True)
        return _build_locked(name, base, config, inputs, builder)


def _build_locked(
    name: str,
    base: Path,
    config: dict[str, Any],
    inputs: dict[str, str],
    builder: Callable[[Path], dict[str, Any]],
) -> StageResult:
    key = config_hash({"stage": name, "config": config, "inputs": inputs})
    final = base / f"{name}-{key}"
    with _locked(base / f".{name}-{key}.lock"):
        if (final / MANIFEST).is_file():
            return StageResult(
                name, final, read_manifest(final)["content_hash"], read_manifest(final), reused=True
            )
        if final.exists():  # a folder without a manifest is never trusted
            shutil.rmtree(final)
        for stale in base.glob(f".{name}-{key}.tmp-*"):  # left by a killed builder; we hold
            shutil.rmtree(stale, ignore_errors=True)  # the lock, so no live process writes it
        tmp = base / f".{name}-{key}.tmp-{os.getpid()}"
        try:
            tmp.mkdir()
            start = time.perf_counter()
            stats = builder(tmp)
            build_s = time.perf_counter() - start
            manifest = {
                "stage": name,
                "key": key,
                "config": config,
                "inputs": inputs,
                "stats": stats,
                "content_hash": content_hash(tmp),
                "versions": library_versions(),
                "timings": {"build_s": round(build_s, 4), **stats.pop("timings", {})},
                "created_unix": time.time(),
            }
            write_json_atomic(tmp / MANIFEST, manifest)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return StageResult(name, final, manifest["content_hash"], manifest)


def write_parquet(table: pa.Table, path: Path, **options: Any) -> None:
    """zstd parquet through a temporary name and ``os.replace`` (never a half file at ``path``);
    ``options`` go to :func:`pyarrow.parquet.write_table`."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd", **options)
    os.replace(tmp, path)
