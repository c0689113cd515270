"""Known answers of the evaluator: exact denoisers of sources whose likelihood is known."""

from __future__ import annotations

import itertools
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from maskdiff.config import EvalConfig
from maskdiff.data.contracts import blocks_schema, corruptions_schema, pack_mask, shard_name
from maskdiff.elbo import ratio_and_se, unigram_log_probs
from maskdiff.eval_table import comparison_table
from maskdiff.evaluate import (
    Corruptions,
    estimate_nelbo,
    evaluate_ar,
    evaluate_blocks,
    evaluate_stage,
    grid_corruptions,
    paired_difference,
    stratified_corruptions,
)
from maskdiff.oracle import IIDSource, MarkovSource
from maskdiff.schedule import CosineSchedule, LinearSchedule

STICKY = MarkovSource(0.7 * torch.eye(3, dtype=torch.float64) + 0.1)  # uniform stationary law
IID = IIDSource(torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64))
PI = [0.5, 0.3, 0.2]  # stationary law of SKEW: asymmetric transitions, non-uniform law
SKEW = MarkovSource(
    0.6 * torch.eye(3, dtype=torch.float64) + 0.4 * torch.tensor([PI] * 3, dtype=torch.float64)
)


def _blocks(src: IIDSource | MarkovSource, n: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x0 = src.sample(n, length, g)
    return x0, torch.full((n,), 2 * length), g  # 2 bytes per token


def test_iid_continuous_and_discrete_equal_entropy() -> None:
    x0, n_bytes, g = _blocks(IID, 1500, 16, seed=0)
    sched = LinearSchedule()
    corr = [stratified_corruptions(x0, 4, sched, g)]
    corr += [grid_corruptions(x0, T, sched, g) for T in (1, 4, 32)]
    res = evaluate_blocks(IID.denoiser, x0, n_bytes, corr, sched, 4, batch_size=2048, seed=0)
    cont = res.continuous
    assert cont is not None and cont.se > 0
    assert abs(cont.nats_per_token - IID.entropy()) < 3 * cont.se
    for T, est in res.discrete.items():
        assert abs(est.nats_per_token - IID.entropy()) < 3 * est.se, T
        diff, se = paired_difference(est, cont)
        assert abs(diff) < 3 * se, T  # independent tokens: L_T = L_inf for every T
    # reporting: token-weighted, bits per byte from the blocks' bytes
    assert cont.n_tokens == 1500 * 16 and cont.n_bytes == 1500 * 32
    assert math.isclose(cont.bits_per_byte, cont.nats_per_token / 2 / math.log(2))
    assert math.isclose(cont.perplexity, math.exp(cont.nats_per_token))
    assert math.isclose(sum(cont.curve), cont.nats_per_token, rel_tol=1e-9)
    assert math.isclose(sum(res.discrete[32].curve), res.discrete[32].nats_per_token, rel_tol=1e-9)


class _NoCarryOver:
    """A denoiser that scores every position, masked or not, with a proper distribution that
    depends on the position, on t and on the token x_t holds there (V = m + 1; [M] gets a
    large logit, to be ignored):

        logit_k(l) = 0.3 (l + 1) k + t k^2 / 4 + 0.8 [x_t^l = k],   logit_[M] = 4.
    """

    m = 3

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        L = x_t.shape[1]
        k = torch.arange(self.m + 1, dtype=torch.float64)
        pos = torch.arange(1, L + 1, dtype=torch.float64)[:, None]
        logits = 0.3 * pos * k + t.double()[:, None, None] * k**2 / 4  # (B, L, m+1)
        logits = logits + 0.8 * torch.nn.functional.one_hot(x_t, self.m + 1).double()
        logits[..., self.m] = 4.0
        return logits

    def log_prob(self, row: list[int], t: float, pos: int, token: int) -> float:
        """log p(x0_pos = token | x_t = row), by hand over the m real classes."""
        scores = [
            0.3 * (pos + 1) * k
            + float(torch.tensor(t, dtype=torch.float32)) * k**2 / 4
            + 0.8 * (row[pos] == k)
            for k in range(self.m)
        ]
        return scores[token] - math.log(sum(math.exp(v) for v in scores))


def test_evaluator_scores_masked_positions_only_without_carry_over() -> None:
    # A denoiser that does not carry unmasked tokens over: the evaluator must still sum
    # -log p over the masked positions only. Reference computed here, row by row:
    #   continuous: per block, mean over its draws of w(t) sum_{l masked} -log p(x0_l | x_t),
    #               w(t) = (pi/2) sin(pi t/2) / (1 - cos(pi t/2)) (cosine schedule);
    #   T-step:     per block, sum over i of (alpha_s - alpha_t)/(1 - alpha_t) times the same CE;
    #   per token:  the sum over blocks / (n L).
    den, m, n, L = _NoCarryOver(), 3, 6, 5
    x0, n_bytes, g = _blocks(IIDSource(torch.tensor([0.2, 0.3, 0.5])), n, L, seed=8)
    sched = CosineSchedule()
    corr = [stratified_corruptions(x0, 3, sched, g), grid_corruptions(x0, 4, sched, g)]
    res = evaluate_blocks(den, x0, n_bytes, corr, sched, m, batch_size=7)

    def alpha(t: float) -> float:
        return math.cos(math.pi * t / 2)

    def cross_entropy(row: int, c: Corruptions) -> float:
        b, mask = int(c.block_index[row]), c.mask[row].tolist()
        x_t = [m if hit else tok for hit, tok in zip(mask, x0[b].tolist(), strict=True)]
        t = float(c.t[row])
        return -sum(den.log_prob(x_t, t, p, int(x0[b, p])) for p in range(L) if mask[p])

    for c, est in zip(corr, res.estimates, strict=True):
        per_block = [0.0] * n
        for r in range(c.block_index.numel()):
            t = float(c.t[r])
            if c.T == 0:
                w = (math.pi / 2) * math.sin(math.pi * t / 2) / (1 - alpha(t)) / 3  # K = 3
            else:
                s = (int(c.step[r]) - 1) / c.T
                w = (alpha(s) - alpha(t)) / (1 - alpha(t))
            per_block[int(c.block_index[r])] += w * cross_entropy(r, c)
        expected = torch.tensor(per_block, dtype=torch.float64)
        assert torch.allclose(est.per_block, expected, rtol=1e-12, atol=0)
        assert math.isclose(est.nats_per_token, sum(per_block) / (n * L), rel_tol=1e-12)


def test_markov_discrete_exceeds_continuous_and_decreases() -> None:
    L = 8
    x0, n_bytes, g = _blocks(STICKY, 2000, L, seed=1)
    sched = LinearSchedule()
    corr = [stratified_corruptions(x0, 16, sched, g)]
    corr += [grid_corruptions(x0, T, sched, g) for T in (1, 2, 4, 8, 64)]
    res = evaluate_blocks(STICKY.denoiser, x0, n_bytes, corr, sched, 3, batch_size=4096)
    cont = res.continuous
    assert cont is not None
    true_nll = float(STICKY.nll(x0).sum()) / x0.numel()
    # paired with the exact NLL of the same blocks: only the Monte Carlo noise remains
    diff_true, se_true = ratio_and_se(cont.per_block - STICKY.nll(x0), torch.full((2000,), L))
    assert math.isclose(diff_true + true_nll, cont.nats_per_token, rel_tol=1e-9)
    assert abs(diff_true) < 3 * se_true and abs(cont.nats_per_token - true_nll) < 3 * cont.se
    # T = 1 unmasks everything at once from the marginals: L H(pi) exactly
    assert math.isclose(res.discrete[1].nats_per_token, math.log(3), rel_tol=1e-12)
    gaps = []
    for T, est in sorted(res.discrete.items()):
        gap, se = paired_difference(est, cont)
        gaps.append(gap)
        assert gap > -3 * se, T  # L_T >= L_inf
        if T <= 8:
            assert gap > 3 * se, T  # and strictly above on a dependent source
    for T_small, T_big in [(1, 2), (2, 4), (4, 8), (8, 64)]:
        d, se = paired_difference(res.discrete[T_small], res.discrete[T_big])
        assert d > 3 * se, (T_small, T_big)  # decreasing in T
    assert gaps[-1] < 0.1 * gaps[0]  # ... toward L_inf


def test_schedule_invariance_linear_vs_cosine() -> None:
    x0, n_bytes, g = _blocks(STICKY, 2000, 8, seed=2)
    est = {}
    for sched in (LinearSchedule(), CosineSchedule()):
        corr = stratified_corruptions(x0, 4, sched, g)
        est[sched.name] = estimate_nelbo(STICKY.denoiser, x0, n_bytes, corr, sched, 3, 4096)
    diff, se = paired_difference(est["linear"], est["cosine"])
    assert se > 0 and abs(diff) < 3 * se
    true_nll = float(STICKY.nll(x0).sum()) / x0.numel()
    for e in est.values():
        assert abs(e.nats_per_token - true_nll) < 3 * e.se


def test_ar_oracle_is_exact_and_table() -> None:
    # SKEW's stationary law is PI by construction: pi A = 0.6 pi + 0.4 pi (sum_i pi_i) = pi.
    x0, n_bytes, g = _blocks(SKEW, 300, 8, seed=3)
    n, L = x0.shape

    def log_a(i: int, j: int) -> float:
        return math.log(0.6 * (i == j) + 0.4 * PI[j])

    def conditional(block: list[int]) -> float:
        """-sum_{l >= 1} log A(x_{l-1}, x_l) of one block, by hand."""
        return -sum(log_a(a, b) for a, b in itertools.pairwise(block))

    blocks = x0.tolist()
    cond = sum(conditional(b) for b in blocks)
    first = -sum(math.log(PI[b[0]]) for b in blocks)
    log_pi = torch.tensor(PI, dtype=torch.float64).log()
    ar = evaluate_ar(SKEW.ar_logits, x0, n_bytes, 3, log_pi, first_token="stationary law")
    assert math.isclose(ar.nats_per_token, (first + cond) / (n * L), rel_tol=1e-12)
    assert math.isclose(ar.conditional_nats_per_token, cond / (n * (L - 1)), rel_tol=1e-12)
    assert ar.n_tokens == x0.numel() and ar.n_bytes == int(n_bytes.sum())
    # the unigram first-token model of a training split, add-one counts by hand
    train = SKEW.sample(50, 8, g).reshape(-1).tolist()
    unigram = [(train.count(k) + 1) / (len(train) + 3) for k in range(3)]
    uni = evaluate_ar(SKEW.ar_logits, x0, n_bytes, 3, unigram_log_probs(torch.tensor(train), 3))
    first_uni = -sum(math.log(unigram[b[0]]) for b in blocks)
    assert uni.n_tokens == ar.n_tokens
    assert math.isclose(uni.nats_per_token, (first_uni + cond) / (n * L), rel_tol=1e-12)
    assert abs(first_uni - first) > 1e-3 * n  # the two first-token models are told apart
    sched = LinearSchedule()
    corr = [stratified_corruptions(x0, 2, sched, g), grid_corruptions(x0, 10, sched, g)]
    res = evaluate_blocks(SKEW.denoiser, x0, n_bytes, corr, sched, 3, split="test", seed=7)
    table = comparison_table(res, ar)
    assert (
        "| MDM (bound ≤) | continuous | 2 |" in table and "| MDM (bound ≤) | T=10 | 10 |" in table
    )
    assert "first token of each block: stationary law" in table
    assert "| AR (exact) |" in table and "EOS tokens included" in table and "`test`" in table
    d = res.to_dict()
    assert d["split"] == "test" and d["seed"] == 7 and d["nelbo.T10.n_tokens"] == 2400
    assert set(res.metrics()) >= {"nelbo.continuous.perplexity", "nelbo.T10.bits_per_byte"}


class _Shifted(torch.nn.Module):
    """A module denoiser: the exact Markov denoiser with a tempered (worse) posterior."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = torch.nn.Parameter(torch.tensor(temperature), requires_grad=False)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return STICKY.denoiser(x_t, t)[..., :3] / self.temperature  # V = m: no [M] class


def test_two_checkpoints_differ_only_by_model() -> None:
    x0, n_bytes, g = _blocks(STICKY, 400, 8, seed=4)
    sched = LinearSchedule()
    corr = [stratified_corruptions(x0, 2, sched, g)]
    exact = evaluate_blocks(STICKY.denoiser, x0, n_bytes, corr, sched, 3, batch_size=100)
    again = evaluate_blocks(STICKY.denoiser, x0, n_bytes, corr, sched, 3, batch_size=333)
    assert torch.allclose(exact.estimates[0].per_block, again.estimates[0].per_block, rtol=1e-12)
    worse_model = _Shifted(2.0).train()
    worse = evaluate_blocks(worse_model, x0, n_bytes, corr, sched, 3)
    assert worse_model.training  # the evaluator restores the module's mode
    diff, se = paired_difference(worse.estimates[0], exact.estimates[0])
    assert diff > 3 * se > 0  # the exact denoiser is the best one


def _write(table: pa.Table, folder, split: str, shards: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = table.num_rows
    for k in range(shards):
        lo, hi = k * rows // shards, (k + 1) * rows // shards
        pq.write_table(table.slice(lo, hi - lo), folder / shard_name(split, k))


def test_evaluate_stage_matches_in_memory(tmp_path) -> None:
    L, n = 11, 50  # L not a multiple of 8: exercises the bit packing
    x0, _, g = _blocks(STICKY, n, L, seed=5)
    n_bytes = torch.randint(L, 4 * L, (n,), generator=g)
    ids = torch.arange(1000, 1000 + n)
    blocks = pa.table(
        {"block_id": ids.numpy(), "input_ids": x0.int().tolist(), "n_bytes": n_bytes.int().numpy()},
        schema=blocks_schema(L),
    )
    _write(blocks, tmp_path / "blocks", "validation", 2)
    sched = LinearSchedule()
    corr = [stratified_corruptions(x0, 3, sched, g), grid_corruptions(x0, 5, sched, g)]
    cols: dict[str, list] = {k: [] for k in ("block_id", "t", "T", "step", "draw", "mask")}
    for c in corr:
        R = c.block_index.numel()
        perm = torch.randperm(R, generator=g)  # rows in any order, joined by block_id
        cols["block_id"] += ids[c.block_index[perm]].tolist()
        cols["t"] += c.t[perm].float().tolist()
        cols["T"] += [c.T] * R
        cols["step"] += (c.step[perm] if c.step is not None else torch.zeros(R)).int().tolist()
        cols["draw"] += [0] * R
        cols["mask"] += [bytes(row) for row in pack_mask(c.mask[perm].numpy())]
    _write(pa.table(cols, schema=corruptions_schema(L)), tmp_path / "corr", "validation", 3)
    manifest = {"config": {"corruption": {"seed": 11}, "diffusion": {"schedule": "linear"}}}
    (tmp_path / "corr" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "blocks" / "manifest.json").write_text('{"stats": {"vocab_size": 3, "mask_id": 3}}')
    got = evaluate_stage(
        STICKY.denoiser,
        tmp_path / "blocks",
        tmp_path / "corr",
        "validation",
        EvalConfig(batch_size=16),
    )
    ref = evaluate_blocks(
        STICKY.denoiser,
        x0,
        n_bytes,
        corr,
        sched,
        3,
        split="validation",
        seed=11,
    )
    assert got.seed == 11 and got.split == "validation"
    for a, b in zip(got.estimates, ref.estimates, strict=True):
        assert a.T == b.T and a.n_bytes == b.n_bytes == int(n_bytes.sum())
        # t is stored as float32 in parquet: equal to float32 precision
        assert math.isclose(a.nats_per_token, b.nats_per_token, rel_tol=1e-5)
    capped = evaluate_stage(
        STICKY.denoiser,
        tmp_path / "blocks",
        tmp_path / "corr",
        "validation",
        EvalConfig(max_blocks=20),
        schedule=sched,
        vocab_size=3,
    )
    assert capped.estimates[0].n_blocks == 20 and capped.estimates[1].rows_per_block == 5
    with pytest.raises(ValueError, match="drawn with"):
        evaluate_stage(
            STICKY.denoiser,
            tmp_path / "blocks",
            tmp_path / "corr",
            "validation",
            EvalConfig(),
            schedule=CosineSchedule(),
        )


def test_discrete_rows_on_a_subset_of_blocks() -> None:
    """A stage may give the T-step grids to the first blocks only: N counts those blocks."""
    x0, n_bytes, g = _blocks(STICKY, 300, 8, seed=6)
    sched = LinearSchedule()
    grid = grid_corruptions(x0[:100], 4, sched, g)  # rows for blocks 0..99 only
    cont = stratified_corruptions(x0, 4, sched, g)
    res = evaluate_blocks(STICKY.denoiser, x0, n_bytes, [cont, grid], sched, 3)
    sub = evaluate_blocks(STICKY.denoiser, x0[:100], n_bytes[:100], [grid], sched, 3)
    d4, full = res.discrete[4], res.continuous
    assert full is not None and full.n_blocks == 300 and d4.n_blocks == 100
    assert d4.n_tokens == 800 and d4.n_bytes == int(n_bytes[:100].sum())
    assert math.isclose(d4.nats_per_token, sub.discrete[4].nats_per_token, rel_tol=1e-12)
    diff, se = paired_difference(d4, full)  # on the 100 common blocks
    assert diff > 0 and se > 0
    table = comparison_table(res)
    assert "| 800 | 100 |" in table
    # the continuous bound on the T grid's 100 blocks, so the two rows compare like with like
    same = [r for r in table.splitlines() if "continuous, the 100 blocks of the T grids" in r]
    per_token = float(full.per_block[:100].sum()) / 800  # blocks 0..99, 8 tokens each
    assert len(same) == 1 and f"| {per_token:.4f} ± " in same[0]


def test_corruption_helpers_shapes() -> None:
    x0 = torch.zeros(6, 9, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    c = stratified_corruptions(x0, 4, LinearSchedule(), g)
    assert isinstance(c, Corruptions) and c.mask.shape == (24, 9) and c.T == 0
    strata = (c.t.reshape(6, 4) * 4).floor()
    assert torch.equal(strata, torch.arange(4.0, dtype=torch.float64).expand(6, 4))
    d = grid_corruptions(x0, 3, LinearSchedule(), g)
    assert d.step is not None and d.step.tolist()[:4] == [1, 2, 3, 1]
