"""Samplers of a masked diffusion denoiser: fill the gaps of templates, any number of steps.

A template is a row of token ids of any length P with [M] (id m) at the gaps; every other id is
known. Known tokens are written in at the start and never change; only gaps are sampled. A row
shorter than the model's block length L is placed at positions 0..P-1 of an L-block whose other
positions stay [M] throughout: free context the model marginalises over and the samplers never
decode (for an exact denoiser, p(x0_l | x_t) sums masked positions out, so leaving them masked
conditions on exactly the template). Rows longer than L are decoded semi-autoregressively.

Every sampler returns a :class:`SampleResult` (tokens, network calls, rows evaluated).

``ancestral``
    The model's reverse process. With ``steps`` >= the number of gap tokens it runs the
    continuous-time process exactly, by first hitting times: with n tokens still masked at time
    t, the next unmasking happens at s with 1 - alpha(s) = (1 - alpha(t)) u^(1/n), u ~ U(0, 1)
    (the latest of n masking times, each distributed as (1 - alpha(s)) / (1 - alpha(t))), at a
    position chosen uniformly among the masked ones, to a token drawn from p_theta(x0 | x_s).
    One token per network call, n calls: with the exact denoiser the gaps are drawn from the
    true conditional law given the known tokens. With fewer steps it runs the T-step chain on
    the grid t(i) = i / T (each masked position unmasks with probability
    (alpha_s - alpha_t) / (1 - alpha_t), independently), the process whose NELBO is the T-step
    bound: exact for that discretisation, and tokens unmasked at the same step are drawn
    independently given x_t, which is what few steps trade away. Models without time
    conditioning may use the cache (a row is re-evaluated only after one of its tokens changed).
``confidence``
    MaskGIT / LLaDA's low-confidence remasking: every step draws a token at every gap from
    p_theta(x0 | x_t) and keeps the k most confident (probability of the drawn token, or the
    margin between the two most probable tokens); k follows the noise schedule, at least one a
    step, so that min(steps, gap tokens) calls fill every gap. Not a sampler of the model's
    law: it favours likely tokens (lower NLL, less diversity); it needs fewest calls for a given
    quality on peaky models.
``remask``
    ReMDM (max-capped): the T-step chain where already decoded gap tokens (never known ones) are
    re-masked with probability sigma_t = min(eta, (1 - alpha_s) / alpha_t) per step, and masked
    positions unmask with probability (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t), so the
    share of masked tokens still follows alpha. Late steps can correct early mistakes; one call
    every step (nothing is cached); eta = 0 is the plain T-step chain.
semi-autoregressive (any sampler, rows longer than L)
    MDLM's semi-AR: decode the first L positions, then slide the window so that its first
    ``context`` positions are the last ones already decoded (known left context), and repeat.
    Known tokens right of the window are not seen until the window reaches them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from maskdiff.elbo import DenoiserFn
from maskdiff.runtime import inference_context, model_device
from maskdiff.schedule import Schedule

__all__ = [
    "CONFIDENCE_MEASURES",
    "SAMPLERS",
    "SampleResult",
    "confidence_counts",
    "fill",
    "first_hitting_time",
    "top_p_filter",
]

SAMPLERS = ("ancestral", "confidence", "remask")
CONFIDENCE_MEASURES = ("prob", "margin")


@dataclass(frozen=True)
class SampleResult:
    tokens: Tensor  # (n, P) long, ids in [0, m)
    network_calls: int  # denoiser invocations
    rows_evaluated: int  # sum of the batch sizes of those invocations


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering: keep the most probable tokens until their mass reaches ``top_p``.

    ``probs``: (..., m) float64. A token is kept when the mass of the tokens ranked above it is
    below ``top_p`` (so the token that crosses the threshold is kept); the rest is renormalised.
    """
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(-1, descending=True)  # (..., m)
    before = sorted_p.cumsum(-1) - sorted_p  # mass ranked above each token
    kept_sorted = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
    kept = torch.zeros_like(probs).scatter(-1, order, kept_sorted)
    return kept / kept.sum(-1, keepdim=True)


def categorical(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw in float64: ``probs`` (..., m), ``u`` (...) uniform -> ids (...)."""
    cdf = probs.cumsum(-1)  # (..., m)
    idx = torch.searchsorted(cdf, (u * cdf[..., -1])[..., None]).squeeze(-1)
    return idx.clamp(max=probs.shape[-1] - 1)


class _Net:
    """The denoiser as the samplers call it: p_theta(x0 | x_t) over the m real tokens (float64,
    top-p filtered, on the CPU), counting calls and rows."""

    def __init__(self, denoiser: DenoiserFn, m: int, top_p: float, device: torch.device) -> None:
        self.denoiser, self.m, self.top_p, self.device = denoiser, m, top_p, device
        self.calls = self.rows = 0

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        t_vec = torch.as_tensor(t, dtype=torch.float32).expand(x.shape[0]).to(self.device)
        logits = self.denoiser(x.to(self.device), t_vec)[..., : self.m].to(torch.float64)
        self.calls, self.rows = self.calls + 1, self.rows + x.shape[0]
        return top_p_filter(torch.softmax(logits, -1), self.top_p).cpu()  # (b, L, m)


def _unmask_probability(schedule: Schedule, s: float, t: float) -> float:
    """(alpha_s - alpha_t) / (1 - alpha_t) in float64."""
    s64 = torch.tensor(s, dtype=torch.float64)
    t64 = torch.tensor(t, dtype=torch.float64)
    return float(schedule.discrete_weight(s64, t64))


def _alpha(schedule: Schedule, t: float) -> float:
    return float(schedule.alpha(torch.tensor(t, dtype=torch.float64)))


# ----------------------------------------------------------------------------- the cores
# Each core fills, in place, the positions of ``x`` (n, L) where ``decode`` is True and x is
# [M]; other [M] positions are free context and stay [M].


def _ancestral_grid(
    net: _Net, schedule: Schedule, x: Tensor, decode: Tensor, steps: int, gen: torch.Generator,
    cached: bool,
) -> None:  # fmt: skip
    """The T-step chain (module docstring). ``cached``: a row is evaluated only at a step where
    one of its positions unmasks and after a token of it changed (valid without t-conditioning);
    random numbers are drawn identically either way, so both return the same tokens."""
    n, L = x.shape
    m = net.m
    probs = torch.zeros(n, L, m, dtype=torch.float64)
    stale = torch.ones(n, dtype=torch.bool)  # rows whose cached probabilities are out of date
    for i in range(steps, 0, -1):
        s, t = (i - 1) / steps, i / steps
        u_unmask = torch.rand(n, L, dtype=torch.float64, generator=gen)
        u_token = torch.rand(n, L, dtype=torch.float64, generator=gen)
        p_unmask = 1.0 if i == 1 else _unmask_probability(schedule, s, t)
        masked = decode & (x == m)  # (n, L)
        unmask = masked & (u_unmask < p_unmask)
        # cached: rows that unmask something now and changed since their last call;
        # plain: every row, at every step while a gap remains
        todo = unmask.any(-1) & stale if cached else masked.any().expand(n)
        if bool(todo.any()):
            rows = todo.nonzero().squeeze(-1)
            probs[rows] = net(x[rows], t)
            stale[rows] = False
        x.copy_(torch.where(unmask, categorical(probs, u_token), x))
        stale |= unmask.any(-1)


def first_hitting_time(schedule: Schedule, t: Tensor, n_masked: Tensor, u: Tensor) -> Tensor:
    """The time s < t of the next unmasking when ``n_masked`` tokens are masked at ``t``:
    1 - alpha(s) = (1 - alpha(t)) u^(1 / n), solved by bisection in float64 (1 - alpha is
    increasing). All arguments (b,); returns (b,) float64."""
    t = t.to(torch.float64)
    target = schedule.one_minus_alpha(t) * u.to(torch.float64) ** (1.0 / n_masked.double())
    lo, hi = torch.zeros_like(t), t.clone()
    for _ in range(60):  # 2^-60: float64 resolution on [0, 1]
        mid = 0.5 * (lo + hi)
        below = schedule.one_minus_alpha(mid) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return hi


def _ancestral_first_hitting(
    net: _Net, schedule: Schedule, x: Tensor, decode: Tensor, gen: torch.Generator
) -> None:
    """The continuous-time reverse process, one unmasking event per call (module docstring)."""
    n, L = x.shape
    m = net.m
    t = torch.ones(n, dtype=torch.float64)
    while True:
        todo = decode & (x == m)  # (n, L)
        left = todo.sum(-1)  # (n,)
        u_time = torch.rand(n, dtype=torch.float64, generator=gen)
        u_pos = torch.rand(n, L, dtype=torch.float64, generator=gen)
        u_token = torch.rand(n, dtype=torch.float64, generator=gen)
        rows = (left > 0).nonzero().squeeze(-1)
        if rows.numel() == 0:
            return
        s = first_hitting_time(schedule, t[rows], left[rows], u_time[rows])
        probs = net(x[rows], s)  # (b, L, m)
        pos = torch.where(todo[rows], u_pos[rows], -1.0).argmax(-1)  # uniform among masked
        x[rows, pos] = categorical(probs[torch.arange(rows.numel()), pos], u_token[rows])
        t[rows] = s


def confidence_counts(schedule: Schedule, n_gaps: Tensor, steps: int) -> Tensor:
    """Tokens to unmask at each of ``steps`` steps, per row: (n, steps) long, rows summing to
    ``n_gaps``. The share still masked after step j follows (1 - alpha(s_j)) / (1 - alpha(1)),
    s_j = 1 - (j + 1) / steps; a row with at least ``steps`` gaps unmasks at least one a step."""
    s = 1.0 - torch.arange(1, steps + 1, dtype=torch.float64) / steps
    share = schedule.one_minus_alpha(s) / schedule.one_minus_alpha(torch.ones((), dtype=s.dtype))
    n = n_gaps.to(torch.float64)[:, None]
    left = torch.floor(n * share + 0.5).long()  # (n, steps): still masked after each step
    left[:, -1] = 0
    prev = n_gaps.long().clone()
    for j in range(steps):  # non-increasing, and one a step while rows have enough gaps
        at_most = torch.where(n_gaps >= steps, prev - 1, prev)
        left[:, j] = torch.maximum(torch.minimum(left[:, j], at_most), torch.zeros_like(prev))
        enough = n_gaps >= steps
        left[:, j] = torch.where(enough, left[:, j].clamp(min=steps - 1 - j), left[:, j])
        prev = left[:, j]
    before = torch.cat([n_gaps.long()[:, None], left[:, :-1]], dim=1)
    return before - left


def _confidence(
    net: _Net, schedule: Schedule, x: Tensor, decode: Tensor, steps: int, gen: torch.Generator,
    measure: str,
) -> None:  # fmt: skip
    """Low-confidence remasking (module docstring): min(steps, most gaps in a row) calls."""
    n, L = x.shape
    m = net.m
    gaps = (decode & (x == m)).sum(-1)
    steps = max(1, min(steps, int(gaps.max()))) if int(gaps.max()) > 0 else 0
    counts = confidence_counts(schedule, gaps, steps) if steps else None
    for j in range(steps):
        t = 1.0 - j / steps
        u_token = torch.rand(n, L, dtype=torch.float64, generator=gen)
        k = counts[:, j]  # type: ignore[index]
        rows = (k > 0).nonzero().squeeze(-1)
        if rows.numel() == 0:
            continue
        probs = net(x[rows], t)  # (b, L, m)
        draw = categorical(probs, u_token[rows])  # (b, L)
        if measure == "margin":
            top2 = probs.topk(2, dim=-1).values
            conf = top2[..., 0] - top2[..., 1]
        else:
            conf = probs.gather(-1, draw[..., None]).squeeze(-1)
        todo = decode[rows] & (x[rows] == m)
        conf = torch.where(todo, conf, -math.inf)
        order = torch.sort(conf, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(L).expand_as(order))
        chosen = todo & (rank < k[rows, None])
        x[rows] = torch.where(chosen, draw, x[rows])


def _remask(
    net: _Net, schedule: Schedule, x: Tensor, decode: Tensor, steps: int, gen: torch.Generator,
    eta: float,
) -> None:  # fmt: skip
    """ReMDM with the max-capped remasking probability (module docstring): ``steps`` calls."""
    n, L = x.shape
    m = net.m
    for i in range(steps, 0, -1):
        s, t = (i - 1) / steps, i / steps
        u = torch.rand(n, L, dtype=torch.float64, generator=gen)
        u_token = torch.rand(n, L, dtype=torch.float64, generator=gen)
        a_s, a_t = _alpha(schedule, s), _alpha(schedule, t)
        if i == 1:
            sigma, p_unmask = 0.0, 1.0
        else:
            sigma = min(eta, (1.0 - a_s) / a_t) if a_t > 0 else eta
            p_unmask = (a_s - (1.0 - sigma) * a_t) / (1.0 - a_t)
        masked = decode & (x == m)
        generated = decode & (x != m)
        if not bool((masked | generated).any()):
            return
        probs = net(x, t)
        draw = categorical(probs, u_token)
        x.copy_(torch.where(masked & (u < p_unmask), draw, x))
        x.copy_(torch.where(generated & (u < sigma), torch.full_like(x, m), x))


# ----------------------------------------------------------------------------- entry point


def fill(
    denoiser: DenoiserFn,
    schedule: Schedule,
    vocab_size: int,
    template: Tensor,
    *,
    block_length: int,
    steps: int,
    generator: torch.Generator,
    sampler: str = "ancestral",
    top_p: float = 1.0,
    cached: bool = False,
    confidence: str = "prob",
    remask_eta: float = 0.02,
    context: int | None = None,
    first_hitting: bool | None = None,
    free: Tensor | None = None,
    device: torch.device | str | None = None,
) -> SampleResult:
    """Fill the gaps ([M] = ``vocab_size``) of ``template`` (n, P) with ``sampler``.

    ``free`` (n, P) bool, optional: [M] positions that are free context rather than gaps (rows of
    different lengths in one batch: each padded with free [M] to a common P <= L).

    ``block_length``: the model's L. Rows shorter are padded with free [M] context; longer rows
    are decoded semi-autoregressively with ``context`` known positions carried into each next
    window (default L // 2). ``first_hitting`` (ancestral): None uses it when ``steps`` covers
    the gaps of a window, True always, False never (the T-step chain). ``cached`` applies to
    the T-step chain of a model without time conditioning. An ``nn.Module`` runs in eval mode
    (restored afterwards) on its own device unless ``device`` says otherwise.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if confidence not in CONFIDENCE_MEASURES:
        raise ValueError(f"unknown confidence {confidence!r}; choose prob or margin")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    m, L = vocab_size, block_length
    x = template.long().clone().cpu()
    if x.dim() != 2:
        raise ValueError(f"a template batch is (n, P), got shape {tuple(x.shape)}")
    if bool(((x < 0) | (x > m)).any()):
        raise ValueError(f"template ids must lie in [0, {m}] ({m} = [MASK])")
    context = L // 2 if context is None else context
    if x.shape[1] > L and not 0 <= context < L:
        raise ValueError(f"the semi-autoregressive context must lie in [0, {L}), got {context}")
    net = _Net(denoiser, m, top_p, model_device(denoiser, device))

    def core(window: Tensor, decode: Tensor) -> None:
        if sampler == "confidence":
            _confidence(net, schedule, window, decode, steps, generator, confidence)
        elif sampler == "remask":
            _remask(net, schedule, window, decode, steps, generator, remask_eta)
        else:
            most = int((decode & (window == m)).sum(-1).max()) if window.numel() else 0
            if first_hitting or (first_hitting is None and steps >= most):
                _ancestral_first_hitting(net, schedule, window, decode, generator)
            else:
                _ancestral_grid(net, schedule, window, decode, steps, generator, cached)

    free = torch.zeros_like(x, dtype=torch.bool) if free is None else free.cpu().bool()
    if free.shape != x.shape:
        raise ValueError(f"free has shape {tuple(free.shape)}, the template {tuple(x.shape)}")
    with inference_context(denoiser):
        _windows(x, free, m, L, context, core)
    return SampleResult(tokens=x, network_calls=net.calls, rows_evaluated=net.rows)


def _windows(
    x: Tensor, free: Tensor, m: int, L: int, context: int, core: Callable[[Tensor, Tensor], None]
) -> None:
    """Run ``core`` on each L-window of ``x`` (n, P) in place: one window when P <= L, else
    windows starting every L - ``context`` positions; the last window is padded with free
    [M]. ``free`` (n, P): [M] positions that are context, not gaps."""
    n, P = x.shape
    start = 0
    while True:
        end = min(start + L, P)
        window = torch.full((n, L), m, dtype=torch.long)
        window[:, : end - start] = x[:, start:end]
        decode = torch.zeros(n, L, dtype=torch.bool)  # the gaps left; the rest is known
        decode[:, : end - start] = (x[:, start:end] == m) & ~free[:, start:end]
        core(window, decode)
        x[:, start:end] = window[:, : end - start]
        if end == P:
            return
        start = end - context
