"""The training objectives against hand computations, and against the evaluator's terms."""

from __future__ import annotations

import math

import numpy as np
import torch

from maskdiff.config import DiffusionConfig, ModelConfig
from maskdiff.elbo import continuous_terms, masked_nll
from maskdiff.evaluate import Corruptions, estimate_nelbo
from maskdiff.loss import Objective, ar_loss, mdm_loss
from maskdiff.model import build_model
from maskdiff.schedule import CosineSchedule, make_schedule, sample_times

M = 5


def test_mdm_loss_is_weighted_masked_cross_entropy_per_token() -> None:
    g = torch.Generator().manual_seed(0)
    B, L = 3, 7
    logits = torch.randn(B, L, M, dtype=torch.float64, generator=g)
    x0 = torch.randint(0, M, (B, L), generator=g)
    masked = torch.rand(B, L, generator=g) < 0.5
    x_t = torch.where(masked, torch.full_like(x0, M), x0)
    t = torch.tensor([0.1, 0.5, 0.9])
    sched = make_schedule(DiffusionConfig(schedule="cosine"))
    got = mdm_loss(logits, x0, x_t, t, sched, M, 1e-5)
    logp = torch.log_softmax(logits, -1)
    total = 0.0
    for b in range(B):
        tb = float(t[b])  # w(t) = (pi/2) sin(pi t/2) / (1 - cos(pi t/2)), cosine schedule
        w = (math.pi / 2) * math.sin(math.pi * tb / 2) / (1 - math.cos(math.pi * tb / 2))
        for pos in range(L):
            if masked[b, pos]:
                total += w * -float(logp[b, pos, x0[b, pos]])
    assert got.dtype == torch.float64  # float64 logits keep float64
    assert math.isclose(float(got), total / (B * L), rel_tol=1e-12)
    got32 = mdm_loss(logits.float(), x0, x_t, t, sched, M, 1e-5)
    assert got32.dtype == torch.float32
    assert math.isclose(float(got32), total / (B * L), rel_tol=1e-5)  # float32 round-off


def test_mdm_loss_is_float32_under_bf16_logits_and_clamps_t() -> None:
    logits = torch.zeros(1, 4, M, dtype=torch.bfloat16)
    x0 = torch.zeros(1, 4, dtype=torch.long)
    x_t = torch.full_like(x0, M)
    sched = make_schedule(DiffusionConfig())  # linear: w = 1/t
    loss = mdm_loss(logits, x0, x_t, torch.zeros(1), sched, M, t_min=1e-3)
    assert loss.dtype == torch.float32
    assert math.isclose(float(loss), 1e3 * math.log(M), rel_tol=1e-5)  # 4 tokens / 4 tokens


def test_uniform_predictor_at_linear_schedule_gives_log_m_on_average() -> None:
    # Row b contributes v_b = w(t_b) #masked_b log(m) / L with w = 1/t (linear schedule), and
    # E[v] = E_t[(1/t) t L] log(m) / L = log m. The loss is the mean of the v_b; the tolerance is
    # 4 standard errors std(v)/sqrt(B) (conservative: the t's are stratified, not i.i.d.).
    rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)
    B, L = 8192, 16
    t = torch.from_numpy(sample_times(rng, B, 1e-5, antithetic=True))
    x0 = torch.randint(0, M, (B, L), generator=g)
    masked = torch.rand(B, L, generator=g) < t[:, None]  # 1 - alpha(t) = t
    x_t = torch.where(masked, torch.full_like(x0, M), x0)
    loss = mdm_loss(torch.zeros(B, L, M), x0, x_t, t, make_schedule(DiffusionConfig()), M, 1e-5)
    v = masked.sum(1).double() / t.double() * math.log(M) / L  # (B,)
    assert math.isclose(float(loss), float(v.mean()), rel_tol=1e-5)
    se = float(v.std()) / math.sqrt(B)
    assert abs(float(loss) - math.log(M)) < 4 * se, (float(loss), se)


def test_training_loss_equals_evaluator_continuous_terms() -> None:
    # One formula, two implementations: on the same (x0, x_t, t) the training objective (a
    # per-token mean, float32) times B L equals the evaluator's sum of w(t) CE(x0, x_t) (float64).
    B, L = 16, 12
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the model's initial weights
        small = dict(n_layers=1, d_model=32, n_heads=2, max_seq_len=L)
        model = build_model(ModelConfig(preset="custom", time_conditioning=True, **small), M)
    g = torch.Generator().manual_seed(1)
    sched = CosineSchedule()
    t32 = torch.from_numpy(sample_times(np.random.default_rng(1), B, 1e-5, antithetic=True))
    x0 = torch.randint(0, M, (B, L), generator=g)
    p = 1.0 - torch.cos(math.pi * t32.double() / 2)[:, None]  # 1 - alpha(t), cosine schedule
    mask = torch.rand(B, L, generator=g, dtype=torch.float64) < p
    x_t = torch.where(mask, torch.full_like(x0, M), x0)
    loss = Objective(model, sched, t_min=1e-5)(x0, x_t, t32).detach()  # in training mode
    with torch.no_grad():
        nll = masked_nll(model(x_t, t32), x0, mask, M)  # (B,) float64
    terms = continuous_terms(nll, t32.double(), sched)  # (B,)
    assert mask.any() and not mask.all()  # unmasked tokens, which real_logits scores, too
    assert math.isclose(float(loss) * B * L, float(terms.sum()), rel_tol=1e-6)  # float32 loss
    # and through the evaluator itself: one corruption row per block
    corr = Corruptions(block_index=torch.arange(B), t=t32.double(), mask=mask)
    est = estimate_nelbo(model, x0, torch.full((B,), L), corr, sched, M)
    assert math.isclose(est.nats_per_token * B * L, float(terms.sum()), rel_tol=1e-12)
    assert math.isclose(float(loss), est.nats_per_token, rel_tol=1e-6)
    # on the same logits in float64, the two formulas agree to float64 round-off
    with torch.no_grad():
        real = model.real_logits(x_t, t32).double()  # (B, L, m), SUBS: no [M] column
        full = model(x_t, t32).double()  # (B, L, m + 1), what the evaluator is given
    loss64 = mdm_loss(real, x0, x_t, t32.double(), sched, M, 1e-5)
    terms64 = continuous_terms(masked_nll(full, x0, mask, M), t32.double(), sched)
    assert loss64.dtype == torch.float64
    assert math.isclose(float(loss64) * B * L, float(terms64.sum()), rel_tol=1e-12)


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
