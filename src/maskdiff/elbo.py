"""The negative evidence lower bound (NELBO) of masked diffusion, term by term, in float64.

The derivations are in docs/maths.md, sections 6-10; notation as in its section 1: m real tokens
0..m-1, [M] = id m, a block x0 of L tokens, a corrupted block x_t = where(mask, [M], x0) and a
denoiser p_theta(x0 | x_t) given by logits (B, L, V) with V = m + 1 (SUBS: the [M] class never
predicted) or V = m. Only the first m classes are read:

    (1)  log p_theta(x0_l | x_t) = log_softmax(logits[..., :m])[x0_l]

so a denoiser that forgets to put -inf on its [M] class is still scored as a distribution over
the m real tokens. Per corrupted block, the masked cross-entropy is

    (2)  CE(x0, x_t) = sum_{l : x_t^l = [M]} -log p_theta(x0_l | x_t).

Continuous time, with w(t) = -alpha'(t) / (1 - alpha(t)) (``Schedule.weight``):

    (3)  L_inf(x0) = int_0^1 w(t) E_q[ CE(x0, x_t) ] dt,
         estimated per draw t ~ U[0, 1] (stratified) by  w(t) CE(x0, x_t).

Discrete time, T steps, s = (i - 1)/T, t = i/T:

    (4)  L_T(x0) = sum_{i=1}^T E_q[ (alpha_s - alpha_t) / (1 - alpha_t) CE(x0, x_{t(i)}) ],
         estimated per step by one draw x_{t(i)}; with every step stored, the block's estimate is
         the sum of its T terms; with steps i drawn uniformly, T times their mean (same thing).

Autoregressive baseline (a callable x -> logits whose position l predicts token l + 1):

    (5)  -log p(x0) = -log p_1(x0_0) - sum_{l=1}^{L-1} log p_AR(x0_l | x0_<l),

where p_1 is a context-free first-token distribution (the training split's unigram frequencies),
so the AR model is scored on the same L tokens per block as the diffusion bound.

Aggregation over a split (blocks b with L_b nats and N_b tokens): the per-token value is the
ratio r = sum_b L_b / sum_b N_b and its standard error the ratio (delta-method) estimator

    (6)  SE(r) = sqrt( sum_b (L_b - r N_b)^2 / (n (n - 1)) ) / mean_b N_b,

which is std(L_b) / (sqrt(n) L) when every block holds L tokens. It covers both the Monte Carlo
noise of the corruptions and the sampling of blocks.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from maskdiff.schedule import Schedule

__all__ = [
    "ARModelFn",
    "DenoiserFn",
    "ar_token_nll",
    "block_means",
    "continuous_terms",
    "discrete_terms",
    "masked_nll",
    "ratio_and_se",
    "token_log_probs",
    "unigram_log_probs",
]


class DenoiserFn(Protocol):
    """What the evaluator and the samplers call: any denoiser, a trained
    :class:`maskdiff.model.Denoiser`, an exact oracle or another codebase's model.

    ``(x_t: LongTensor (B, L), t: FloatTensor (B,)) -> logits (B, L, V)``, V = m + 1 or m; the
    logits of (1) are read from the first m classes only.
    """

    def __call__(self, x_t: Tensor, t: Tensor, /) -> Tensor: ...


class ARModelFn(Protocol):
    """An autoregressive model as (5) reads it: ``(x: LongTensor (B, L)) -> logits (B, L, V)``,
    position l predicting token l + 1."""

    def __call__(self, x: Tensor, /) -> Tensor: ...


def token_log_probs(logits: Tensor, x0: Tensor, vocab_size: int) -> Tensor:
    """Equation (1): log p(x0_l | x_t) over the m real classes, float64 of shape (B, L).

    ``logits``: (B, L, V) with V >= m; classes m.. (the [M] class) are ignored.
    ``x0``: (B, L) ids in [0, m).
    """
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"logits have {logits.shape[-1]} classes, expected >= {vocab_size}")
    logp = torch.log_softmax(logits[..., :vocab_size].to(torch.float64), dim=-1)  # (B, L, m)
    return logp.gather(-1, x0[..., None].long()).squeeze(-1)  # (B, L)


def masked_nll(logits: Tensor, x0: Tensor, mask: Tensor, vocab_size: int) -> Tensor:
    """Equation (2): sum over masked positions of -log p(x0_l | x_t), float64 of shape (B,).

    ``mask``: (B, L) bool, True where x_t is [M]. Unmasked positions contribute exactly 0
    (even where a carry-over denoiser puts -inf on every other class).
    """
    logp = token_log_probs(logits, x0, vocab_size)  # (B, L)
    return torch.where(mask, -logp, torch.zeros_like(logp)).sum(-1)  # (B,)


def continuous_terms(nll: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
    """Equation (3), one draw: w(t) CE with w(t) = -alpha'(t) / (1 - alpha(t)); shape (R,).

    ``nll``: (R,) masked cross-entropies; ``t``: (R,) the draws' times in (0, 1].
    """
    t64 = t.to(torch.float64)
    return schedule.weight(t64) * nll.to(torch.float64)  # (R,)


def discrete_terms(nll: Tensor, step: Tensor, T: int, schedule: Schedule) -> Tensor:
    """Equation (4), one step: (alpha_s - alpha_t) / (1 - alpha_t) CE; shape (R,).

    ``step``: (R,) integers i in 1..T; s = (i - 1)/T and t = i/T are rebuilt from i in float64
    (not from a stored float32 t), so the weights are exact.
    """
    i = step.to(torch.float64)
    if bool(((i < 1) | (i > T)).any()):
        raise ValueError(f"steps must lie in 1..{T}")
    weight = schedule.discrete_weight((i - 1.0) / T, i / T)  # (R,)
    return weight * nll.to(torch.float64)


def block_means(values: Tensor, block_index: Tensor, n_blocks: int) -> Tensor:
    """Mean of the rows' values per block, float64 of shape (n_blocks,).

    ``values``: (R,); ``block_index``: (R,) in [0, n_blocks). Every block must own a row.
    """
    idx = block_index.long()
    sums = torch.zeros(n_blocks, dtype=torch.float64).index_add_(0, idx, values.double())
    counts = torch.bincount(idx, minlength=n_blocks).to(torch.float64)
    if bool((counts == 0).any()):
        missing = int((counts == 0).sum())
        raise ValueError(f"{missing} of {n_blocks} blocks have no corruption rows")
    return sums / counts


def ratio_and_se(per_block: Tensor, n_tokens: Tensor) -> tuple[float, float]:
    """Equation (6): r = sum L_b / sum N_b and its standard error over the n blocks.

    ``per_block``: (n,) nats per block; ``n_tokens``: (n,) tokens per block. SE is NaN for n < 2.
    """
    L = per_block.to(torch.float64)
    N = n_tokens.to(torch.float64)
    n = L.numel()
    r = float(L.sum() / N.sum())
    if n < 2:
        return r, math.nan
    resid = L - r * N  # (n,)
    se = math.sqrt(float((resid**2).sum()) / (n * (n - 1))) / float(N.mean())
    return r, se


def ar_token_nll(
    logits: Tensor, x: Tensor, vocab_size: int, first_log_probs: Tensor | None
) -> Tensor:
    """Equation (5) per position: -log p(x_l | x_<l), float64 of shape (B, L).

    ``logits``: (B, L, V) from a causal model, position l predicting token l + 1 (the last
    position is unused). ``first_log_probs``: (m,) log-probabilities of the first token of a
    block (``unigram_log_probs``); None leaves column 0 as NaN (not scored), so callers that
    pass None must drop it explicitly.
    """
    nxt = token_log_probs(logits[:, :-1], x[:, 1:], vocab_size)  # (B, L-1)
    if first_log_probs is None:
        first = torch.full_like(nxt[:, :1], math.nan)  # (B, 1)
    else:
        first = first_log_probs.to(torch.float64)[x[:, 0].long()][:, None]  # (B, 1)
    return -torch.cat([first, nxt], dim=1)  # (B, L)


def unigram_log_probs(tokens: Tensor, vocab_size: int, smoothing: float = 1.0) -> Tensor:
    """Log unigram frequencies with add-``smoothing`` counts, float64 of shape (m,).

    p(k) = (count(k) + smoothing) / (n + m smoothing); the AR baseline's first-token model.
    """
    counts = torch.bincount(tokens.reshape(-1).long(), minlength=vocab_size).double()
    counts = counts[:vocab_size] + smoothing
    return torch.log(counts / counts.sum())
