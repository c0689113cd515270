"""Forward (noising) processes as continuous-time Markov chains over token states.

The maths, with derivations: docs/maths.md, sections 2, 3 and 5. Notation (its section 1): m real
tokens with ids 0..m-1, the mask token [M] has id m; ``1`` is the all-ones column and ``e_m`` the
one-hot row of [M]. Matrices act on one-hot *rows*: ``q(x_t | x_s) = x_s^T P x_t``.

* Absorbing process: rate matrix ``Q0 = 1 e_m^T - I`` on m+1 states (rows sum to 0, [M] absorbs).
* Uniform process:   ``Q0 = (1/m) 1 1^T - I`` on the m real states (SEDD, D3PM).

With rate beta(t) Q0 the Kolmogorov forward equation ``P'(t) = beta(t) P(t) Q0`` gives
``P(t) = exp(sigma(t) Q0)`` with sigma = int beta, which has the closed forms

* absorbing: ``P = alpha I + (1 - alpha) 1 e_m^T``,
* uniform:   ``P = alpha I + (1 - alpha) (1/m) 1 1^T``,      alpha = exp(-sigma).

The discrete chain of T steps uses ``Q_i = (1 - beta_i) I + beta_i 1 e_m^T`` and its product
``Qbar_i = Q_1 ... Q_i = alpha_i I + (1 - alpha_i) 1 e_m^T`` with alpha_i = prod_j (1 - beta_j).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "ForwardProcess",
    "absorbing_posterior",
    "cumulative_matrix",
    "marginal_matrix",
    "posterior_from_matrices",
    "step_matrix",
]

ProcessKind = Literal["absorbing", "uniform"]


@dataclass(frozen=True)
class ForwardProcess:
    """A forward process over ``vocab_size`` real tokens (m); absorbing adds [M] = id m."""

    kind: ProcessKind
    vocab_size: int

    def __post_init__(self) -> None:
        if self.kind not in ("absorbing", "uniform"):
            raise ValueError(f"unknown process {self.kind!r}")
        if self.vocab_size < 1:
            raise ValueError("vocab_size must be positive")

    @property
    def n_states(self) -> int:
        """Size of the state space: m + 1 with [M], m without."""
        return self.vocab_size + 1 if self.kind == "absorbing" else self.vocab_size

    @property
    def mask_id(self) -> int | None:
        return self.vocab_size if self.kind == "absorbing" else None

    def rate_matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Q0 of shape (n, n); every row sums to zero."""
        n, m = self.n_states, self.vocab_size
        eye = torch.eye(n, dtype=dtype)
        if self.kind == "absorbing":
            return torch.ones(n, 1, dtype=dtype) @ _one_hot_row(m, n, dtype) - eye
        return torch.full((n, n), 1.0 / m, dtype=dtype) - eye

    def transition_matrix(self, alpha: Tensor | float) -> Tensor:
        """Closed form of P = exp(sigma Q0) for alpha = exp(-sigma); shape (..., n, n)."""
        alpha_t = torch.as_tensor(alpha, dtype=torch.float64)[..., None, None]
        n = self.n_states
        eye = torch.eye(n, dtype=alpha_t.dtype)
        if self.kind == "absorbing":
            jump = torch.ones(n, 1, dtype=alpha_t.dtype) @ _one_hot_row(self.vocab_size, n)
        else:
            jump = torch.full((n, n), 1.0 / self.vocab_size, dtype=alpha_t.dtype)
        return alpha_t * eye + (1.0 - alpha_t) * jump

    def transition_matrix_expm(self, sigma: Tensor | float) -> Tensor:
        """P = exp(sigma Q0) by ``torch.linalg.matrix_exp``; shape (..., n, n)."""
        sigma_t = torch.as_tensor(sigma, dtype=torch.float64)[..., None, None]
        return torch.linalg.matrix_exp(sigma_t * self.rate_matrix(torch.float64))

    def sample(
        self,
        x0: Tensor,
        move_prob: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Draw x_t ~ q(x_t | x0) for a token batch; returns ``(x_t, moved)``.

        ``x0``: (B, L) ids in [0, m). ``move_prob``: 1 - alpha(t), shape (B,) or scalar.
        Absorbing: each token independently becomes [M] with probability 1 - alpha.
        Uniform: each token is independently redrawn uniformly from the m tokens with
        probability 1 - alpha (it may redraw itself, as P's diagonal says).
        ``moved`` is the boolean (B, L) mask of positions that were hit.
        """
        p = torch.as_tensor(move_prob, dtype=torch.float32, device=x0.device)
        if p.dim() == 1:
            p = p[:, None]  # (B, 1)
        u = torch.rand(x0.shape, generator=generator, device=x0.device)  # (B, L)
        moved = u < p
        if self.kind == "absorbing":
            return torch.where(moved, torch.full_like(x0, self.vocab_size), x0), moved
        fresh = torch.randint(
            0, self.vocab_size, x0.shape, generator=generator, device=x0.device, dtype=x0.dtype
        )
        return torch.where(moved, fresh, x0), moved


def _one_hot_row(index: int, n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    row = torch.zeros(1, n, dtype=dtype)
    row[0, index] = 1.0
    return row


def step_matrix(beta: float | Tensor, vocab_size: int) -> Tensor:
    """Q_i = (1 - beta_i) I + beta_i 1 e_m^T of the discrete absorbing chain, shape (m+1, m+1)."""
    n = vocab_size + 1
    beta_t = torch.as_tensor(beta, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    jump = torch.ones(n, 1, dtype=torch.float64) @ _one_hot_row(vocab_size, n)
    return (1.0 - beta_t) * eye + beta_t * jump


def cumulative_matrix(betas: Tensor, vocab_size: int) -> Tensor:
    """Qbar_i = Q_1 Q_2 ... Q_i for every i, by explicit matrix products; shape (T, n, n)."""
    n = vocab_size + 1
    out = []
    acc = torch.eye(n, dtype=torch.float64)
    for beta in betas:
        acc = acc @ step_matrix(beta, vocab_size)
        out.append(acc)
    return torch.stack(out)


def marginal_matrix(alpha: float | Tensor, vocab_size: int) -> Tensor:
    """Closed form Qbar = alpha I + (1 - alpha) 1 e_m^T, shape (..., m+1, m+1)."""
    return ForwardProcess("absorbing", vocab_size).transition_matrix(alpha)


def absorbing_posterior(
    x_t: Tensor, x0: Tensor, alpha_s: Tensor, alpha_t: Tensor, vocab_size: int
) -> Tensor:
    """q(x_s | x_t, x0) of the absorbing process, probabilities of shape (B, L, m+1).

    For x_t = [M]:  [(alpha_s - alpha_t) onehot(x0) + (1 - alpha_s) e_m] / (1 - alpha_t).
    For x_t != [M]: the token is carried over, onehot(x_t).
    ``alpha_s``, ``alpha_t``: shape (B,) or scalars, with s < t.
    """
    n = vocab_size + 1
    a_s = torch.as_tensor(alpha_s, dtype=torch.float64).reshape(-1, 1, 1)  # (B|1, 1, 1)
    a_t = torch.as_tensor(alpha_t, dtype=torch.float64).reshape(-1, 1, 1)
    x0_hot = torch.nn.functional.one_hot(x0, n).to(torch.float64)  # (B, L, n)
    mask_hot = torch.zeros(n, dtype=torch.float64)
    mask_hot[vocab_size] = 1.0
    masked_post = ((a_s - a_t) * x0_hot + (1.0 - a_s) * mask_hot) / (1.0 - a_t)
    keep = torch.nn.functional.one_hot(x_t, n).to(torch.float64)
    is_masked = (x_t == vocab_size)[..., None]
    return torch.where(is_masked, masked_post, keep)


def posterior_from_matrices(P_s: Tensor, P_st: Tensor) -> Tensor:
    """Bayes' rule on transition matrices: post[i, j, k] = q(x_s = k | x_t = j, x0 = i).

    q(x_s = k | x_t = j, x0 = i) = P_s[i, k] P_st[k, j] / sum_k' P_s[i, k'] P_st[k', j],
    where P_s = P(0 -> s) and P_st = P(s -> t). Entries with q(x_t = j | x0 = i) = 0 are NaN.
    """
    joint = P_s[:, None, :] * P_st.transpose(0, 1)[None, :, :]  # (i, j, k)
    return joint / joint.sum(-1, keepdim=True)
