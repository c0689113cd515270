"""The training objectives against hand computations."""

from __future__ import annotations

import math

import numpy as np
import torch

from maskdiff.config import DiffusionConfig
from maskdiff.loss import ar_loss, mdm_loss
from maskdiff.schedule import make_schedule, sample_times

M = 5


def test_mdm_loss_is_weighted_masked_cross_entropy_per_token() -> None:
    torch.manual_seed(0)
    B, L = 3, 7
    logits = torch.randn(B, L, M, dtype=torch.float64)
    x0 = torch.randint(0, M, (B, L))
    masked = torch.rand(B, L) < 0.5
    x_t = torch.where(masked, torch.full_like(x0, M), x0)
    t = torch.tensor([0.1, 0.5, 0.9])
    sched = make_schedule(DiffusionConfig(schedule="cosine"))
    got = mdm_loss(logits, x0, x_t, t, sched, M, 1e-5)
    logp = torch.log_softmax(logits, -1)
    total = 0.0
    for b in range(B):
        w = -sched.dalpha(t[b : b + 1].double()) / sched.one_minus_alpha(t[b : b + 1].double())
        for pos in range(L):
            if masked[b, pos]:
                total += float(w) * -float(logp[b, pos, x0[b, pos]])
    assert got.dtype == torch.float32
    assert math.isclose(float(got), total / (B * L), rel_tol=1e-5)


def test_mdm_loss_is_float32_under_bf16_logits_and_clamps_t() -> None:
    logits = torch.zeros(1, 4, M, dtype=torch.bfloat16)
    x0 = torch.zeros(1, 4, dtype=torch.long)
    x_t = torch.full_like(x0, M)
    sched = make_schedule(DiffusionConfig())  # linear: w = 1/t
    loss = mdm_loss(logits, x0, x_t, torch.zeros(1), sched, M, t_min=1e-3)
    assert loss.dtype == torch.float32
    assert math.isclose(float(loss), 1e3 * math.log(M), rel_tol=1e-5)  # 4 tokens / 4 tokens


def test_uniform_predictor_at_linear_schedule_gives_log_m_on_average() -> None:
    # E_t[w(t) * (#masked)] = E_t[(1/t) * t L] = L, so the per-token loss is log m.
    rng = np.random.default_rng(0)
    B, L = 512, 16
    t = torch.from_numpy(sample_times(rng, B, 1e-5, antithetic=True))
    x0 = torch.randint(0, M, (B, L))
    masked = torch.rand(B, L) < t[:, None]
    x_t = torch.where(masked, torch.full_like(x0, M), x0)
    loss = mdm_loss(torch.zeros(B, L, M), x0, x_t, t, make_schedule(DiffusionConfig()), M, 1e-5)
    assert abs(float(loss) - math.log(M)) < 0.1 * math.log(M)


def test_ar_loss_predicts_the_next_token() -> None:
    x0 = torch.tensor([[1, 2, 3, 4]])
    logits = torch.full((1, 4, M), -30.0)
    logits[0, torch.arange(3), x0[0, 1:]] = 30.0  # position l puts its mass on x_{l+1}
    assert float(ar_loss(logits, x0)) < 1e-10
    assert math.isclose(float(ar_loss(torch.zeros(1, 4, M), x0)), math.log(M), rel_tol=1e-6)


def test_antithetic_times_take_one_per_stratum_and_respect_t_min() -> None:
    rng = np.random.default_rng(1)
    t = sample_times(rng, 16, 0.01, antithetic=True)
    u = (t - 0.01) / 0.99
    assert sorted(np.floor(u * 16).astype(int).tolist()) == list(range(16))
    iid = sample_times(rng, 1000, 0.01, antithetic=False)
    assert iid.min() >= 0.01 and iid.max() <= 1.0 and iid.dtype == np.float32
