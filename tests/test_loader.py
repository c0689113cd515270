"""The parquet loader: deterministic order, epoch coverage, rank sharding, x_t rebuilt exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import write_corpus

from maskdiff.config import DiffusionConfig
from maskdiff.data.contracts import read_blocks
from maskdiff.data.loader import BatchLoader, BlockSource, LoaderSpec, host_batches
from maskdiff.schedule import make_schedule

L, V = 16, 8


def _spec(**kw: object) -> LoaderSpec:
    base = dict(seq_len=L, global_batch=8, grad_accum=1, seed=3, shuffle_buffer=40,
                mode="online", mask_id=V, t_min=1e-5, antithetic=True)  # fmt: skip
    base.update(kw)
    return LoaderSpec(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_corpus(tmp_path_factory.mktemp("loader"))


SCHED = make_schedule(DiffusionConfig())


def _take(blocks: Path, spec: LoaderSpec, start: int, n: int, corr: Path | None = None) -> list:
    gen = host_batches(BlockSource(blocks, L, corr), spec, SCHED, start)
    return [next(gen) for _ in range(n)]


def test_batches_depend_only_on_seed_and_step(corpus: tuple[Path, Path]) -> None:
    blocks, _ = corpus
    straight = _take(blocks, _spec(), 0, 30)  # 30 * 8 rows: past two epochs of 96
    resumed = _take(blocks, _spec(), 17, 13)
    for a, b in zip(straight[17:], resumed, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    other_seed = _take(blocks, _spec(seed=4), 0, 1)[0][0]
    assert not np.array_equal(other_seed, straight[0][0])


def test_each_epoch_visits_every_block_once_in_a_new_order(corpus: tuple[Path, Path]) -> None:
    blocks, _ = corpus
    spec = _spec(mode="none")
    batches = _take(blocks, spec, 0, 24)  # two epochs of 96 blocks
    rows = np.concatenate([b[0][0] for b in batches])  # (192, L)
    source = BlockSource(blocks, L)
    all_ids = read_blocks(source.paths, L).input_ids
    key = lambda a: sorted(map(bytes, a.astype(np.int64)))  # noqa: E731
    assert key(rows[:96]) == key(all_ids)
    assert key(rows[96:]) == key(all_ids)
    assert not np.array_equal(rows[:96], rows[96:])


def test_ranks_and_microbatches_partition_the_global_batch(corpus: tuple[Path, Path]) -> None:
    blocks, _ = corpus
    whole = _take(blocks, _spec(), 5, 1)[0]
    parts = [_take(blocks, _spec(rank=r, world_size=2, grad_accum=2), 5, 1)[0] for r in (0, 1)]
    for r, (x0, x_t, t) in enumerate(parts):
        assert x0.shape == (2, 2, L) and t.shape == (2, 2)
        for j in range(2):  # micro j of rank r holds global rows r + 2 (j + 2 i)
            rows = [r + 2 * (j + 2 * i) for i in range(2)]
            np.testing.assert_array_equal(x0[j], whole[0][0][rows])
            np.testing.assert_array_equal(x_t[j], whole[1][0][rows])
            np.testing.assert_array_equal(t[j], whole[2][0][rows])


def test_online_masks_follow_the_schedule_with_stratified_t(corpus: tuple[Path, Path]) -> None:
    blocks, _ = corpus
    spec = _spec(global_batch=32)
    fracs, ts = [], []
    for x0, x_t, t in _take(blocks, spec, 0, 40):
        t = t[0]
        strata = np.floor(t * 32).astype(int)  # t_min is negligible here
        assert sorted(strata) == list(range(32))
        masked = x_t[0] == V
        assert np.all(x_t[0][~masked] == x0[0][~masked])
        fracs.append(masked.mean(1))
        ts.append(t)
    fracs_all, t_all = np.concatenate(fracs), np.concatenate(ts)
    resid = fracs_all - t_all  # linear schedule: P(masked) = t
    assert abs(resid.mean()) < 4 * np.sqrt(0.25 / (len(t_all) * L))


def test_precomputed_corruptions_rebuild_x_t_from_the_stored_masks(
    corpus: tuple[Path, Path],
) -> None:
    blocks, corr = corpus
    table = pa.concat_tables(pq.read_table(p) for p in sorted(corr.glob("*.parquet")))
    cols = [table.column(c).to_pylist() for c in ("block_id", "t", "draw", "mask")]
    by_t = {}  # t values are distinct random floats: t identifies (block, draw)
    for b, t, d, m in zip(*cols, strict=True):
        mask = np.unpackbits(np.frombuffer(m, np.uint8), count=L, bitorder="little")
        by_t[float(t)] = (b, d, mask)
    source = BlockSource(blocks, L)
    every = read_blocks(source.paths, L)
    all_ids, all_bids = every.input_ids, every.block_id
    spec = _spec(mode="precomputed", global_batch=96)  # one batch = one epoch
    for epoch, (x0, x_t, t) in enumerate(_take(blocks, spec, 0, 3, corr)):
        seen = set()
        for i in range(96):
            block, draw, mask = by_t[float(t[0, i])]
            assert draw == epoch % 2
            np.testing.assert_array_equal(x0[0, i], all_ids[all_bids == block][0])
            np.testing.assert_array_equal(x_t[0, i], np.where(mask.astype(bool), V, x0[0, i]))
            seen.add(block)
        assert len(seen) == 96


@pytest.mark.parametrize("background", [True, False])
def test_missing_corruption_shard_is_a_clear_error(
    corpus: tuple[Path, Path], tmp_path: Path, background: bool
) -> None:
    blocks, _ = corpus
    source, spec = BlockSource(blocks, L, tmp_path), _spec(mode="precomputed")
    with pytest.raises(RuntimeError) as info:
        loader = BatchLoader(source, spec, SCHED, 0, background=background)
        try:
            next(loader)
        finally:
            loader.close()
    assert "no corruption shard" in str(info.value.__cause__)


@pytest.mark.parametrize("background", [True, False])  # a GPU's loader thread; the CPU's none
def test_the_loader_matches_the_synchronous_stream(
    corpus: tuple[Path, Path], background: bool
) -> None:
    blocks, _ = corpus
    spec = _spec(grad_accum=2)
    expected = _take(blocks, spec, 3, 5)
    loader = BatchLoader(BlockSource(blocks, L), spec, SCHED, 3, background=background)
    assert (loader._thread is not None) == background
    try:
        for want in expected:
            got = next(loader)
            assert got.x0.dtype == torch.int64 and got.t.dtype == torch.float32
            for x, y in zip((got.x0, got.x_t, got.t), want, strict=True):
                np.testing.assert_array_equal(x.numpy(), y)
    finally:
        loader.close()
