"""Precomputed masked corruptions of the token blocks (absorbing process).

Rows follow :func:`maskdiff.data.contracts.corruptions_schema`: one row per (block, t) with the
bit-packed mask of the positions replaced by [M]; each token is masked independently with
probability ``1 - alpha(t)`` of the configured schedule.

* Evaluation splits: ``K = eval_draws`` continuous-time draws per block (``T = 0, step = 0``),
  stratified: ``t_k = (k + u_b) / K``, k = 0..K-1, with one uniform offset ``u_b`` per block,
  clipped to ``t >= diffusion.t_min``. With ``discrete_steps``, also for each T of
  ``diffusion.T`` one row per step i = 1..T at ``t = i / T`` (``draw = 0``); that is
  ``sum(T)`` rows per block (1110 for T = 10, 100, 1000: 16 B of mask each for L = 128), so
  ``discrete_max_blocks`` caps how many blocks per split get those grids.
* Train split (``mode = precomputed``): ``train_draws`` rows per block per epoch,
  ``draw = epoch * train_draws + d``. t is stratified (antithetic) over each group of
  ``train_group`` consecutive block ids, a batch: ``t = (rank + u_g) / G`` with a random rank
  permutation and one offset ``u_g`` per group and draw.

Randomness is counter-based (numpy's Philox): the uniforms of block b under a stream are those
at counter ``b * ceil(L/8)`` of key ``(seed, channel)``, where the channel names the purpose,
split, T and draw (or step). So every row is a pure function of (seed, split, block_id, T,
step, draw) and any shard can be rebuilt alone, while each shard is drawn in one vectorised call
per draw. A uniform u32 masks a token when ``u32 < floor((1 - alpha) * 2^32)``.

The stage is built shard by shard (:class:`ShardJob` -> :func:`write_corruption_shard`, which a
task runner may map over workers); the rate checks over all shards, the manifest and the atomic
publication follow once every shard is in, so the files do not depend on who built them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from maskdiff.config import CorruptionConfig, DiffusionConfig
from maskdiff.data.contracts import (
    CORRUPTION_FORMAT,
    SPLITS,
    corruptions_schema,
    mask_rows,
    shard_name,
    unpack_mask,
)
from maskdiff.data.corruption_checks import CorruptionChecker
from maskdiff.data.stage import (
    StageError,
    StageResult,
    build_stage,
    list_shards,
    read_manifest,
    write_parquet,
)
from maskdiff.data.validation_report import Failure, ValidationReport
from maskdiff.schedule import make_schedule

__all__ = [
    "CorruptionRows",
    "ShardJob",
    "ShardOutcome",
    "build_corruptions",
    "corrupt_shard",
    "draw_masks",
    "iter_corruptions",
    "masking_probability",
    "write_corruption_shard",
]

_PURPOSE_MASK, _PURPOSE_TIME, _PURPOSE_RANK = 1, 2, 3
_SPLIT_CODE = {split: i for i, split in enumerate(SPLITS)}


def _channel(purpose: int, split: str, T: int, index: int) -> int:
    """Second Philox key word: purpose (4 bits) | split (4) | T (24) | draw or step (32)."""
    return (purpose << 60) | (_SPLIT_CODE[split] << 56) | (T << 32) | index


def _raw(seed: int, channel: int, start: int, n: int, words: int) -> np.ndarray:
    """(n, 4 * words) uint64: Philox output for counters start*words .. (start+n)*words - 1."""
    gen = np.random.Philox(counter=start * words, key=[seed % (1 << 64), channel])
    return gen.random_raw(n * words * 4).reshape(n, words * 4)


def _uniform(seed: int, channel: int, start: int, n: int) -> np.ndarray:
    """(n,) float64 uniforms in [0, 1), one per index start..start+n-1."""
    return (_raw(seed, channel, start, n, 1)[:, 0] >> np.uint64(11)) * (1.0 / (1 << 53))


def draw_masks(
    seed: int, channel: int, block_start: int, n: int, seq_len: int, p: np.ndarray
) -> np.ndarray:
    """Packed masks (n, ceil(L/8)) uint8 of blocks block_start..+n; ``p``: (n,) in [0, 1]."""
    words = (seq_len + 7) // 8  # one Philox counter gives 8 uint32
    u32 = _raw(seed, channel, block_start, n, words).view(np.uint32)[:, :seq_len]  # (n, L)
    thresh = np.floor(np.clip(p, 0.0, 1.0) * 4294967296.0)
    thresh = np.minimum(thresh, 4294967295.0).astype(np.uint32)[:, None]  # (n, 1)
    return np.packbits(u32 < thresh, axis=-1, bitorder="little")


def masking_probability(diffusion: DiffusionConfig, t: np.ndarray) -> np.ndarray:
    """1 - alpha(t) of the configured schedule, float64, shape of ``t``."""
    schedule = make_schedule(diffusion)
    return schedule.one_minus_alpha(torch.from_numpy(t.astype(np.float64))).numpy()


@dataclass
class CorruptionRows:
    """Columns of a corruption shard; ``mask``: (N, ceil(L/8)) uint8."""

    block_id: np.ndarray
    t: np.ndarray
    T: np.ndarray
    step: np.ndarray
    draw: np.ndarray
    mask: np.ndarray

    def table(self, seq_len: int) -> pa.Table:
        n, width = self.mask.shape
        masks = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(width), n, [None, pa.py_buffer(np.ascontiguousarray(self.mask))]
        )
        cols = [self.block_id, self.t, self.T, self.step, self.draw]
        return pa.Table.from_arrays(
            [pa.array(c) for c in cols] + [masks], schema=corruptions_schema(seq_len)
        )


def _concat(parts: list[CorruptionRows], order: tuple[str, ...]) -> CorruptionRows:
    cols = {
        f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(CorruptionRows)
    }
    perm = np.lexsort(tuple(cols[k] for k in reversed(order)))  # first key sorts slowest
    return CorruptionRows(**{f: c[perm] for f, c in cols.items()})


def _rows(
    ids: np.ndarray, t: np.ndarray, T: int, step: int, draw: int, mask: np.ndarray
) -> CorruptionRows:
    n = len(ids)
    full = np.full
    return CorruptionRows(
        ids, t, full(n, T, np.int32), full(n, step, np.int32), full(n, draw, np.int32), mask
    )


def _eval_rows(
    cfg: CorruptionConfig, diffusion: DiffusionConfig, split: str, ids: np.ndarray, seq_len: int
) -> CorruptionRows:
    """K stratified continuous draws and the discrete grids for block ids ``ids``."""
    b0, n = int(ids[0]), len(ids)
    offset = _uniform(cfg.seed, _channel(_PURPOSE_TIME, split, 0, 0), b0, n)  # (n,)
    parts = []
    for k in range(cfg.eval_draws):
        t = np.clip((k + offset) / cfg.eval_draws, diffusion.t_min, 1.0).astype(np.float32)
        p = masking_probability(diffusion, t)
        mask = draw_masks(cfg.seed, _channel(_PURPOSE_MASK, split, 0, k), b0, n, seq_len, p)
        parts.append(_rows(ids, t, 0, 0, k, mask))
    cap = cfg.discrete_max_blocks
    grid_ids = ids if cap is None else ids[ids < cap]
    if cfg.discrete_steps and len(grid_ids):
        for T in diffusion.T:
            for i in range(1, T + 1):
                t = np.full(len(grid_ids), i / T, dtype=np.float32)
                p = masking_probability(diffusion, t)
                channel = _channel(_PURPOSE_MASK, split, T, i)
                mask = draw_masks(cfg.seed, channel, b0, len(grid_ids), seq_len, p)
                parts.append(_rows(grid_ids, t, T, i, 0, mask))
    return _concat(parts, ("block_id", "T", "step", "draw"))


def _train_times(cfg: CorruptionConfig, draw: int, ids: np.ndarray, n_split: int) -> np.ndarray:
    """Stratified t for blocks ``ids`` (contiguous) at one training draw; float64 (n,)."""
    G = cfg.train_group
    g0, g1 = int(ids[0]) // G, int(ids[-1]) // G + 1
    lo, hi = g0 * G, min(g1 * G, n_split)
    keys = _raw(cfg.seed, _channel(_PURPOSE_RANK, "train", 0, draw), lo, hi - lo, 1)[:, 0]
    padded = np.full((g1 - g0) * G, np.iinfo(np.uint64).max, dtype=np.uint64)
    padded[: hi - lo] = keys
    ranks = np.argsort(np.argsort(padded.reshape(-1, G), axis=1, kind="stable"), axis=1)
    sizes = np.minimum(G, n_split - np.arange(g0, g1) * G)  # (groups,)
    u = _uniform(cfg.seed, _channel(_PURPOSE_TIME, "train", 0, draw), g0, g1 - g0)
    t = (ranks + u[:, None]) / sizes[:, None]  # (groups, G)
    return t.reshape(-1)[ids - lo]


def _train_rows(
    cfg: CorruptionConfig, diffusion: DiffusionConfig, ids: np.ndarray, seq_len: int, n_split: int
) -> CorruptionRows:
    """``train_epochs * train_draws`` stratified draws for block ids ``ids``."""
    b0, n, parts = int(ids[0]), len(ids), []
    for draw in range(cfg.train_epochs * cfg.train_draws):
        t = _train_times(cfg, draw, ids, n_split)
        t = np.clip(t, diffusion.t_min, 1.0).astype(np.float32)
        p = masking_probability(diffusion, t)
        mask = draw_masks(cfg.seed, _channel(_PURPOSE_MASK, "train", 0, draw), b0, n, seq_len, p)
        parts.append(_rows(ids, t, 0, 0, draw, mask))
    return _concat(parts, ("draw", "block_id"))


def corrupt_shard(
    cfg: CorruptionConfig,
    diffusion: DiffusionConfig,
    blocks_shard: str | os.PathLike[str],
    split: str,
    seq_len: int,
    n_split: int,
) -> CorruptionRows | None:
    """All corruption rows of one blocks shard (None when the split gets none).

    ``n_split``: blocks in the split (the last training group may be short).
    """
    ids = pq.read_table(blocks_shard, columns=["block_id"]).column(0).to_numpy()
    if len(ids) == 0 or not np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))):
        raise StageError(f"{blocks_shard}: block ids are not a contiguous range")
    if split != "train":
        return _eval_rows(cfg, diffusion, split, ids, seq_len)
    if cfg.mode == "online" or cfg.train_epochs == 0:
        return None
    return _train_rows(cfg, diffusion, ids, seq_len, n_split)


@dataclass(frozen=True)
class ShardJob:
    """Everything one corruption shard needs: small and picklable, so a task runner can send it
    to another process or machine (which must see ``blocks_shard`` and ``folder``)."""

    cfg: CorruptionConfig
    diffusion: DiffusionConfig
    blocks_shard: str
    split: str
    index: int  # the blocks shard's number j: the output is ``{split}-{j:05d}.parquet``
    seq_len: int
    n_split: int
    folder: str
    validate: bool = True

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


@dataclass
class ShardOutcome:
    """What :func:`write_corruption_shard` reports back: the file's size and rows, and its
    validation (failures, per-bin rate z values, rows checked, seconds)."""

    name: str
    rows: int
    bytes_on_disk: int
    failures: list[Failure]
    rates: list[tuple[str, str, float]]
    checked_rows: int
    check_seconds: float


def write_corruption_shard(job: ShardJob) -> ShardOutcome | None:
    """Compute, check in memory and write one corruption shard into ``job.folder``.

    The rows depend only on (seed, split, block ids, n_split), never on which process builds
    the shard or on the other shards, so shards may be built in any order, anywhere. None when
    the split gets no corruptions.
    """
    out = corrupt_shard(
        job.cfg, job.diffusion, job.blocks_shard, job.split, job.seq_len, job.n_split
    )
    if out is None:
        return None
    path = Path(job.folder) / job.name
    table = out.table(job.seq_len)
    report = ValidationReport("corruptions", Path(job.folder))
    checker = CorruptionChecker(job.seq_len, job.diffusion, report) if job.validate else None
    if checker is not None:
        checker.check_table(path.name, table)
    # dictionaries only where values repeat: t and the masks never do
    write_parquet(table, path, use_dictionary=["block_id", "T", "step", "draw"])
    if checker is not None:
        checker.check_written(path, table.num_rows)
    rates, seconds = (checker.rates, checker.seconds) if checker is not None else ([], 0.0)
    return ShardOutcome(
        job.name, table.num_rows, path.stat().st_size, report.failures, rates, report.rows, seconds
    )


def build_corruptions(
    cfg: CorruptionConfig,
    diffusion: DiffusionConfig,
    blocks: str | os.PathLike[str],
    root: str | os.PathLike[str],
    validate: bool = True,
    map_fn: Callable[..., Iterable[ShardOutcome | None]] = map,
) -> StageResult:
    """Build (or reuse) the ``corruptions`` stage from a finished ``blocks`` stage folder.

    Corruption shard ``{split}-{j:05d}`` covers blocks shard j. ``mode='online'`` skips the
    train split (the trainer masks on the fly). Manifest ``stats``: ``format``, ``seq_len``,
    ``process``, ``schedule`` and per split ``rows``, ``tokens`` (token-corruptions),
    ``bytes_on_disk``.

    ``map_fn(write_corruption_shard, jobs)`` builds the shards (the builtin ``map``, or a task
    runner's map over workers) and yields their outcomes in job order; once all are in, the
    rate checks run over every shard and the stage is published (hashed, manifest, rename).
    The files do not depend on ``map_fn``.
    """
    if any(T >= 1 << 24 for T in diffusion.T):
        raise StageError("diffusion.T: grids of 2^24 steps or more are not supported")
    if diffusion.process != "absorbing":
        raise StageError(f"diffusion.process={diffusion.process!r}: only absorbing masks exist")
    blocks = Path(blocks)
    bman = read_manifest(blocks)
    seq_len = bman["stats"]["seq_len"]
    config = {
        "corruption": cfg.model_dump(mode="json"),
        "diffusion": diffusion.model_dump(mode="json"),
        "format": CORRUPTION_FORMAT,
    }
    train = cfg.mode != "online" and cfg.train_epochs > 0

    def build(folder: Path) -> dict[str, Any]:
        # Each shard is validated in memory before it is written, and the written file's footer
        # after; the rates of every shard are checked together here. validate_stage() re-reads
        # a finished folder (a reused stage).
        jobs = [
            ShardJob(cfg, diffusion, str(shard), split, j, seq_len,
                     bman["stats"]["splits"][split]["blocks"], str(folder), validate)
            for split in SPLITS
            if split != "train" or train
            for j, shard in enumerate(list_shards(blocks, split))
        ]  # fmt: skip
        outcomes = list(map_fn(write_corruption_shard, jobs))
        report = ValidationReport("corruptions", folder)
        checker = CorruptionChecker(seq_len, diffusion, report) if validate else None
        splits = {split: {"rows": 0, "tokens": 0, "bytes_on_disk": 0} for split in SPLITS}
        for job, out in zip(jobs, outcomes, strict=True):
            if out is None:
                continue
            split = splits[job.split]
            split["rows"] += out.rows
            split["tokens"] += out.rows * seq_len
            split["bytes_on_disk"] += out.bytes_on_disk
            if checker is not None:
                report.failures.extend(out.failures)
                report.rows += out.checked_rows
                checker.rates.extend(out.rates)
                checker.seconds += out.check_seconds
        stats: dict[str, Any] = {
            "format": CORRUPTION_FORMAT,
            "process": diffusion.process,
            "schedule": diffusion.schedule,
            "seq_len": seq_len,
            "blocks_hash": bman["content_hash"],
            "splits": splits,
        }
        if checker is not None:
            checker.finish().raise_if_failed()
            stats["timings"] = {"validate_s": round(checker.seconds, 4)}
            stats["validated"] = {"rows": report.rows, "when": "in memory before writing"}
        return stats

    inputs = {"blocks": bman["content_hash"]}
    return build_stage("corruptions", root, config, inputs, build)


def iter_corruptions(
    stage_dir: str | os.PathLike[str], split: str, batch_rows: int = 65536
) -> Iterator[dict[str, np.ndarray]]:
    """Stream a split's corruption rows: dicts of ``block_id``, ``t``, ``T``, ``step``, ``draw``
    as (n,) arrays and ``mask`` as (n, L) bool (unpacked), batch by batch, shard by shard."""
    seq_len = read_manifest(stage_dir)["stats"]["seq_len"]
    for shard in list_shards(stage_dir, split):
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=batch_rows):
            out = {
                name: batch.column(name).to_numpy()
                for name in ("block_id", "t", "T", "step", "draw")
            }
            out["mask"] = unpack_mask(mask_rows(batch.column("mask")), seq_len)
            yield out
