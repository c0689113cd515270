"""Judges of samples: what a score holds (:class:`SampleQuality`, :class:`InfillQuality`), the
AR baseline as a judge (:class:`ARJudge`), and :func:`make_judge`, which picks the exact judge
of the markov corpus (:mod:`maskdiff.markov_judge`) where it applies. The frontier
(:mod:`maskdiff.frontier`) runs the samplers; these score what they write.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from maskdiff.checkpoint import load_model
from maskdiff.data.contracts import read_blocks
from maskdiff.data.stage import list_shards
from maskdiff.data.tokenizer import Tokenizer, load_tokenizer
from maskdiff.elbo import ar_token_nll
from maskdiff.runtime import inference_context
from maskdiff.sampling import GEN_PPL_LABEL, unigram_entropy
from maskdiff.scoring import first_token_model

__all__ = [
    "INFILL_METHOD",
    "MARKOV_LABEL",
    "ARJudge",
    "InfillQuality",
    "SampleQuality",
    "make_judge",
]

MARKOV_LABEL = "exact: the markov chain the corpus was drawn from"
INFILL_METHOD = "exact (forward-backward on the chain's states)"


def _ratio_se(sums: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """sum(sums) / sum(counts) and its standard error over the independent rows (delta method
    for a ratio of means; with equal counts it is the usual std / sqrt(n))."""
    total = float(counts.sum())
    if total == 0:
        return math.nan, math.nan
    mean = float(sums.sum()) / total
    n = len(sums)
    if n < 2:
        return mean, math.nan
    resid = sums - mean * counts
    return mean, math.sqrt(float((resid**2).sum()) * n / (n - 1)) / total


def _array(x: Tensor | np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """Token ids as an int64 numpy array."""
    return np.asarray(x.cpu() if isinstance(x, Tensor) else x, dtype=np.int64)


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _rows_entropy(q: np.ndarray) -> np.ndarray:
    """Entropy of each distribution along the last axis (0 log 0 = 0)."""
    safe = np.where(q > 0, q, 1.0)
    return -(q * np.log(safe)).sum(-1)


# ----------------------------------------------------------------------------- quality records


@dataclass(frozen=True)
class SampleQuality:
    """How good unconditional samples are, by one judge. ``nll``: nats per scored token.

    ``reference_*``: what samples as good as the data get (markov: exact, the entropy rate, the
    chain's stationary unigram entropy and the corpus's EOS share; AR: the judge on held-out
    blocks, when it was given them)."""

    judge: str
    nll: float
    nll_se: float
    n_scored: int
    n_tokens: int
    unigram_entropy: float  # nats, of the samples' symbols (markov) or tokens (AR)
    eos_share: float
    unk_share: float
    reference_nll: float | None = None
    reference_unigram_entropy: float | None = None
    reference_eos_share: float | None = None

    @property
    def gen_ppl(self) -> float:
        return math.exp(self.nll) if math.isfinite(self.nll) else math.nan

    @property
    def excess(self) -> float | None:
        """nll - reference_nll: 0 for a perfect sampler (in expectation), < 0 when collapsed."""
        return None if self.reference_nll is None else self.nll - self.reference_nll

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gen_ppl": self.gen_ppl, "excess": self.excess}


@dataclass(frozen=True)
class InfillQuality:
    """True conditional NLL of filled gaps, per gap token, against the conditional entropy."""

    judge: str
    n_templates: int
    n_gap_tokens: int
    nll: float  # -log P(gaps | known) per gap token
    nll_se: float
    conditional_entropy: float  # H(gaps | known) per gap token: a perfect sampler's expectation
    conditional_entropy_se: float  # over the templates drawn (each one's entropy is exact)
    excess: float  # nll - conditional_entropy, paired by template
    excess_se: float
    n_invalid: int = 0  # templates whose fill put EOS or [UNK] in a gap (not scored above)
    invalid_token_share: float = 0.0  # share of gap tokens that are not chain symbols
    method: str = INFILL_METHOD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- the AR judge


class ARJudge:
    """The AR baseline of the run as a judge of samples (:data:`GEN_PPL_LABEL`).

    Tokens are scored given their left context within windows of the AR model's block length;
    each window's first token by ``first_log_probs`` (the training unigram) when given, else
    left out. ``reference``: the same numbers on held-out blocks."""

    label = GEN_PPL_LABEL

    def __init__(
        self,
        model: torch.nn.Module,
        vocab_size: int,
        block_length: int,
        first_log_probs: Tensor | None = None,
        eos_id: int | None = None,
        unk_id: int | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
    ) -> None:
        self.model, self.vocab_size, self.block_length = model, vocab_size, block_length
        self.first_log_probs, self.eos_id, self.unk_id = first_log_probs, eos_id, unk_id
        self.device, self.batch_size = torch.device(device), batch_size
        self.reference: SampleQuality | None = None

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        blocks: str | Path | None = None,
        tokenizer: Tokenizer | str | Path | None = None,
        *,
        device: torch.device | str = "cpu",
        use_ema: bool = True,
        reference_split: str = "validation",
        reference_blocks: int = 64,
    ) -> ARJudge:
        """The AR checkpoint; with ``blocks`` (the run's blocks stage) its first-token unigram
        and, on ``reference_blocks`` held-out blocks, the reference numbers."""
        model, cfg = load_model(checkpoint, use_ema=use_ema, device=device)
        if cfg.model.kind != "ar":
            raise ValueError(f"{checkpoint}: a {cfg.model.kind} checkpoint cannot judge as AR")
        vocab = int(model.vocab_size)
        first = first_token_model(blocks, vocab) if blocks is not None else None
        tok = None
        if tokenizer is not None:
            tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
        judge = cls(model, vocab, cfg.data.seq_len, first,
                    eos_id=tok.eos_id if tok else None, unk_id=tok.unk_id if tok else None,
                    device=device)  # fmt: skip
        if blocks is not None and reference_blocks > 0:
            held = read_blocks(list_shards(blocks, reference_split), max_blocks=reference_blocks)
            if len(held.input_ids):
                judge.reference = judge.score(torch.from_numpy(held.input_ids).long())
        return judge

    def token_nll(self, tokens: Tensor) -> Tensor:
        """(n, P) float64 -log p(x_l | left context in its window); NaN where not scored."""
        x_all = torch.as_tensor(tokens).long().cpu()
        out = torch.full(x_all.shape, math.nan, dtype=torch.float64)
        L = self.block_length
        with inference_context(self.model):
            for lo in range(0, x_all.shape[1], L):
                for start in range(0, x_all.shape[0], self.batch_size):
                    x = x_all[start : start + self.batch_size, lo : lo + L]
                    logits = self.model(x.to(self.device)).cpu()
                    nll = ar_token_nll(logits, x, self.vocab_size, self.first_log_probs)
                    out[start : start + self.batch_size, lo : lo + L] = nll
        return out

    def score(self, tokens: Tensor | np.ndarray) -> SampleQuality:
        x = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, Tensor) else tokens)
        x = x.long().cpu()
        nll = self.token_nll(x).numpy()
        scored = ~np.isnan(nll)
        mean, se = _ratio_se(np.where(scored, nll, 0.0).sum(1), scored.sum(1).astype(float))
        ref = self.reference
        return SampleQuality(
            judge=self.label,
            nll=mean,
            nll_se=se,
            n_scored=int(scored.sum()),
            n_tokens=int(x.numel()),
            unigram_entropy=unigram_entropy(x),
            eos_share=float((x == self.eos_id).double().mean())
            if self.eos_id is not None
            else math.nan,
            unk_share=float((x == self.unk_id).double().mean()) if self.unk_id is not None else 0.0,
            reference_nll=ref.nll if ref else None,
            reference_unigram_entropy=ref.unigram_entropy if ref else None,
            reference_eos_share=ref.eos_share if ref else None,
        )


def make_judge(
    documents: str | Path,
    tokenizer: Tokenizer | str | Path,
    *,
    blocks: str | Path | None = None,
    ar_checkpoint: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> Any:
    """The exact markov judge (:class:`maskdiff.markov_judge.MarkovJudge`) where the corpus
    allows it, else the AR judge when an AR checkpoint is given, else None."""
    from maskdiff.markov_judge import markov_judge  # it builds on this module's results

    judge = markov_judge(documents, tokenizer)
    if judge is not None:
        return judge
    if ar_checkpoint is not None:
        return ARJudge.load(ar_checkpoint, blocks, tokenizer, device=device)
    return None
