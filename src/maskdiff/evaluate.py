"""Model-agnostic evaluation: the NELBO of any denoiser on fixed corruptions, and the AR baseline.

The denoiser is any :class:`maskdiff.elbo.DenoiserFn`, a callable
``(x_t: LongTensor[B, L], t: FloatTensor[B]) -> logits[B, L, V]`` (V = m + 1 with the [M] class
ignored, or V = m); the AR baseline any :class:`maskdiff.elbo.ARModelFn`,
``(x: LongTensor[B, L]) -> logits[B, L, V]`` whose position l predicts token l + 1.

Estimators (equations in :mod:`maskdiff.elbo`, derived in docs/maths.md, sections 6-10):

* continuous: a block's estimate is the mean over its K stored draws of w(t) CE(x0, x_t);
* discrete T-step: a block's estimate is T times the mean over its stored rows of
  (alpha_s - alpha_t)/(1 - alpha_t) CE; with one row per step i = 1..T it is their sum;
* per token: sum_b L_b / N, N = L tokens per block, every position counted (EOS tokens included;
  blocks hold no padding); the standard error is the ratio estimator over blocks (elbo eq. 6);
* the curve: the share of the per-token NELBO contributed by the rows whose t lies in each bin
  (the bins sum to the total).

Nothing here draws random numbers: two checkpoints evaluated on the same corruptions differ
only by their models, and :func:`paired_difference` gives the SE of that difference.

Sharded (``dist``, a :class:`maskdiff.distributed.DistInfo` of W > 1 ranks): rank r computes a
contiguous run of the batches one process would form (of corruption rows; of blocks for the
AR model), the per-row terms are combined over the ranks (:func:`combine_disjoint`, exact), and
every rank then reduces the full set exactly as one process does, so the bound, its SE and the
curve equal the one-process numbers (docs/evaluation-sharding.md).
The AR baseline scores the first token of each block with a context-free unigram model (the
training split's frequencies) and the others with the AR model, so both rows count the same N.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from maskdiff.config import EvalConfig
from maskdiff.data.contracts import read_blocks
from maskdiff.data.evalset import (
    Corruptions,
    grid_corruptions,
    load_corruptions,
    stage_facts,
    stratified_corruptions,
)
from maskdiff.data.stage import list_shards
from maskdiff.distributed import DistInfo, combine_disjoint, shard_batches
from maskdiff.elbo import (
    ARModelFn,
    DenoiserFn,
    ar_token_nll,
    block_means,
    continuous_terms,
    discrete_terms,
    masked_nll,
    ratio_and_se,
)
from maskdiff.runtime import inference_context, model_device
from maskdiff.schedule import Schedule

__all__ = [
    "COUNTED",
    "ARResult",
    "Corruptions",
    "EvalResult",
    "NelboEstimate",
    "estimate_nelbo",
    "evaluate_ar",
    "evaluate_blocks",
    "evaluate_stage",
    "grid_corruptions",
    "load_corruptions",
    "paired_difference",
    "stratified_corruptions",
]

COUNTED = "all L tokens of every evaluated block (EOS tokens included, no padding)"
LN2 = math.log(2.0)


class _Rates:
    """Perplexity, bits per token and bits per byte derived from nats per token (N, N_bytes)."""

    nats_per_token: float
    se: float
    n_tokens: int
    n_bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    @property
    def bits_per_token(self) -> float:
        return self.nats_per_token / LN2

    @property
    def bits_per_byte(self) -> float:
        return self.nats_per_token * self.n_tokens / (self.n_bytes * LN2)

    @property
    def bits_per_byte_se(self) -> float:
        return self.se * self.n_tokens / (self.n_bytes * LN2)


@dataclass(frozen=True)
class NelboEstimate(_Rates):
    """One row of the report: a NELBO (continuous or T-step) aggregated over a split."""

    T: int  # 0 = continuous time
    nats_per_token: float
    se: float  # standard error of nats_per_token
    n_tokens: int
    n_bytes: int
    n_blocks: int
    rows_per_block: float  # K draws (continuous) or stored steps per block (discrete)
    curve_t: list[float]  # bin edges, length n_bins + 1
    curve: list[float]  # nats per token contributed by each t bin; sums to nats_per_token
    per_block: Tensor = field(repr=False)  # (n_blocks,) nats, for paired comparisons
    blocks: Tensor = field(repr=False)  # (n_blocks,) indices of the blocks these rows cover

    @property
    def label(self) -> str:
        return "continuous" if self.T == 0 else f"T={self.T}"

    def to_dict(self) -> dict[str, float | int]:
        return {
            "nats_per_token": self.nats_per_token,
            "nats_per_token_se": self.se,
            "perplexity": self.perplexity,
            "bits_per_token": self.bits_per_token,
            "bits_per_byte": self.bits_per_byte,
            "bits_per_byte_se": self.bits_per_byte_se,
            "n_tokens": self.n_tokens,
            "n_bytes": self.n_bytes,
            "n_blocks": self.n_blocks,
            "rows_per_block": self.rows_per_block,
        }


@dataclass(frozen=True)
class EvalResult:
    """The NELBO rows of one split, with the record of what was counted."""

    split: str
    schedule: str
    seed: int | None  # seed of the corruptions
    estimates: list[NelboEstimate]  # continuous first, then T ascending
    counted: str = COUNTED

    @property
    def continuous(self) -> NelboEstimate | None:
        return next((e for e in self.estimates if e.T == 0), None)

    @property
    def discrete(self) -> dict[int, NelboEstimate]:
        return {e.T: e for e in self.estimates if e.T > 0}

    def to_dict(self) -> dict[str, float | int | str | None]:
        """Flat JSON-able dict: ``nelbo.continuous.perplexity``, ``nelbo.T100.bits_per_byte``..."""
        out: dict[str, float | int | str | None] = {
            "split": self.split,
            "schedule": self.schedule,
            "seed": self.seed,
            "counted": self.counted,
        }
        for est in self.estimates:
            key = "continuous" if est.T == 0 else f"T{est.T}"
            out.update({f"nelbo.{key}.{k}": v for k, v in est.to_dict().items()})
        return out

    def metrics(self) -> dict[str, float]:
        """Only the numbers (for ``mlflow.log_metrics``)."""
        return {k: float(v) for k, v in self.to_dict().items() if isinstance(v, (int, float))}


@dataclass(frozen=True)
class ARResult(_Rates):
    """Exact NLL of an autoregressive model on the same blocks (first token: unigram)."""

    nats_per_token: float
    se: float
    n_tokens: int
    n_bytes: int
    n_blocks: int
    conditional_nats_per_token: float  # tokens 1..L-1 only, given their left context
    first_token: str = "unigram of the training split (context-free)"

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "ar.nats_per_token": self.nats_per_token,
            "ar.nats_per_token_se": self.se,
            "ar.perplexity": self.perplexity,
            "ar.bits_per_token": self.bits_per_token,
            "ar.bits_per_byte": self.bits_per_byte,
            "ar.conditional_nats_per_token": self.conditional_nats_per_token,
            "ar.n_tokens": self.n_tokens,
            "ar.n_bytes": self.n_bytes,
            "ar.first_token": self.first_token,
        }


# ----------------------------------------------------------------------------- estimation


def _row_terms(
    denoiser: DenoiserFn,
    x0: Tensor,
    corr: Corruptions,
    schedule: Schedule,
    vocab_size: int,
    batch_size: int,
    device: torch.device,
    dist: DistInfo,
) -> Tensor:
    """The weighted term of every corruption row (elbo eqs. 3-4), float64 (R,); this rank
    computes its batches and the others' arrive through :func:`combine_disjoint`."""
    R, L = corr.block_index.numel(), x0.shape[1]
    terms = torch.zeros(R, dtype=torch.float64)
    for start in shard_batches(R, batch_size, dist):
        rows = torch.arange(start, min(start + batch_size, R))
        clean = x0[corr.block_index[rows]]  # (b, L)
        mask = corr.rows_mask(rows, L)  # (b, L)
        x_t = torch.where(mask, torch.full_like(clean, vocab_size), clean)
        t = corr.t[rows].to(torch.float32)
        logits = denoiser(x_t.to(device), t.to(device))  # (b, L, V)
        nll = masked_nll(logits.cpu(), clean, mask, vocab_size)  # (b,)
        if corr.T == 0:
            terms[rows] = continuous_terms(nll, corr.t[rows], schedule)
        else:
            assert corr.step is not None, "discrete corruptions need their steps"
            terms[rows] = discrete_terms(nll, corr.step[rows], corr.T, schedule)
    return combine_disjoint(terms, dist)


def estimate_nelbo(
    denoiser: DenoiserFn,
    x0: Tensor,
    n_bytes: Tensor,
    corr: Corruptions,
    schedule: Schedule,
    vocab_size: int,
    batch_size: int = 64,
    curve_bins: int = 10,
    device: torch.device | str | None = None,
    dist: DistInfo | None = None,
) -> NelboEstimate:
    """The NELBO of ``denoiser`` on blocks ``x0`` (n, L) under the corruptions ``corr``.

    ``n_bytes``: (n,) UTF-8 bytes each block covers. Continuous rows (T = 0) give the estimate
    of eq. (3), discrete rows that of eq. (4); see the module docstring for the aggregation.
    Only the blocks that own rows are counted (a corruption stage may give the discrete grids
    to the first blocks only): N, the bytes and the SE are those of the covered blocks.
    ``dist``: score this rank's share of the rows (module docstring); every rank gets the result.
    """
    L, dev = x0.shape[1], model_device(denoiser, device)
    with inference_context(denoiser):
        terms = _row_terms(
            denoiser, x0, corr, schedule, vocab_size, batch_size, dev, dist or DistInfo()
        )
    scale = 1.0 if corr.T == 0 else float(corr.T)
    blocks, local = torch.unique(corr.block_index.long(), return_inverse=True)  # (n,), (R,)
    n = blocks.numel()
    per_block = scale * block_means(terms, local, n)  # (n,) nats
    value, se = ratio_and_se(per_block, torch.full((n,), L, dtype=torch.float64))
    # curve: row r carries scale * term_r / (count of its block) / N into the bin of its t
    share = scale * terms / torch.bincount(local, minlength=n).double()[local] / (n * L)  # (R,)
    t = corr.t.double() if corr.T == 0 else corr.step.double() / corr.T  # type: ignore[union-attr]
    bins = ((t * curve_bins).ceil().long() - 1).clamp(0, curve_bins - 1)  # (R,) bin (lo, hi]
    curve = torch.zeros(curve_bins, dtype=torch.float64).index_add_(0, bins, share)
    return NelboEstimate(
        T=corr.T,
        nats_per_token=value,
        se=se,
        n_tokens=n * L,
        n_bytes=int(n_bytes[blocks].sum()),
        n_blocks=n,
        rows_per_block=corr.block_index.numel() / n,
        curve_t=[i / curve_bins for i in range(curve_bins + 1)],
        curve=curve.tolist(),
        per_block=per_block,
        blocks=blocks,
    )


def evaluate_blocks(
    denoiser: DenoiserFn,
    x0: Tensor,
    n_bytes: Tensor,
    corruptions: Sequence[Corruptions],
    schedule: Schedule,
    vocab_size: int,
    *,
    split: str = "validation",
    seed: int | None = None,
    batch_size: int = 64,
    curve_bins: int = 10,
    device: torch.device | str | None = None,
    dist: DistInfo | None = None,
) -> EvalResult:
    """Every NELBO row (continuous and each T) of ``denoiser`` on in-memory blocks."""
    estimates = [
        estimate_nelbo(
            denoiser, x0, n_bytes, c, schedule, vocab_size, batch_size, curve_bins, device, dist
        )
        for c in sorted(corruptions, key=lambda c: c.T)
    ]
    return EvalResult(split=split, schedule=schedule.name, seed=seed, estimates=estimates)


def paired_difference(a: NelboEstimate, b: NelboEstimate) -> tuple[float, float]:
    """(a - b) in nats per token and its SE, paired over the same blocks.

    Two checkpoints on the same corruptions, or two rows (T) of one model: the block-to-block
    variation common to both cancels, so the SE is that of the difference only. Computed on
    the blocks both estimates cover.
    """
    common = a.blocks[torch.isin(a.blocks, b.blocks)]  # sorted block indices
    if common.numel() == 0:
        raise ValueError("paired comparison needs common blocks")
    diff = a.per_block[torch.searchsorted(a.blocks, common)]
    diff = diff - b.per_block[torch.searchsorted(b.blocks, common)]
    tokens = torch.full((common.numel(),), a.n_tokens / a.n_blocks, dtype=torch.float64)
    return ratio_and_se(diff, tokens)


def evaluate_ar(
    ar_model: ARModelFn,
    x0: Tensor,
    n_bytes: Tensor,
    vocab_size: int,
    first_log_probs: Tensor,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    first_token: str = "unigram of the training split (context-free)",
    dist: DistInfo | None = None,
) -> ARResult:
    """Exact NLL of a causal model on blocks ``x0`` (n, L) (elbo eq. 5).

    ``first_log_probs``: (m,) log-probabilities of a block's first token (see
    :func:`maskdiff.elbo.unigram_log_probs` on the training split), so N = L per block;
    ``first_token`` says what they are, for the report. ``dist``: score this rank's share of
    the blocks; every rank gets the result.
    """
    n, L = x0.shape
    dev, dist = model_device(ar_model, device), dist or DistInfo()
    per_pos = torch.zeros(n, L, dtype=torch.float64)
    with inference_context(ar_model):
        for start in shard_batches(n, batch_size, dist):
            x = x0[start : start + batch_size]
            logits = ar_model(x.to(dev)).cpu()  # (b, L, V)
            per_pos[start : start + batch_size] = ar_token_nll(
                logits, x, vocab_size, first_log_probs
            )
    combine_disjoint(per_pos, dist)
    value, se = ratio_and_se(per_pos.sum(-1), torch.full((n,), L, dtype=torch.float64))
    return ARResult(
        nats_per_token=value,
        se=se,
        n_tokens=n * L,
        n_bytes=int(n_bytes.sum()),
        n_blocks=n,
        conditional_nats_per_token=float(per_pos[:, 1:].mean()),
        first_token=first_token,
    )


# ----------------------------------------------------------------------------- parquet stages


def evaluate_stage(
    denoiser: DenoiserFn,
    blocks_dir: str | Path,
    corruptions_dir: str | Path,
    split: str,
    cfg: EvalConfig,
    *,
    schedule: Schedule | None = None,
    vocab_size: int | None = None,
    device: torch.device | str | None = None,
    dist: DistInfo | None = None,
) -> EvalResult:
    """Evaluate ``denoiser`` on a blocks stage and its corruption stage (parquet folders).

    The schedule (the one the masks were drawn with) and m default to what the manifests
    record; a ``schedule`` that contradicts the corruption manifest is refused. ``dist``: this
    rank scores its share of the rows (module docstring).
    """
    seed, stage_schedule, stage_vocab = stage_facts(Path(blocks_dir), Path(corruptions_dir))
    mismatch = schedule is not None and stage_schedule is not None
    if mismatch and repr(schedule) != repr(stage_schedule):
        raise ValueError(f"masks were drawn with {stage_schedule!r}, not {schedule!r}")
    schedule = schedule or stage_schedule
    vocab_size = vocab_size or stage_vocab
    if schedule is None or vocab_size is None:
        raise ValueError("pass schedule and vocab_size: the manifests do not record them")
    blocks = read_blocks(list_shards(blocks_dir, split), max_blocks=cfg.max_blocks)
    if not len(blocks):
        raise FileNotFoundError(f"no {split} blocks in {blocks_dir}")
    corruptions = load_corruptions(corruptions_dir, split, blocks.block_id)
    return evaluate_blocks(
        denoiser,
        torch.from_numpy(blocks.input_ids).long(),
        torch.from_numpy(blocks.n_bytes).long(),
        corruptions,
        schedule,
        vocab_size,
        split=split,
        seed=seed,
        batch_size=cfg.batch_size,
        curve_bins=cfg.curve_bins,
        device=device,
        dist=dist,
    )
