"""Ancestral sampling from a masked diffusion denoiser, and statistics of the samples.

The denoiser is any :class:`maskdiff.elbo.DenoiserFn` (the evaluator's interface); the AR judge of
the generative perplexity any :class:`maskdiff.elbo.ARModelFn`.

Reverse process of the absorbing chain on the grid t(i) = i/T, s(i) = (i - 1)/T, i = T..1.
Start from x_1 = all [M] (a prefix, if given, is written in and never changes). At step i each
masked position independently

    unmasks with probability  (alpha_s - alpha_t) / (1 - alpha_t)     (q(x_s | x_t, x0) with
    to a token  x ~ p_theta(x0 | x_t)   (float64 categorical, top-p)    SUBS: docs/maths.md, 6)

and stays [M] otherwise; the last step (s = 0) unmasks every remaining position (alpha(0) = 1).
Unmasked tokens are never touched again.

Cached variant (models without time conditioning): p_theta(x0 | x_t) then depends on x_t only,
so a row's probabilities are recomputed only when a token of that row changed since they were
last computed, and only at a step where one of its positions unmasks. Random numbers are drawn
identically in both variants, so with the same generator they return the same samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from maskdiff.config import SampleConfig
from maskdiff.elbo import ARModelFn, DenoiserFn, ar_token_nll
from maskdiff.runtime import inference_context, model_device
from maskdiff.schedule import Schedule

__all__ = [
    "GEN_PPL_LABEL",
    "SampleResult",
    "SampleStats",
    "ancestral_sample",
    "decode_samples",
    "distinct_n",
    "generate",
    "generative_perplexity",
    "sample_statistics",
    "top_p_filter",
    "unigram_entropy",
]

GEN_PPL_LABEL = "gen. PPL judged by the AR baseline trained on the same corpus"


@dataclass(frozen=True)
class SampleResult:
    tokens: Tensor  # (n, L) long, ids in [0, m)
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


def _categorical(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw in float64: ``probs`` (..., m), ``u`` (...) uniform -> ids (...)."""
    cdf = probs.cumsum(-1)  # (..., m)
    idx = torch.searchsorted(cdf, (u * cdf[..., -1])[..., None]).squeeze(-1)
    return idx.clamp(max=probs.shape[-1] - 1)


def _probs(denoiser: DenoiserFn, x: Tensor, t: float, vocab_size: int, top_p: float) -> Tensor:
    """p_theta(x0 | x_t) over the m real tokens, float64 (b, L, m)."""
    t_vec = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
    logits = denoiser(x, t_vec)[..., :vocab_size].to(torch.float64)  # (b, L, m)
    return top_p_filter(torch.softmax(logits, -1), top_p).cpu()


def ancestral_sample(
    denoiser: DenoiserFn,
    schedule: Schedule,
    vocab_size: int,
    *,
    n_samples: int,
    length: int,
    steps: int,
    generator: torch.Generator,
    prefix: Tensor | None = None,
    top_p: float = 1.0,
    cached: bool = False,
    device: torch.device | str | None = None,
) -> SampleResult:
    """Draw ``n_samples`` blocks of ``length`` tokens with ``steps`` reverse steps.

    ``prefix``: (P,) or (n_samples, P) token ids fixed at positions 0..P-1 (prefix-conditioned
    generation); None for unconditional samples. ``cached`` is valid only for a denoiser that
    ignores t (no time conditioning). Returns the tokens and the number of network calls.
    An ``nn.Module`` runs in eval mode (restored afterwards) on its own device by default.
    """
    m, device = vocab_size, model_device(denoiser, device)
    x = torch.full((n_samples, length), m, dtype=torch.long)  # (n, L), all [M]
    if prefix is not None:
        prefix = prefix.long().expand(n_samples, -1)
        if prefix.shape[1] >= length:
            raise ValueError("the prefix leaves no position to generate")
        x[:, : prefix.shape[1]] = prefix
    probs = torch.zeros(n_samples, length, m, dtype=torch.float64)  # cache (cached variant)
    stale = torch.ones(n_samples, dtype=torch.bool)  # rows whose cache is out of date
    calls = rows = 0
    with inference_context(denoiser):
        for i in range(steps, 0, -1):
            s, t = (i - 1) / steps, i / steps
            u_unmask = torch.rand(n_samples, length, dtype=torch.float64, generator=generator)
            u_token = torch.rand(n_samples, length, dtype=torch.float64, generator=generator)
            p_unmask = 1.0 if i == 1 else _unmask_probability(schedule, s, t)
            masked = x == m  # (n, L)
            unmask = masked & (u_unmask < p_unmask)  # (n, L)
            # cached: the rows that unmask something now and changed since their last call;
            # plain: every row, at every step while a [M] remains
            todo = unmask.any(-1) & stale if cached else masked.any().expand(n_samples)
            if bool(todo.any()):
                rows_idx = todo.nonzero().squeeze(-1)
                probs[rows_idx] = _probs(denoiser, x[rows_idx].to(device), t, m, top_p)
                calls, rows = calls + 1, rows + rows_idx.numel()
                stale[rows_idx] = False
            draw = _categorical(probs, u_token)  # (n, L)
            x = torch.where(unmask, draw, x)
            stale |= unmask.any(-1)
    return SampleResult(tokens=x, network_calls=calls, rows_evaluated=rows)


def _unmask_probability(schedule: Schedule, s: float, t: float) -> float:
    """(alpha_s - alpha_t) / (1 - alpha_t) in float64."""
    s64 = torch.tensor(s, dtype=torch.float64)
    t64 = torch.tensor(t, dtype=torch.float64)
    return float(schedule.discrete_weight(s64, t64))


def generate(
    denoiser: DenoiserFn,
    schedule: Schedule,
    vocab_size: int,
    cfg: SampleConfig,
    length: int,
    *,
    prefix_ids: Sequence[int] | None = None,
    time_conditioning: bool = False,
    device: torch.device | str | None = None,
) -> SampleResult:
    """:func:`ancestral_sample` driven by a :class:`SampleConfig` (``cfg.length`` overrides
    ``length``); the cache is used only when ``cfg.cached`` and the model ignores t."""
    return ancestral_sample(
        denoiser,
        schedule,
        vocab_size,
        n_samples=cfg.n_samples,
        length=cfg.length or length,
        steps=cfg.steps,
        generator=torch.Generator().manual_seed(cfg.seed),
        prefix=None if prefix_ids is None else torch.tensor(list(prefix_ids)),
        top_p=cfg.top_p,
        cached=cfg.cached and not time_conditioning,
        device=device,
    )


# ----------------------------------------------------------------------------- statistics


def decode_samples(tokens: Tensor, decode: Callable[[list[int]], str]) -> list[str]:
    """The samples as text, one string per row, through the tokenizer's ``decode``."""
    return [decode(row) for row in tokens.tolist()]


def unigram_entropy(tokens: Tensor) -> float:
    """Entropy (nats) of the empirical token frequencies pooled over all samples."""
    counts = torch.bincount(tokens.reshape(-1).long()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def distinct_n(tokens: Tensor, n: int) -> float:
    """Distinct-n rate: unique n-grams / all n-grams (n-grams within a sample, pooled)."""
    grams = tokens.long().unfold(1, n, 1).reshape(-1, n)  # (samples * (L - n + 1), n)
    if grams.shape[0] == 0:
        return math.nan
    return torch.unique(grams, dim=0).shape[0] / grams.shape[0]


def generative_perplexity(
    ar_model: ARModelFn,
    tokens: Tensor,
    vocab_size: int,
    first_log_probs: Tensor | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> tuple[float, int]:
    """exp(token-weighted mean NLL) of the samples under ``ar_model``; returns (PPL, tokens).

    Tokens 1..L-1 are scored given their left context; token 0 too when ``first_log_probs``
    (the AR baseline's first-token unigram) is given. Label it :data:`GEN_PPL_LABEL`: the judge
    is the AR baseline trained here, not a large pretrained model as in the papers.
    """
    total, count, device = 0.0, 0, model_device(ar_model, device)
    with inference_context(ar_model):
        for start in range(0, tokens.shape[0], batch_size):
            x = tokens[start : start + batch_size].cpu()
            nll = ar_token_nll(ar_model(x.to(device)).cpu(), x, vocab_size, first_log_probs)
            if first_log_probs is None:
                nll = nll[:, 1:]
            total, count = total + float(nll.sum()), count + nll.numel()
    return math.exp(total / count), count


@dataclass(frozen=True)
class SampleStats:
    n_samples: int
    length: int
    unigram_entropy: float  # nats
    distinct_1: float
    distinct_2: float
    distinct_3: float
    gen_ppl: float | None = None
    gen_ppl_tokens: int = 0
    gen_ppl_label: str = GEN_PPL_LABEL

    def to_dict(self) -> dict[str, float | int | str | None]:
        return {
            "samples.n": self.n_samples,
            "samples.length": self.length,
            "samples.unigram_entropy_nats": self.unigram_entropy,
            "samples.distinct_1": self.distinct_1,
            "samples.distinct_2": self.distinct_2,
            "samples.distinct_3": self.distinct_3,
            "samples.gen_ppl": self.gen_ppl,
            "samples.gen_ppl_tokens": self.gen_ppl_tokens,
            "samples.gen_ppl_label": self.gen_ppl_label,
        }


def sample_statistics(
    tokens: Tensor,
    vocab_size: int,
    ar_model: ARModelFn | None = None,
    first_log_probs: Tensor | None = None,
) -> SampleStats:
    """Unigram entropy, distinct-1/2/3 and (with an AR judge) the generative perplexity."""
    ppl, n_scored = (None, 0)
    if ar_model is not None:
        ppl, n_scored = generative_perplexity(ar_model, tokens, vocab_size, first_log_probs)
    return SampleStats(
        n_samples=tokens.shape[0],
        length=tokens.shape[1],
        unigram_entropy=unigram_entropy(tokens),
        distinct_1=distinct_n(tokens, 1),
        distinct_2=distinct_n(tokens, 2),
        distinct_3=distinct_n(tokens, 3),
        gen_ppl=ppl,
        gen_ppl_tokens=n_scored,
    )
