"""The evaluation set: token blocks and their fixed corruptions, in memory or from stage folders.

A :class:`Corruptions` holds corrupted copies of blocks (row r masks block ``block_index[r]`` at
time ``t[r]``), one object per grid (T = 0 for continuous-time draws). They come from the
corruption stage's parquet shards (:func:`load_corruptions`) or are drawn in memory for tests and
notebooks (:func:`stratified_corruptions`, :func:`grid_corruptions`). Masks stay bit-packed
until a batch needs them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from maskdiff.config import DiffusionConfig
from maskdiff.data.contracts import MANIFEST, unpack_mask
from maskdiff.schedule import Schedule, make_schedule

__all__ = [
    "Corruptions",
    "grid_corruptions",
    "load_blocks",
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


def _read_split(folder: Path, split: str, columns: list[str]) -> pa.Table:
    shards = sorted(folder.glob(f"{split}-*.parquet"))
    if not shards:
        raise FileNotFoundError(f"no {split}-*.parquet shards in {folder}")
    return pa.concat_tables([pq.read_table(s, columns=columns) for s in shards])


def load_blocks(
    blocks_dir: str | Path, split: str, max_blocks: int | None = None
) -> tuple[np.ndarray, Tensor, Tensor]:
    """(block_id (n,), x0 (n, L) long, n_bytes (n,) long) of a split, in shard order.

    ``max_blocks`` keeps the first blocks of that order (deterministic).
    """
    table = _read_split(Path(blocks_dir), split, ["block_id", "input_ids", "n_bytes"])
    if max_blocks is not None:
        table = table.slice(0, max_blocks)
    ids = table.column("block_id").to_numpy()
    col = table.column("input_ids").combine_chunks()
    L = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=False)
    x0 = torch.from_numpy(flat.astype(np.int64).reshape(len(ids), L))
    n_bytes = torch.from_numpy(table.column("n_bytes").to_numpy().astype(np.int64))
    return ids, x0, n_bytes


def load_corruptions(corr_dir: str | Path, split: str, block_ids: np.ndarray) -> list[Corruptions]:
    """The corruptions of the given blocks, one :class:`Corruptions` per T (0 = continuous).

    Rows of other blocks are dropped; masks stay bit-packed until a batch needs them.
    """
    table = _read_split(Path(corr_dir), split, ["block_id", "t", "T", "step", "mask"])
    order = np.argsort(block_ids)
    sorted_ids = block_ids[order]
    rid = table.column("block_id").to_numpy()
    pos = np.searchsorted(sorted_ids, rid).clip(max=len(sorted_ids) - 1)
    keep = sorted_ids[pos] == rid
    index = order[pos]
    mask_col = table.column("mask").combine_chunks()
    width = mask_col.type.byte_width
    raw = np.frombuffer(mask_col.buffers()[1], dtype=np.uint8)
    raw = raw[mask_col.offset * width : (mask_col.offset + len(mask_col)) * width]
    packed = raw.reshape(-1, width)
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


def _manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def stage_facts(blocks_dir: Path, corr_dir: Path) -> tuple[int | None, Schedule | None, int | None]:
    """(corruption seed, schedule the masks were drawn with, m) as the manifests record them."""
    config = _manifest(corr_dir).get("config", {})
    seed = config.get("corruption", {}).get("seed")
    diffusion = config.get("diffusion")
    schedule = make_schedule(DiffusionConfig.model_validate(diffusion)) if diffusion else None
    stats = _manifest(blocks_dir).get("stats", {})
    vocab = stats.get("vocab_size")
    if vocab is not None and stats.get("mask_id", vocab) != vocab:
        raise ValueError(f"{blocks_dir}: mask_id {stats['mask_id']} is not vocab_size {vocab}")
    return seed, schedule, vocab
