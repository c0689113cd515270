"""Sources with a known likelihood and their exact denoisers: the known answers of the evaluator.

* :class:`IIDSource`: tokens i.i.d. with marginals pi. Entropy per token H(pi); the exact
  denoiser predicts pi at every masked position whatever the context.
* :class:`MarkovSource`: a first-order chain with transition matrix A started from its
  stationary law pi. A block of L tokens has expected NLL H(pi) + (L - 1) h, with entropy rate
  h = -sum_ij pi_i A_ij log A_ij. The exact denoiser p(x0_l | x_t) is the posterior of token l
  given the unmasked tokens, by forward-backward over the chain with masked positions summed out.

Denoisers follow the evaluator's convention ``(x_t: (B, L) long, t: (B,)) -> logits (B, L, m+1)``
in float64: at masked positions the log posterior over the m real tokens and -inf on [M] (SUBS);
at unmasked positions the carry-over (0 on the observed token, -inf elsewhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["IIDSource", "MarkovSource", "carry_over_logits", "random_markov"]


def carry_over_logits(x_t: Tensor, masked_log_probs: Tensor, vocab_size: int) -> Tensor:
    """Assemble SUBS logits (B, L, m+1) from log-probabilities (B, L, m) at masked positions.

    Masked positions get ``masked_log_probs`` and -inf on [M]; unmasked positions are
    carried over: 0 on the observed token, -inf elsewhere.
    """
    B, L = x_t.shape
    m = vocab_size
    neg = torch.full((B, L, 1), -math.inf, dtype=torch.float64, device=x_t.device)
    masked = torch.cat([masked_log_probs.to(torch.float64), neg], dim=-1)  # (B, L, m+1)
    keep = torch.full((B, L, m + 1), -math.inf, dtype=torch.float64, device=x_t.device)
    keep.scatter_(-1, x_t.clamp(max=m)[..., None].long(), 0.0)  # (B, L, m+1)
    return torch.where((x_t == m)[..., None], masked, keep)


def _entropy(p: Tensor) -> float:
    p = p.to(torch.float64)
    return float(-(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum())


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """Categorical draws by inverse CDF in float64; ``probs`` (..., m) -> ids (...)."""
    cdf = probs.to(torch.float64).cumsum(-1)
    u = torch.rand(probs.shape[:-1], dtype=torch.float64, generator=generator)
    u = u * cdf[..., -1]
    idx = torch.searchsorted(cdf, u[..., None]).squeeze(-1)
    return idx.clamp(max=probs.shape[-1] - 1)


@dataclass(frozen=True)
class IIDSource:
    """Tokens drawn i.i.d. from ``probs`` (m,), float64."""

    probs: Tensor

    @property
    def vocab_size(self) -> int:
        return int(self.probs.numel())

    def entropy(self) -> float:
        """H(pi) in nats per token: the exact NLL per token of this source."""
        return _entropy(self.probs)

    def sample(self, n: int, length: int, generator: torch.Generator | None = None) -> Tensor:
        """(n, length) long token blocks."""
        return _draw(self.probs.expand(n, length, -1), generator)

    def nll(self, x0: Tensor) -> Tensor:
        """Exact -log p(x0) per block, float64 (B,)."""
        return -torch.log(self.probs.to(torch.float64))[x0].sum(-1)

    def ar_logits(self, x: Tensor) -> Tensor:
        """The exact causal model: log pi at every position, logits (B, L, m)."""
        return torch.log(self.probs.to(torch.float64)).expand(*x.shape, -1)

    def denoiser(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Exact p(x0 | x_t): pi at every masked position; logits (B, L, m+1)."""
        logp = torch.log(self.probs.to(torch.float64)).expand(*x_t.shape, -1)  # (B, L, m)
        return carry_over_logits(x_t, logp, self.vocab_size)


@dataclass(frozen=True)
class MarkovSource:
    """A first-order chain, transition matrix A (m, m) (rows sum to 1), stationary start."""

    transition: Tensor

    @property
    def vocab_size(self) -> int:
        return int(self.transition.shape[0])

    @property
    def stationary(self) -> Tensor:
        """pi with pi A = pi, float64 (m,) (left eigenvector of eigenvalue 1)."""
        A = self.transition.to(torch.float64)
        evals, evecs = torch.linalg.eig(A.T)
        k = int(torch.argmin((evals - 1).abs()))
        pi = evecs[:, k].real
        return (pi / pi.sum()).clamp(min=0)

    def entropy_rate(self) -> float:
        """h = -sum_ij pi_i A_ij log A_ij, nats per token."""
        A = self.transition.to(torch.float64)
        row_h = torch.tensor([_entropy(row) for row in A], dtype=torch.float64)
        return float((self.stationary * row_h).sum())

    def block_entropy(self, length: int) -> float:
        """Expected -log p(x0) / L of a stationary block: (H(pi) + (L - 1) h) / L."""
        return (_entropy(self.stationary) + (length - 1) * self.entropy_rate()) / length

    def sample(self, n: int, length: int, generator: torch.Generator | None = None) -> Tensor:
        """(n, length) long blocks from the stationary chain."""
        A = self.transition.to(torch.float64)
        out = torch.empty(n, length, dtype=torch.long)
        out[:, 0] = _draw(self.stationary.expand(n, -1), generator)
        for pos in range(1, length):
            out[:, pos] = _draw(A[out[:, pos - 1]], generator)
        return out

    def nll(self, x0: Tensor) -> Tensor:
        """Exact -log p(x0) = -log pi(x_0) - sum_l log A(x_{l-1}, x_l), float64 (B,)."""
        logA = torch.log(self.transition.to(torch.float64))
        first = -torch.log(self.stationary)[x0[:, 0]]  # (B,)
        return first - logA[x0[:, :-1], x0[:, 1:]].sum(-1)

    def posterior(self, x_t: Tensor) -> Tensor:
        """p(x0_l = k | unmasked tokens of x_t) for every position, float64 (B, L, m).

        Forward-backward with evidence e_l(k) = 1 if x_t^l = [M] else 1[k = x_t^l]:
            a_0 = pi * e_0,   a_l = (a_{l-1} A) * e_l,      (normalised at every l)
            b_{L-1} = 1,      b_l = A (e_{l+1} * b_{l+1}),  (normalised at every l)
            p(x0_l = k | x_t) proportional to a_l(k) b_l(k).
        """
        m = self.vocab_size
        A = self.transition.to(torch.float64)
        B, L = x_t.shape
        onehot = torch.nn.functional.one_hot(x_t.clamp(max=m), m + 1)[..., :m].double()
        evidence = torch.where((x_t == m)[..., None], torch.ones_like(onehot), onehot)  # (B,L,m)
        fwd = torch.empty(B, L, m, dtype=torch.float64)
        bwd = torch.empty(B, L, m, dtype=torch.float64)
        a = self.stationary * evidence[:, 0]  # (B, m)
        fwd[:, 0] = a / a.sum(-1, keepdim=True)
        for pos in range(1, L):
            a = (fwd[:, pos - 1] @ A) * evidence[:, pos]  # (B, m)
            fwd[:, pos] = a / a.sum(-1, keepdim=True)
        bwd[:, L - 1] = 1.0 / m
        for pos in range(L - 2, -1, -1):
            b = (evidence[:, pos + 1] * bwd[:, pos + 1]) @ A.T  # (B, m)
            bwd[:, pos] = b / b.sum(-1, keepdim=True)
        post = fwd * bwd  # (B, L, m)
        return post / post.sum(-1, keepdim=True)

    def ar_logits(self, x: Tensor) -> Tensor:
        """The exact causal model: logits (B, L, m), position l gives log A[x_l, :] for l+1."""
        return torch.log(self.transition.to(torch.float64))[x]

    def denoiser(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Exact p(x0 | x_t) as SUBS logits (B, L, m+1); ignores t."""
        return carry_over_logits(x_t, torch.log(self.posterior(x_t)), self.vocab_size)


def random_markov(
    vocab_size: int, concentration: float, generator: torch.Generator | None = None
) -> MarkovSource:
    """A chain whose rows are Dirichlet(concentration) draws (small = peaky, strong dependence).

    Rows are floored at 1e-6 and renormalised so that every transition has positive probability
    (a fully connected chain: the stationary law is unique and every block has finite NLL).
    """
    gamma = torch.distributions.Gamma(
        torch.full((vocab_size, vocab_size), float(concentration), dtype=torch.float64), 1.0
    )
    if generator is not None:  # Gamma has no generator argument: seed through a fork
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            raw = gamma.sample()
    else:
        raw = gamma.sample()
    rows = raw / raw.sum(-1, keepdim=True)
    rows = rows.clamp(min=1e-6)
    return MarkovSource(rows / rows.sum(-1, keepdim=True))
