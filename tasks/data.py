"""Thin Prefect tasks over the library's data stages. Each returns a ``StageResult`` (a path and a
content hash, never data). Building, keying and atomic publishing are the library's job."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from prefect import Task, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext, TaskRunContext

from maskdiff.config import CorruptionConfig, DataConfig, DiffusionConfig, TokenizerConfig
from maskdiff.data import blocks as blocks_lib
from maskdiff.data import corrupt as corrupt_lib
from maskdiff.data import ingest as ingest_lib
from maskdiff.data import tokenizer as tokenizer_lib
from maskdiff.data import validate as validate_lib
from maskdiff.data.stage import StageResult
from tasks.caching import data_cache_policy
from tasks.retry import retry_if_transient

_CACHE = data_cache_policy()


# The Hub and the network may come back; a data error fails on its first run (tasks.retry).
_RETRY: dict = {
    "retries": 2,
    "retry_delay_seconds": [5, 30],
    "retry_condition_fn": retry_if_transient,
}


@task(
    name="ingest",
    **_RETRY,
    cache_policy=_CACHE,
    persist_result=True,
    task_run_name="ingest-{data.source}",
)
def ingest(data: DataConfig, root: str) -> StageResult:
    """Documents from the Hub, local files or a built-in corpus, split by document hash."""
    return ingest_lib.ingest_documents(data, root)


@task(name="tokenizer", **_RETRY, cache_policy=_CACHE, persist_result=True)
def tokenizer(cfg: TokenizerConfig, documents: str, root: str) -> StageResult:
    """Train (BPE, characters) or load the tokenizer (a file, or from the Hub); a stage with its
    own hash."""
    return tokenizer_lib.train_tokenizer(cfg, documents, root)


@task(name="tokenize-shard", task_run_name="tokenize-{shard_name}")
def tokenize_shard(tokenizer_dir: str, shard: str, shard_name: str, scratch: str) -> str:
    """One documents shard to its EOS-joined token stream, saved as ``.npy``; returns the path."""
    stream = blocks_lib.tokenize_shard(tokenizer_dir, shard)
    out = Path(scratch) / f"{shard_name}-{uuid.uuid4().hex[:8]}.npy"
    np.save(out, stream)
    return str(out)


def prefect_map(scratch: Path) -> Callable[..., Iterator[np.ndarray]]:
    """A ``map_fn`` for :func:`maskdiff.data.blocks.build_blocks` that maps :func:`tokenize_shard`
    over the flow's task runner and yields the streams in shard order."""

    def mapper(
        _fn: Callable[..., np.ndarray], tokenizer_dirs: Iterable[str], shards: Iterable[str]
    ) -> Iterator[np.ndarray]:
        scratch.mkdir(parents=True, exist_ok=True)
        shards = list(shards)
        names = [Path(s).stem for s in shards]
        futures = tokenize_shard.map(
            list(tokenizer_dirs), shards, names, [str(scratch)] * len(shards)
        )
        for future in futures:
            path = Path(future.result())
            yield np.load(path)
            path.unlink(missing_ok=True)

    return mapper


def build_blocks(data: DataConfig, documents: str, tokenizer_dir: str, root: str) -> StageResult:
    """Wrap documents into fixed-length blocks; shards are tokenized by mapped tasks.

    Called in the flow (not as a task) so that the mapping uses the flow's task runner; the
    library reuses a finished blocks folder without tokenizing anything. Outside a flow the
    shards are tokenized in this process, one after the other.
    """
    scratch = Path(root) / ".scratch" / uuid.uuid4().hex[:12]
    in_flow = FlowRunContext.get() is not None
    try:
        return blocks_lib.build_blocks(
            data, documents, tokenizer_dir, root, map_fn=prefect_map(scratch) if in_flow else map
        )
    finally:
        for leftover in scratch.glob("*.npy"):
            leftover.unlink(missing_ok=True)
        for folder in (scratch, scratch.parent):  # the run's folder, then .scratch if empty
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()


@task(name="corrupt-shard", task_run_name="corrupt-{job.split}-{job.index}")
def corrupt_shard(job: corrupt_lib.ShardJob) -> corrupt_lib.ShardOutcome | None:
    """One blocks shard's corruptions, checked and written into the stage's unfinished folder."""
    return corrupt_lib.write_corruption_shard(job)


def mapped(shard_task: Task) -> Callable[..., Iterator[Any]]:
    """A ``map_fn`` that maps ``shard_task`` over the flow's task runner and yields the results
    in input order (the library's builders take it in place of the builtin ``map``)."""

    def mapper(_fn: Callable[..., Any], *iterables: Iterable[Any]) -> Iterator[Any]:
        futures = shard_task.map(*[list(items) for items in iterables])
        for future in futures:
            yield future.result()

    return mapper


def corrupt(
    cfg: CorruptionConfig, diffusion: DiffusionConfig, blocks: str, root: str
) -> StageResult:
    """Precompute masked corruptions: K stratified draws, every step of each discrete grid.

    One mapped task per blocks shard (the flow's task runner); the library then checks the rates
    over all shards and publishes the stage, or reuses a finished one without mapping anything.
    Outside a flow the shards are built in this process, one after the other.
    """
    in_flow = FlowRunContext.get() is not None
    map_fn = mapped(corrupt_shard) if in_flow else map
    return corrupt_lib.build_corruptions(cfg, diffusion, blocks, root, map_fn=map_fn)


@task(name="validate", task_run_name="validate-{stage_name}")
def validate(stage_dir: str, stage_name: str) -> str:
    """Re-validate a published stage (a cached stage may have been damaged since it was built).

    Returns the report as markdown (also a Prefect artifact); raises on any failure.
    """
    report = validate_lib.validate_stage(stage_dir)
    status = "passed" if report.ok else f"FAILED ({len(report.failures)} failures)"
    markdown = (
        f"### Validation of `{stage_name}`: {status}\n\n"
        f"{report.rows} rows checked in {report.seconds:.2f} s; stage `{stage_dir}`\n\n"
        "```\n" + report.summary() + "\n```\n"
    )
    if TaskRunContext.get() is not None:  # not when called as validate.fn()
        create_markdown_artifact(
            key=f"validation-{stage_name}", markdown=markdown, description=f"pandera: {stage_dir}"
        )
    report.raise_if_failed()
    return markdown
