"""Noise schedules: the survival probability alpha(t) of a clean token and what follows from it.

A schedule fixes alpha(t) on [0, 1] with alpha(0) = 1 and alpha(1) ~ 0. Everything else is
derived from it (docs/maths.md, sections 2 and 4):

* sigma(t) = -log alpha(t), the integrated rate, so P(t) = exp(sigma(t) Q0);
* beta(t) = sigma'(t) = -alpha'(t) / alpha(t), the instantaneous rate;
* the continuous-time NELBO weight  w(t) = -alpha'(t) / (1 - alpha(t));
* the discrete T-step weights       (alpha_s - alpha_t) / (1 - alpha_t),  s = t - 1/T;
* the discrete betas                beta_i = 1 - alpha(t_i) / alpha(t_{i-1}),
  so that prod_j (1 - beta_j) = alpha_i exactly.

Numerics. Every method works in the dtype of its input (use float64 for exactness checks).
``one_minus_alpha`` is computed in a form that keeps its relative precision as t -> 0
(1 - cos x = 2 sin^2(x/2); 1 - exp(-s) = -expm1(-s)), so w(t) stays accurate for tiny t.
w(t) still grows like 1/t: training and evaluation draw t from [t_min, 1]
(``DiffusionConfig.t_min``, 1e-5 by default, where w <= 1e5 is harmless in float32).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

from maskdiff.config import DiffusionConfig

__all__ = [
    "CosineSchedule",
    "GeometricSchedule",
    "LinearSchedule",
    "LogLinearSchedule",
    "PolynomialSchedule",
    "Schedule",
    "make_schedule",
    "sample_times",
]


class Schedule(ABC):
    """alpha(t) and its derivative; the rest is derived here once for all schedules."""

    name: str = "abstract"

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Probability that a token is still clean at time t."""

    @abstractmethod
    def dalpha(self, t: Tensor) -> Tensor:
        """d alpha / dt (non-positive)."""

    def one_minus_alpha(self, t: Tensor) -> Tensor:
        """1 - alpha(t), the masking probability; overridden where a stabler form exists."""
        return 1.0 - self.alpha(t)

    def sigma(self, t: Tensor) -> Tensor:
        """Integrated rate sigma(t) = -log alpha(t)."""
        return -torch.log(self.alpha(t))

    def beta(self, t: Tensor) -> Tensor:
        """Instantaneous rate beta(t) = sigma'(t) = -alpha'(t) / alpha(t)."""
        return -self.dalpha(t) / self.alpha(t)

    def weight(self, t: Tensor) -> Tensor:
        """Continuous NELBO weight w(t) = -alpha'(t) / (1 - alpha(t))."""
        return -self.dalpha(t) / self.one_minus_alpha(t)

    def discrete_weight(self, s: Tensor, t: Tensor) -> Tensor:
        """Discrete NELBO weight of step (s, t]: (alpha_s - alpha_t) / (1 - alpha_t)."""
        return (self.alpha(s) - self.alpha(t)) / self.one_minus_alpha(t)

    def grid(self, T: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """The discrete grid: s(i) = (i-1)/T and t(i) = i/T for i = 1..T, each of shape (T,)."""
        i = torch.arange(1, T + 1, dtype=dtype)
        return (i - 1) / T, i / T

    def discrete_betas(self, T: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """beta_i = 1 - alpha(t_i) / alpha(t_{i-1}) of the T-step chain Q_i, shape (T,).

        With these, alpha_i = prod_{j<=i} (1 - beta_j) reproduces alpha(i/T) exactly.
        """
        s, t = self.grid(T, dtype)
        return 1.0 - self.alpha(t) / self.alpha(s)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearSchedule(Schedule):
    """alpha(t) = 1 - t; w(t) = 1/t."""

    name = "linear"

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def dalpha(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)

    def one_minus_alpha(self, t: Tensor) -> Tensor:
        return t.clone()

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.log1p(-t)


class CosineSchedule(Schedule):
    """alpha(t) = cos(pi t / 2)."""

    name = "cosine"

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * t)

    def dalpha(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def one_minus_alpha(self, t: Tensor) -> Tensor:
        return 2.0 * torch.sin(0.25 * math.pi * t) ** 2


class LogLinearSchedule(Schedule):
    """MDLM's log-linear schedule: sigma(t) = -log(1 - (1 - eps) t), alpha(t) = 1 - (1 - eps) t.

    alpha(1) = eps, not 0: the prior term of the bound is then at most eps * L * log(V) nats and is
    neglected, as in MDLM. w(t) = 1/t, as for the linear schedule.
    """

    name = "loglinear"

    def __init__(self, eps: float = 1e-3) -> None:
        self.eps = eps

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - (1.0 - self.eps) * t

    def dalpha(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -(1.0 - self.eps))

    def one_minus_alpha(self, t: Tensor) -> Tensor:
        return (1.0 - self.eps) * t

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.log1p(-(1.0 - self.eps) * t)

    def __repr__(self) -> str:
        return f"LogLinearSchedule(eps={self.eps})"


class GeometricSchedule(Schedule):
    """SEDD's geometric schedule: sigma(t) = sigma_min^(1-t) sigma_max^t, alpha = exp(-sigma).

    alpha(0) = exp(-sigma_min) (1 - 1e-4 by default) and alpha(1) = exp(-sigma_max).
    """

    name = "geometric"

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0) -> None:
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self._log_ratio = math.log(sigma_max / sigma_min)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min ** (1.0 - t) * self.sigma_max**t

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-self.sigma(t))

    def dalpha(self, t: Tensor) -> Tensor:
        sigma = self.sigma(t)
        return -torch.exp(-sigma) * sigma * self._log_ratio

    def one_minus_alpha(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self.sigma(t))

    def __repr__(self) -> str:
        return f"GeometricSchedule(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class PolynomialSchedule(Schedule):
    """alpha(t) = 1 - t^k (MD4's polynomial family); w(t) = k / t."""

    name = "polynomial"

    def __init__(self, power: float = 2.0) -> None:
        self.power = power

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t**self.power

    def dalpha(self, t: Tensor) -> Tensor:
        return -self.power * t ** (self.power - 1.0)

    def one_minus_alpha(self, t: Tensor) -> Tensor:
        return t**self.power

    def __repr__(self) -> str:
        return f"PolynomialSchedule(power={self.power})"


def make_schedule(cfg: DiffusionConfig) -> Schedule:
    """The one place a schedule name becomes a schedule object."""
    factories = {
        "linear": LinearSchedule,
        "cosine": CosineSchedule,
        "loglinear": lambda: LogLinearSchedule(cfg.eps),
        "geometric": lambda: GeometricSchedule(cfg.sigma_min, cfg.sigma_max),
        "polynomial": lambda: PolynomialSchedule(cfg.power),
    }
    return factories[cfg.schedule]()


def sample_times(
    rng: np.random.Generator, global_batch: int, t_min: float, antithetic: bool
) -> np.ndarray:
    """t for every row of the global batch, (B,) float32 in [t_min, 1].

    Antithetic (stratified): ``u_b = (b + u) / B mod 1`` with one shared u ~ U[0, 1), so row b
    lies in stratum b; under DDP each rank takes its own rows, hence disjoint strata. Else iid.
    Then ``t = t_min + (1 - t_min) u``.
    """
    if antithetic:
        u = (np.arange(global_batch) + rng.random()) / global_batch % 1.0
    else:
        u = rng.random(global_batch)
    return (t_min + (1.0 - t_min) * u).astype(np.float32)
