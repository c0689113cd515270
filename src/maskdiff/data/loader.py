"""Training batches from the parquet stages: deterministic, shuffled, bounded, overlapped.

Order. The train split is an endless sequence of epochs. Epoch e visits the block shards in a
permutation drawn from (seed, e); consecutive shards are grouped into buffers of at least
``train.shuffle_buffer`` blocks and each buffer is shuffled with (seed, e, buffer). Global batch k
is rows ``[k B, (k+1) B)`` of that sequence, so a batch is a function of (seed, step) alone: a
resumed run reads exactly what an uninterrupted one would, and memory holds one buffer.

Ranks. Every rank walks the same sequence and keeps rows ``b = rank (mod world)`` of each global
batch, then splits them into ``grad_accum`` micro-batches (``local[j::A]``). Row b keeps its global
index, so t strata and masks are identical whatever the number of processes.

Corruption. ``precomputed``: the corruption shard of the same name (same blocks) gives t and the
bit mask of each block, continuous-time rows (T = 0) of draw ``e mod n_draws`` for epoch e (epochs
beyond the precomputed ones reuse the draws cyclically); ``x_t = where(mask, [M], x0)``.
``online``: t stratified over the global batch (:func:`maskdiff.schedule.sample_times`) and
``mask = u < 1 - alpha(t)`` with u from (seed, step). ``none`` (the AR model): x_t = x0.

Overlap. :class:`BatchLoader` builds host batches in a background thread (numpy and pyarrow
release the GIL) into pinned memory; :func:`to_device` keeps the next batch's host-to-device copy
in flight on a side CUDA stream while the current step runs.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from maskdiff.data.contracts import mask_rows, read_blocks, unpack_mask
from maskdiff.schedule import Schedule, sample_times

__all__ = ["Batch", "BatchLoader", "BlockSource", "LoaderSpec", "host_batches", "to_device"]

CorruptionMode = Literal["precomputed", "online", "none"]


@dataclass(frozen=True)
class Batch:
    """One optimizer step's data for this rank: A micro-batches of b blocks of L tokens."""

    x0: Tensor  # (A, b, L) int64
    x_t: Tensor  # (A, b, L) int64
    t: Tensor  # (A, b) float32

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            *(x.to(device, non_blocking=non_blocking) for x in (self.x0, self.x_t, self.t))
        )


@dataclass(frozen=True)
class LoaderSpec:
    """Everything that decides which rows a rank sees at a step."""

    seq_len: int
    global_batch: int
    grad_accum: int
    seed: int
    shuffle_buffer: int
    mode: CorruptionMode
    mask_id: int
    t_min: float
    antithetic: bool
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.global_batch % (self.world_size * self.grad_accum):
            raise ValueError(
                f"train.batch_size={self.global_batch} is not divisible by world size "
                f"{self.world_size} x grad_accum {self.grad_accum}"
            )


class BlockSource:
    """The shards of one split of a blocks stage (and its corruption stage), read by buffer."""

    def __init__(
        self,
        blocks_dir: Path,
        seq_len: int,
        corruptions_dir: Path | None = None,
        split: str = "train",
    ) -> None:
        self.blocks_dir, self.corruptions_dir = Path(blocks_dir), corruptions_dir
        self.seq_len = seq_len
        self.paths = sorted(self.blocks_dir.glob(f"{split}-*.parquet"))
        if not self.paths:
            raise FileNotFoundError(f"no {split}-*.parquet block shards in {self.blocks_dir}")
        self.rows = np.array([pq.ParquetFile(p).metadata.num_rows for p in self.paths])
        self.n_rows = int(self.rows.sum())
        self._layouts: dict[tuple[int, int, int], tuple[list[np.ndarray], np.ndarray]] = {}

    def layout(self, epoch: int, seed: int, buffer: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Shard groups of this epoch and their start offsets within it (cached per epoch)."""
        key = (epoch, seed, buffer)
        if key not in self._layouts:
            order = np.random.default_rng([seed, epoch, 0xB10C]).permutation(len(self.paths))
            groups, current, size = [], [], 0
            for i in order:
                current.append(i)
                size += int(self.rows[i])
                if size >= buffer:
                    groups.append(np.array(current))
                    current, size = [], 0
            if current:
                groups.append(np.array(current))
            sizes = np.array([int(self.rows[g].sum()) for g in groups])
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            self._layouts = {key: (groups, starts)}  # only the current epoch is kept
        return self._layouts[key]

    def read_corruptions(
        self, shards: np.ndarray, block_ids: np.ndarray, epoch: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """mask (n, L) bool and t (n,) float32 for ``block_ids``, continuous-time draws."""
        if self.corruptions_dir is None:
            raise ValueError("corruption mode 'precomputed' needs a corruptions directory")
        masks, ts, ids = [], [], []
        for i in shards:
            path = Path(self.corruptions_dir) / self.paths[i].name
            if not path.is_file():
                raise FileNotFoundError(
                    f"no corruption shard {path} for block shard {self.paths[i]}"
                )
            table = pq.read_table(path, columns=["block_id", "t", "T", "draw", "mask"])
            table = table.filter(pc.equal(table.column("T"), 0))
            draws = np.unique(table.column("draw").to_numpy())
            if not len(draws):
                raise ValueError(f"{path}: no continuous-time (T=0) corruptions to train on")
            table = table.filter(pc.equal(table.column("draw"), int(draws[epoch % len(draws)])))
            masks.append(unpack_mask(mask_rows(table.column("mask")), self.seq_len))
            ts.append(table.column("t").to_numpy())
            ids.append(table.column("block_id").to_numpy())
        cids = np.concatenate(ids)
        order = np.argsort(cids, kind="stable")
        pos = order[np.searchsorted(cids, block_ids, sorter=order).clip(max=len(cids) - 1)]
        if not np.array_equal(cids[pos], block_ids):
            missing = block_ids[cids[pos] != block_ids][:5]
            raise ValueError(
                f"corruptions in {self.corruptions_dir} lack blocks {missing.tolist()}"
            )
        return np.concatenate(masks)[pos], np.concatenate(ts)[pos].astype(np.float32)


class _Rows:
    """Random access to the endless shuffled row sequence, one buffer in memory."""

    def __init__(self, source: BlockSource, spec: LoaderSpec) -> None:
        self.source, self.spec = source, spec
        self._key: tuple[int, int] | None = None
        self._data: tuple[np.ndarray, ...] = ()

    def _load(self, epoch: int, g: int, groups: list[np.ndarray]) -> None:
        spec, src = self.spec, self.source
        blocks = read_blocks([src.paths[i] for i in groups[g]], src.seq_len)
        ids, bids = blocks.input_ids, blocks.block_id
        perm = np.random.default_rng([spec.seed, epoch, g, 1]).permutation(len(ids))
        ids, bids = ids[perm], bids[perm]
        if spec.mode == "precomputed":
            mask, t = src.read_corruptions(groups[g], bids, epoch)
            self._data = (ids, mask, t)
        else:
            self._data = (ids,)
        self._key = (epoch, g)

    def take(self, start: int, n: int) -> tuple[np.ndarray, ...]:
        """Rows [start, start + n) of the sequence, as arrays of the buffer's fields."""
        pieces: list[tuple[np.ndarray, ...]] = []
        spec, N = self.spec, self.source.n_rows
        while n > 0:
            epoch, offset = divmod(start, N)
            groups, starts = self.source.layout(epoch, spec.seed, spec.shuffle_buffer)
            g = int(np.searchsorted(starts, offset, side="right") - 1)
            if self._key != (epoch, g):
                self._load(epoch, g, groups)
            lo = offset - int(starts[g])
            k = min(n, len(self._data[0]) - lo)
            pieces.append(tuple(a[lo : lo + k] for a in self._data))
            start, n = start + k, n - k
        return tuple(
            np.concatenate(f) if len(pieces) > 1 else f[0] for f in zip(*pieces, strict=True)
        )


def host_batches(
    source: BlockSource, spec: LoaderSpec, schedule: Schedule, start_step: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """This rank's (x0, x_t, t) of every step from ``start_step`` on, as numpy arrays of shapes
    (A, b, L) int64, (A, b, L) int64, (A, b) float32."""
    rows, B, L = _Rows(source, spec), spec.global_batch, spec.seq_len
    step = start_step
    while True:
        fields = rows.take(step * B, B)
        x0 = fields[0]  # (B, L) int32
        if spec.mode == "precomputed":
            mask, t = fields[1], fields[2]
        elif spec.mode == "online":
            rng = np.random.default_rng([spec.seed, step, 0x7135])
            t = sample_times(rng, B, spec.t_min, spec.antithetic)  # (B,)
            p = schedule.one_minus_alpha(torch.from_numpy(t).double()).numpy()
            mask = rng.random((B, L), dtype=np.float32) < p[:, None]
        else:
            mask, t = None, np.ones(B, dtype=np.float32)
        sl = slice(spec.rank, None, spec.world_size)
        A, b = spec.grad_accum, B // (spec.world_size * spec.grad_accum)
        x0 = x0[sl].astype(np.int64)
        x_t = x0 if mask is None else np.where(mask[sl], spec.mask_id, x0)
        # local row i = i' A + j goes to micro-batch j: (b, A, L) -> (A, b, L)
        yield (
            x0.reshape(b, A, L).transpose(1, 0, 2),
            x_t.reshape(b, A, L).transpose(1, 0, 2),
            t[sl].reshape(b, A).T,
        )
        step += 1


class BatchLoader:
    """Host batches, pinned when a GPU will consume them; from a background thread
    (``background``) or made when asked for.

    The thread overlaps the host's work with a GPU's. Training on the CPU, it only takes cycles
    from the step's own threads: 1.3% of a 12 x 64 tiny step on 2 cores (benchmarks/bench_train.py,
    the loop with each against the bare step), for 40 us of work per batch.
    """

    def __init__(
        self,
        source: BlockSource,
        spec: LoaderSpec,
        schedule: Schedule,
        start_step: int,
        pin_memory: bool = False,
        prefetch: int = 4,
        background: bool = True,
    ) -> None:
        self._gen = host_batches(source, spec, schedule, start_step)
        self._pin = pin_memory
        self._queue: queue.Queue[Batch | BaseException] = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._work, name="maskdiff-loader", daemon=True)
            self._thread.start()

    def _make(self, x0: np.ndarray, x_t: np.ndarray, t: np.ndarray) -> Batch:
        batch = Batch(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (x0, x_t, t)))
        if self._pin:
            batch = Batch(batch.x0.pin_memory(), batch.x_t.pin_memory(), batch.t.pin_memory())
        return batch

    def _work(self) -> None:
        try:
            for arrays in self._gen:
                batch = self._make(*arrays)
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as exc:  # surfaced in the consumer
            self._queue.put(exc)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            try:
                arrays = next(self._gen)
            except StopIteration:
                raise
            except Exception as exc:  # the same error as from the thread
                raise RuntimeError("the batch loader failed") from exc
            return self._make(*arrays)
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise RuntimeError("the batch loader failed") from item
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def to_device(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """Batches on ``device``, the next one's copy issued before the current one is used.

    On cuda the copies run on a side stream (from pinned memory, non-blocking) and the compute
    stream waits on an event only when it needs the batch, so transfers overlap the step.
    """
    if device.type != "cuda":
        for batch in batches:
            yield batch.to(device)
        return
    stream = torch.cuda.Stream(device)

    def issue(batch: Batch) -> tuple[Batch, torch.cuda.Event]:
        with torch.cuda.stream(stream):
            moved = batch.to(device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return moved, event

    pending = issue(next(batches))
    for batch in batches:
        following = issue(batch)
        moved, event = pending
        torch.cuda.current_stream(device).wait_event(event)
        for x in (moved.x0, moved.x_t, moved.t):
            x.record_stream(torch.cuda.current_stream(device))
        yield moved
        pending = following
    moved, event = pending
    torch.cuda.current_stream(device).wait_event(event)
    yield moved
