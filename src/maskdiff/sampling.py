"""Generation from a masked diffusion denoiser, and statistics of the samples.

The samplers themselves (ancestral, confidence, remask, semi-autoregressive) are in
:mod:`maskdiff.samplers`; this module drives them from a :class:`SampleConfig` and measures
their output. The denoiser is any :class:`maskdiff.elbo.DenoiserFn` (the evaluator's
interface); the AR judge of the generative perplexity any :class:`maskdiff.elbo.ARModelFn`.
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
from maskdiff.samplers import SampleResult, fill
from maskdiff.schedule import Schedule

__all__ = [
    "GEN_PPL_LABEL",
    "SampleStats",
    "ancestral_sample",
    "decode_samples",
    "distinct_n",
    "generate",
    "generative_perplexity",
    "prefix_template",
    "sample_statistics",
    "unigram_entropy",
]

GEN_PPL_LABEL = "gen. PPL judged by the AR baseline trained on the same corpus"


def prefix_template(
    n_samples: int, length: int, mask_id: int, prefix: Tensor | Sequence[int] | None = None
) -> Tensor:
    """(n_samples, length) templates: ``prefix`` ((P,) or (n, P)) known, the rest gaps."""
    x = torch.full((n_samples, length), mask_id, dtype=torch.long)
    if prefix is not None:
        prefix = torch.as_tensor(prefix).long().expand(n_samples, -1)
        if prefix.shape[1] >= length:
            raise ValueError(
                f"the prefix ({prefix.shape[1]} tokens) leaves no position to generate in {length}"
            )
        x[:, : prefix.shape[1]] = prefix
    return x


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
    """``n_samples`` blocks of ``length`` tokens from the T-step chain, T = ``steps``
    (:mod:`maskdiff.samplers`, ancestral): the discretised process whose NELBO is the T-step
    bound, whatever ``steps``. ``prefix``: (P,) or (n_samples, P) ids fixed at 0..P-1.
    ``cached`` is valid only for a denoiser that ignores t."""
    return fill(
        denoiser,
        schedule,
        vocab_size,
        prefix_template(n_samples, length, vocab_size, prefix),
        block_length=length,
        steps=steps,
        generator=generator,
        top_p=top_p,
        cached=cached,
        first_hitting=False,
        device=device,
    )


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
    """``cfg.n_samples`` continuations of ``prefix_ids`` (none: unconditional) with the sampler
    of ``cfg``. ``length`` is the model's block length L; ``cfg.length`` (default L) is the
    samples' length: shorter leaves the rest of the block as free context, longer is decoded
    semi-autoregressively. The cache is used only when ``cfg.cached`` and the model ignores t."""
    template = prefix_template(cfg.n_samples, cfg.length or length, vocab_size, prefix_ids)
    return fill(
        denoiser,
        schedule,
        vocab_size,
        template,
        block_length=length,
        steps=cfg.steps,
        generator=torch.Generator().manual_seed(cfg.seed),
        sampler=cfg.sampler,
        top_p=cfg.top_p,
        cached=cfg.cached and not time_conditioning,
        confidence=cfg.confidence,
        remask_eta=cfg.remask_eta,
        context=cfg.context,
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
