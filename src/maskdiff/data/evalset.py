"""The evaluation set: the fixed corruptions of token blocks, in memory or from stage folders.

A :class:`Corruptions` holds corrupted copies of blocks (row r masks block ``block_index[r]`` at
time ``t[r]``), one object per grid (T = 0 for continuous-time draws). They come from the
corruption stage's parquet shards (:func:`load_corruptions`) or are drawn in memory for tests and
notebooks (:func:`stratified_corruptions`, :func:`grid_corruptions`). Masks stay bit-packed
until a batch needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from maskdiff.config import DiffusionConfig
from maskdiff.data.contracts import mask_rows, unpack_mask
from maskdiff.data.stage import list_shards, read_manifest
from maskdiff.schedule import Schedule, make_schedule

__all__ = [
    "Corruptions",
    "grid_corruptions",
    "load_corruptions",
    "stage_facts",
    "stratified_corruptions",
]


@dataclass(frozen=True)
class Corruptions:
    """Corrupted copies of blocks: row r masks block ``block_index[r]`` at time ``t[r]``.

    ``mask`` is bool (R, L) or bit-packed uint8 (R, ceil(L/8)) as in :mod:`maskdiff.data.contracts`.
    ``T`` = 0 for continuous-time draws, else the grid size, with ``step`` (R,) in 1..T.
    """

    block_index: Tensor  # (R,) long
    t: Tensor  # (R,) float
    mask: Tensor  # (R, L) bool or (R, ceil(L/8)) uint8
    T: int = 0
    step: Tensor | None = None  # (R,) long, T > 0 only

    def rows_mask(self, rows: Tensor, length: int) -> Tensor:
        """Unpacked (len(rows), L) bool mask of the given rows."""
        part = self.mask[rows]
        if part.dtype == torch.bool:
            return part
        return torch.from_numpy(unpack_mask(part.numpy(), length))


def stratified_corruptions(
    x0: Tensor,
    draws: int,
    schedule: Schedule,
    generator: torch.Generator,
    t_min: float = 1e-5,
) -> Corruptions:
    """K = ``draws`` continuous-time corruptions per block, t stratified over [t_min, 1].

    Draw k of block b: t = t_min + (1 - t_min)(k + u_bk)/K, u ~ U[0, 1); each token masked
    independently with probability 1 - alpha(t). For tests and notebooks (the pipeline's
    corruption stage writes the same thing to parquet).
    """
    n, L = x0.shape
    u = torch.rand(n, draws, dtype=torch.float64, generator=generator)
    k = torch.arange(draws, dtype=torch.float64)
    t = (t_min + (1.0 - t_min) * (k + u) / draws).reshape(-1)  # (n K,)
    p = schedule.one_minus_alpha(t)[:, None]
    mask = torch.rand(n * draws, L, dtype=torch.float64, generator=generator) < p
    return Corruptions(torch.arange(n).repeat_interleave(draws), t, mask)


def grid_corruptions(
    x0: Tensor, T: int, schedule: Schedule, generator: torch.Generator
) -> Corruptions:
    """One corruption per step i = 1..T per block at t = i/T (for the discrete NELBO)."""
    n, L = x0.shape
    step = torch.arange(1, T + 1).repeat(n)  # (n T,)
    t = step.double() / T
    p = schedule.one_minus_alpha(t)[:, None]
    mask = torch.rand(n * T, L, dtype=torch.float64, generator=generator) < p
    return Corruptions(torch.arange(n).repeat_interleave(T), t, mask, T=T, step=step)


def load_corruptions(corr_dir: str | Path, split: str, block_ids: np.ndarray) -> list[Corruptions]:
    """The corruptions of the given blocks, one :class:`Corruptions` per T (0 = continuous).

    Rows of other blocks are dropped; masks stay bit-packed until a batch needs them.
    """
    shards = list_shards(corr_dir, split)
    if not shards:
        raise FileNotFoundError(f"no {split} corruption shards in {corr_dir}")
    columns = ["block_id", "t", "T", "step", "mask"]
    table = pa.concat_tables([pq.read_table(s, columns=columns) for s in shards])
    order = np.argsort(block_ids)
    sorted_ids = block_ids[order]
    rid = table.column("block_id").to_numpy()
    pos = np.searchsorted(sorted_ids, rid).clip(max=len(sorted_ids) - 1)
    keep = sorted_ids[pos] == rid
    index = order[pos]
    packed = mask_rows(table.column("mask"))
    T_col = table.column("T").to_numpy()
    t_col = table.column("t").to_numpy().astype(np.float64)
    step_col = table.column("step").to_numpy().astype(np.int64)
    out = []
    for T in sorted(set(T_col[keep].tolist())):
        sel = keep & (T_col == T)
        out.append(
            Corruptions(
                block_index=torch.from_numpy(index[sel].astype(np.int64)),
                t=torch.from_numpy(t_col[sel]),
                mask=torch.from_numpy(packed[sel].copy()),
                T=int(T),
                step=torch.from_numpy(step_col[sel]) if T > 0 else None,
            )
        )
    return out


def stage_facts(blocks_dir: Path, corr_dir: Path) -> tuple[int | None, Schedule | None, int | None]:
    """(corruption seed, schedule the masks were drawn with, m) as the manifests record them."""
    config = read_manifest(corr_dir).get("config", {})
    seed = config.get("corruption", {}).get("seed")
    diffusion = config.get("diffusion")
    schedule = make_schedule(DiffusionConfig.model_validate(diffusion)) if diffusion else None
    stats = read_manifest(blocks_dir).get("stats", {})
    vocab = stats.get("vocab_size")
    if vocab is not None and stats.get("mask_id", vocab) != vocab:
        raise ValueError(f"{blocks_dir}: mask_id {stats['mask_id']} is not vocab_size {vocab}")
    return seed, schedule, vocab
