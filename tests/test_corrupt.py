"""Corruptions: determinism, shard independence, stratified t, masking rates, discrete grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from maskdiff.config import (
    CorruptionConfig,
    DataConfig,
    DiffusionConfig,
    MarkovConfig,
    TokenizerConfig,
)
from maskdiff.data.blocks import build_blocks
from maskdiff.data.contracts import CORRUPTION_FORMAT
from maskdiff.data.corrupt import build_corruptions, corrupt_shard, iter_corruptions
from maskdiff.data.ingest import ingest_documents
from maskdiff.data.stage import list_shards
from maskdiff.data.tokenizer import train_tokenizer

L = 48


def _blocks(root: Path, shard_rows: int) -> Path:
    markov = MarkovConfig(vocab_size=8, n_documents=300, doc_length=64)
    data = DataConfig(
        builtin="markov",
        markov=markov,
        seq_len=L,
        shard_rows=shard_rows,
        val_fraction=0.2,
        test_fraction=0.1,
        root=str(root),
    )
    docs = ingest_documents(data).path
    tok = train_tokenizer(TokenizerConfig(kind="char"), docs, root).path
    return build_blocks(data, docs, tok).path


@pytest.fixture(scope="module")
def blocks(tmp_path_factory) -> Path:
    return _blocks(tmp_path_factory.mktemp("runs"), shard_rows=40)


def _read(stage: Path, split: str) -> dict[str, np.ndarray]:
    batches = list(iter_corruptions(stage, split, batch_rows=100))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


CFG = CorruptionConfig(
    eval_draws=4, discrete_steps=True, train_epochs=2, train_draws=2, train_group=8, seed=3
)
DIFF = DiffusionConfig(schedule="cosine", T=[5, 20])


def test_eval_rows_are_stratified_and_gridded(blocks: Path, tmp_path: Path) -> None:
    res = build_corruptions(CFG, DIFF, blocks, tmp_path)
    assert res.manifest["stats"]["format"] == CORRUPTION_FORMAT
    rows = _read(res.path, "validation")
    n_blocks = len(np.unique(rows["block_id"]))
    assert len(rows["t"]) == n_blocks * (4 + 5 + 20)
    cont = rows["T"] == 0
    # continuous: draw k of every block lies in the k-th stratum [k/K, (k+1)/K)
    k = rows["draw"][cont]
    assert np.array_equal(np.floor(rows["t"][cont] * 4).astype(int), k)
    assert (rows["step"][cont] == 0).all()
    disc = ~cont
    np.testing.assert_allclose(rows["t"][disc], rows["step"][disc] / rows["T"][disc], rtol=1e-6)
    assert set(zip(rows["T"][disc], rows["step"][disc], strict=True)) == {
        (T, i) for T in (5, 20) for i in range(1, T + 1)
    }
    assert (np.diff(rows["block_id"]) >= 0).all()  # each block's rows are contiguous


def test_masking_rate_matches_schedule(blocks: Path, tmp_path: Path) -> None:
    # DIFF is the cosine schedule: a token is masked at time t with probability
    # 1 - alpha(t) = 1 - cos(pi t / 2), written out here (not the library's helper). Checked
    # on the whole split and in each quarter of [0, 1], to 4 binomial standard deviations.
    res = build_corruptions(CFG, DIFF, blocks, tmp_path)
    for split in ("validation", "train"):
        rows = _read(res.path, split)
        t = rows["t"].astype(np.float64)
        p = 1.0 - np.cos(np.pi * t / 2)  # (rows,)
        masked = rows["mask"].sum(axis=1)  # (rows,) out of L tokens each
        quarter = np.minimum((t * 4).astype(int), 3)
        for sel in [np.ones_like(t, dtype=bool)] + [quarter == q for q in range(4)]:
            assert sel.any(), split
            expected, sd = (p[sel] * L).sum(), np.sqrt((p[sel] * (1 - p[sel]) * L).sum())
            assert abs(masked[sel].sum() - expected) < 4 * sd, (split, masked[sel].sum(), expected)
    rows = _read(res.path, "validation")
    full = rows["t"] == 1.0  # t = 1: alpha(1) = 0, every token masked
    assert full.any() and rows["mask"][full].all()


def test_train_rows_are_antithetic_per_group(blocks: Path, tmp_path: Path) -> None:
    rows = _read(build_corruptions(CFG, DIFF, blocks, tmp_path).path, "train")
    n_blocks = len(np.unique(rows["block_id"]))
    assert len(rows["t"]) == n_blocks * 4  # 2 epochs x 2 draws
    assert set(np.unique(rows["draw"])) == {0, 1, 2, 3}
    for draw in range(4):
        sel = rows["draw"] == draw
        t, ids = rows["t"][sel], rows["block_id"][sel]
        for g in range(n_blocks // 8):  # full groups: one t in each of the 8 strata
            strata = np.floor(t[ids // 8 == g] * 8).astype(int)
            assert sorted(strata) == list(range(8))
    first = rows["t"][rows["draw"] == 0]
    second = rows["t"][rows["draw"] == 1]
    assert not np.allclose(first, second)


def test_deterministic_and_independent_of_sharding(blocks: Path, tmp_path: Path) -> None:
    a = build_corruptions(CFG, DIFF, blocks, tmp_path / "a")
    b = build_corruptions(CFG, DIFF, blocks, tmp_path / "b")
    assert a.content_hash == b.content_hash
    other_blocks = _blocks(tmp_path / "resharded", shard_rows=17)
    c = build_corruptions(CFG, DIFF, other_blocks, tmp_path / "c")
    for split in ("train", "validation"):
        x, y = _read(a.path, split), _read(c.path, split)
        key_x = np.lexsort((x["draw"], x["step"], x["T"], x["block_id"]))
        key_y = np.lexsort((y["draw"], y["step"], y["T"], y["block_id"]))
        for col in ("block_id", "t", "mask"):
            np.testing.assert_array_equal(x[col][key_x], y[col][key_y])
    # one shard rebuilt alone equals the stored one
    shard = list_shards(blocks, "validation")[0]
    rebuilt = corrupt_shard(CFG, DIFF, shard, "validation", L, n_split=0)
    stored = pq.read_table(list_shards(a.path, "validation")[0])
    assert rebuilt.table(L).equals(stored)


def test_seed_and_discrete_cap(blocks: Path, tmp_path: Path) -> None:
    base = build_corruptions(CFG, DIFF, blocks, tmp_path)
    reseeded = build_corruptions(CFG.model_copy(update={"seed": 4}), DIFF, blocks, tmp_path)
    assert reseeded.path != base.path and reseeded.content_hash != base.content_hash
    capped_cfg = CFG.model_copy(update={"discrete_max_blocks": 3, "mode": "online"})
    capped = build_corruptions(capped_cfg, DIFF, blocks, tmp_path)
    rows = _read(capped.path, "validation")
    assert set(np.unique(rows["block_id"][rows["T"] > 0])) == {0, 1, 2}
    assert capped.manifest["stats"]["splits"]["train"]["rows"] == 0
