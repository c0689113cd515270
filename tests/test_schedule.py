"""Noise schedules: endpoints, derivatives against autograd, weights, discrete betas."""

from __future__ import annotations

import math

import pytest
import torch

from maskdiff.config import DiffusionConfig
from maskdiff.schedule import (
    CosineSchedule,
    GeometricSchedule,
    LinearSchedule,
    LogLinearSchedule,
    PolynomialSchedule,
    make_schedule,
)

ALL = [
    LinearSchedule(),
    CosineSchedule(),
    LogLinearSchedule(1e-3),
    GeometricSchedule(1e-4, 20.0),
    PolynomialSchedule(2.0),
    PolynomialSchedule(0.5),
]
IDS = [repr(s) for s in ALL]
T_GRID = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)


@pytest.mark.parametrize("sched", ALL, ids=IDS)
def test_alpha_prime_matches_autograd(sched) -> None:
    t = T_GRID.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(sched.alpha(t).sum(), t)
    assert torch.allclose(sched.dalpha(T_GRID), grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sched", ALL, ids=IDS)
def test_sigma_and_beta_are_consistent(sched) -> None:
    # alpha = exp(-sigma), and beta = sigma' (checked against autograd of sigma).
    assert torch.allclose(torch.exp(-sched.sigma(T_GRID)), sched.alpha(T_GRID), rtol=1e-12)
    t = T_GRID.clone().requires_grad_(True)
    (dsigma,) = torch.autograd.grad(sched.sigma(t).sum(), t)
    assert torch.allclose(sched.beta(T_GRID), dsigma, rtol=1e-9)


@pytest.mark.parametrize("sched", ALL, ids=IDS)
def test_monotone_and_in_unit_interval(sched) -> None:
    a = sched.alpha(T_GRID)
    assert bool((a > 0).all() and (a < 1).all())
    assert bool((a[1:] < a[:-1]).all())
    assert torch.allclose(sched.one_minus_alpha(T_GRID), 1 - a, rtol=1e-10, atol=1e-15)


def test_endpoints() -> None:
    zero, one = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    for sched in (LinearSchedule(), CosineSchedule(), PolynomialSchedule(3.0)):
        assert sched.alpha(zero).item() == 1.0
        assert abs(sched.alpha(one).item()) < 1e-15
    loglin = LogLinearSchedule(1e-3)
    assert loglin.alpha(zero).item() == 1.0
    assert loglin.alpha(one).item() == pytest.approx(1e-3, rel=1e-12)
    geo = GeometricSchedule(1e-4, 20.0)
    assert geo.alpha(zero).item() == pytest.approx(math.exp(-1e-4), rel=1e-12)
    assert geo.alpha(one).item() == pytest.approx(math.exp(-20.0), rel=1e-9)


def test_known_weights() -> None:
    t = T_GRID
    assert torch.allclose(LinearSchedule().weight(t), 1 / t, rtol=1e-12)
    assert torch.allclose(LogLinearSchedule(1e-3).weight(t), 1 / t, rtol=1e-12)
    assert torch.allclose(PolynomialSchedule(3.0).weight(t), 3 / t, rtol=1e-12)
    cos = CosineSchedule().weight(t)
    expect = (math.pi / 2) * torch.sin(math.pi * t / 2) / (1 - torch.cos(math.pi * t / 2))
    assert torch.allclose(cos, expect, rtol=1e-9)


def _small_t_weight(sched, t: float) -> float:
    """The t -> 0 asymptote of w(t) = -alpha'(t) / (1 - alpha(t)), derived by hand.

    * linear, alpha = 1 - t:                      w = 1/t exactly;
    * log-linear, alpha = 1 - (1 - eps) t:        w = (1 - eps) / ((1 - eps) t) = 1/t exactly;
    * polynomial, alpha = 1 - t^k:                w = k t^(k-1) / t^k = k/t exactly;
    * cosine, alpha = cos(pi t/2):  w = (pi/2) sin(pi t/2) / (1 - cos(pi t/2))
                                      = (pi/2) cot(pi t/4) = 2/t (1 + O(t^2));
    * geometric, alpha = exp(-sigma), sigma = s_min^(1-t) s_max^t, sigma' = sigma ln(s_max/s_min):
        w = sigma ln(s_max/s_min) / (e^sigma - 1) -> s_min ln(s_max/s_min) / (e^s_min - 1),
      finite, since alpha(0) = exp(-s_min) < 1 (relative error O(s_min t ln(s_max/s_min))).
    """
    if isinstance(sched, (LinearSchedule, LogLinearSchedule)):
        return 1.0 / t
    if isinstance(sched, PolynomialSchedule):
        return sched.power / t
    if isinstance(sched, CosineSchedule):
        return 2.0 / t
    assert isinstance(sched, GeometricSchedule)
    s_min = sched.sigma_min
    return s_min * math.log(sched.sigma_max / s_min) / math.expm1(s_min)


@pytest.mark.parametrize("sched", ALL, ids=IDS)
@pytest.mark.parametrize(
    ("dtype", "times", "rtol"),
    [
        (torch.float32, [1e-5, 1e-6, 1e-7], 1e-6),  # 1e-5 = the default t_min; ~8 float32 ulps
        (torch.float64, [1e-6, 1e-9, 1e-12], 1e-8),  # the asymptotes' own error is below 1e-9
    ],
    ids=["float32", "float64"],
)
def test_weight_matches_small_t_asymptote(sched, dtype, times, rtol) -> None:
    # A naive 1 - alpha (1 - cos, 1 - exp(-sigma)) loses its relative precision here.
    t = torch.tensor(times, dtype=dtype)
    w = sched.weight(t)
    assert w.dtype == dtype
    for got, t_k in zip(w.tolist(), t.tolist(), strict=True):  # t as rounded to dtype
        assert got == pytest.approx(_small_t_weight(sched, t_k), rel=rtol), t_k


def test_cosine_small_t_relative_precision() -> None:
    # Naive 1 - cos(x) loses all digits at x ~ 1e-9; the stable form keeps them.
    t = torch.tensor([1e-9], dtype=torch.float64)
    exact = (math.pi * 1e-9 / 2) ** 2 / 2
    assert CosineSchedule().one_minus_alpha(t).item() == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("sched", ALL, ids=IDS)
@pytest.mark.parametrize("T", [1, 7, 100])
def test_discrete_betas_reproduce_alpha(sched, T) -> None:
    betas = sched.discrete_betas(T)
    assert bool(((betas >= 0) & (betas <= 1)).all())
    alphas = torch.cumprod(1 - betas, 0)
    _, t = sched.grid(T)
    assert torch.allclose(alphas, sched.alpha(t) / sched.alpha(torch.zeros(1, dtype=t.dtype)))


@pytest.mark.parametrize("sched", ALL[:3], ids=IDS[:3])
def test_discrete_weights_sum_and_converge(sched) -> None:
    # sum_i (alpha_s - alpha_t)/(1 - alpha_t) approximates int w(t) dt only after the 1/t
    # singularity is cut; compare on [0.1, 1] with a fine grid against a midpoint integral.
    T = 20000
    s, t = sched.grid(T)
    keep = s >= 0.1
    discrete = sched.discrete_weight(s[keep], t[keep]).sum().item()
    mid = (s[keep] + t[keep]) / 2
    integral = (sched.weight(mid) / T).sum().item()
    assert discrete == pytest.approx(integral, rel=1e-3)


def test_factory_dispatch() -> None:
    for name, cls in [
        ("linear", LinearSchedule),
        ("cosine", CosineSchedule),
        ("loglinear", LogLinearSchedule),
        ("geometric", GeometricSchedule),
        ("polynomial", PolynomialSchedule),
    ]:
        assert isinstance(make_schedule(DiffusionConfig(schedule=name)), cls)
    assert make_schedule(DiffusionConfig(schedule="polynomial", power=3.0)).power == 3.0
