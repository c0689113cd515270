"""Sample quality against sampling cost: the sampler frontier, with an exact judge on markov.

A sampler trades network calls for quality. To read that trade-off one needs a judge of the
samples. Two judges are provided:

:class:`MarkovJudge` (the built-in ``markov`` corpus, exact)
    The corpus is drawn from a known chain of order k over V symbols (:mod:`maskdiff.data.markov`),
    one symbol one token (char tokenizer), documents joined by EOS. Each document starts from the
    stationary law, so every window of a document is a stationary stretch of the chain: the state
    (previous k symbols) before any position of a document is distributed as pi, and where the
    EOS tokens fall does not depend on the symbols. Hence, for samples drawn from the data's own
    block law, every position that has k preceding symbols in the same EOS-free run has
    expected true NLL ``E[-log P(x_l | x_{l-k..l-1})] = sum_s pi(s) H(P[s]) = h``, the entropy
    rate, whichever positions are scored. The judge scores exactly those positions under the true
    chain and reports their mean NLL next to h: a perfect sampler's mean has expectation h. Lower
    is not better: a sampler that collapses onto the likeliest continuations scores below h, and
    then also shows a unigram entropy below the chain's stationary one. Both are reported, with
    the shares of EOS (the data's share alongside) and [UNK] tokens. (The samples' unigram
    entropy is a plug-in estimate, low by about (V - 1) / (2 N) nats for N symbols.)

    For infilling, templates are cut from held-out documents (gaps and known tokens in one
    EOS-free window of a document, a stationary stretch of the chain), and the judge returns the
    true conditional NLL of the filled gaps given the known tokens, ``-log P(gaps | known)``, by
    the forward algorithm on the chain's states (gaps summed out). What a perfect sampler gets in
    expectation is the conditional entropy ``H(gaps | known)``; it is computed exactly per
    template (the chain conditioned on the known tokens is again a Markov chain on states, whose
    entropy follows from the backward messages), so its only uncertainty is over which templates
    were drawn, reported as a standard error over templates. Fills that put EOS or [UNK] in a
    gap are counted apart (:meth:`MarkovJudge.score_infill` says why a block model does so).

    :func:`oracle_model` drives the same samplers with the chain's exact denoiser (order 1): the
    sampler's own error, without the network's.

:class:`ARJudge` (any corpus)
    The AR baseline trained in the same run scores the samples: NLL per token and generative
    perplexity, labelled :data:`maskdiff.sampling.GEN_PPL_LABEL` (a judge of the same size as
    the sampler, not a large pretrained model). With a blocks folder it also scores held-out
    blocks the same way, as the reference a sampler as good as the data would reach.

:func:`sampler_frontier` and :func:`infill_frontier` run every sampler at every number of
steps through a :class:`maskdiff.textgen.TextModel`, timing the sampling call;
:func:`frontier_markdown` prints the rows as tables, :func:`frontier_metrics` flattens them for
MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from maskdiff.data.tokenizer import Tokenizer
from maskdiff.infill import Template, continuation_template
from maskdiff.judges import MARKOV_LABEL, ARJudge, InfillQuality, SampleQuality, make_judge
from maskdiff.markov_judge import MarkovJudge, NotMarkovError, markov_judge
from maskdiff.textgen import TextModel, heldout_templates

__all__ = [
    "ARJudge",
    "FrontierRow",
    "InfillQuality",
    "MarkovJudge",
    "NotMarkovError",
    "SampleQuality",
    "frontier_markdown",
    "frontier_metrics",
    "infill_frontier",
    "infill_templates",
    "make_judge",
    "markov_judge",
    "oracle_model",
    "sampler_frontier",
]

# ----------------------------------------------------------------------------- the frontier


@dataclass(frozen=True)
class FrontierRow:
    """One sampler at one number of steps: cost (network calls, wall clock of the sampling
    call) and quality (``quality``) of ``n_samples`` rows of ``length`` tokens."""

    task: str  # "sample" (unconditional) or "infill"
    sampler: str
    steps: int
    n_samples: int
    length: int
    generated_tokens: int  # gap tokens filled, all rows
    network_calls: int
    seconds: float
    quality: SampleQuality | InfillQuality
    settings: dict[str, Any] = field(default_factory=dict)
    model: str = "model"  # or "exact denoiser" for oracle rows

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "quality"}
        out["tokens_per_second"] = self.tokens_per_second
        out["quality"] = self.quality.to_dict()
        return out


def _steps_list(steps: Sequence[int | str | None], L: int) -> list[int]:
    out: list[int] = []
    for s in steps:
        value = L if s is None or s == "L" else int(s)
        if value < 1:
            raise ValueError(f"steps must be at least 1, got {value}")
        if value not in out:
            out.append(value)
    return sorted(out)


def _settings(model: TextModel, sampler: str, steps: int, seed: int, overrides: dict) -> Any:
    return model.settings(sampler=sampler, steps=steps, seed=seed, **overrides)


def _kept_settings(cfg: Any, model: TextModel) -> dict[str, Any]:
    out = cfg.model_dump(include={"top_p", "cached", "confidence", "remask_eta"})
    out["cached"] = bool(cfg.cached and not model.cfg.model.time_conditioning)
    return out


def sampler_frontier(
    model: TextModel,
    judge: MarkovJudge | ARJudge,
    *,
    samplers: Sequence[str] = ("ancestral", "confidence", "remask"),
    steps: Sequence[int | str | None] = (8, 16, 32, 64, 128, "L"),
    n_samples: int = 16,
    seed: int = 0,
    length: int | None = None,
    label: str = "model",
    **overrides: Any,
) -> list[FrontierRow]:
    """Unconditional samples from every sampler at every number of steps ("L" or None: the
    block length), each judged by ``judge``. The same ``seed`` for every run; ``length``
    default L (longer: semi-autoregressive); ``overrides`` as :meth:`TextModel.settings`
    (``top_p``, ``remask_eta``, ...). Seconds: the sampling call's wall clock."""
    L = model.block_length
    n = length or L
    template = continuation_template("", model.tokenizer, n)
    rows = []
    for sampler in samplers:
        for T in _steps_list(steps, L):
            cfg = _settings(model, sampler, T, seed, overrides)
            out = model.fill_templates([template] * n_samples, cfg)
            tokens = torch.tensor([f.tokens for f in out.filled], dtype=torch.long)
            rows.append(FrontierRow("sample", sampler, T, n_samples, n, tokens.numel(),
                                    out.network_calls, out.seconds, judge.score(tokens),
                                    _kept_settings(cfg, model), label))  # fmt: skip
    return rows


def infill_templates(
    judge: MarkovJudge,
    tokenizer: Tokenizer,
    n: int,
    length: int,
    gap: int,
    split: str = "validation",
    seed: int = 0,
) -> list[Template]:
    """``n`` templates of ``length`` tokens from held-out documents, each a window inside one
    document with a middle gap of ``gap`` tokens (:func:`maskdiff.textgen.heldout_templates`)."""
    windows = judge.heldout_windows(n, length, split, seed)
    if not windows:
        raise ValueError(f"no held-out document of {split!r} holds {length} symbols")
    return [t for t, _ in heldout_templates(windows, tokenizer, len(windows), gap)]


def infill_frontier(
    model: TextModel,
    judge: MarkovJudge,
    *,
    samplers: Sequence[str] = ("ancestral", "confidence", "remask"),
    steps: Sequence[int | str | None] = (8, 16, 32, 64, 128, "L"),
    n_templates: int = 16,
    gap: int | None = None,
    templates: Sequence[Template] | None = None,
    seed: int = 0,
    label: str = "model",
    **overrides: Any,
) -> list[FrontierRow]:
    """Fill a middle gap (default half the block) of ``n_templates`` held-out windows with every
    sampler at every number of steps; the true conditional NLL of the gaps next to the
    conditional entropy (:meth:`MarkovJudge.score_infill`). ``templates`` overrides the
    held-out ones (known tokens must be chain symbols)."""
    L = model.block_length
    if templates is None:
        gap = gap or max(1, L // 2)
        templates = infill_templates(judge, model.tokenizer, n_templates, L, gap, seed=seed)
    P = max(len(t) for t in templates)
    if any(len(t) != P for t in templates):
        raise ValueError("infill templates must all have the same length")
    ids = torch.tensor([t.ids for t in templates], dtype=torch.long)
    n_gaps = int((ids == judge.mask_id).sum())
    rows = []
    for sampler in samplers:
        for T in _steps_list(steps, L):
            cfg = _settings(model, sampler, T, seed, overrides)
            out = model.fill_templates(templates, cfg)
            filled = torch.tensor([f.tokens for f in out.filled], dtype=torch.long)
            rows.append(FrontierRow("infill", sampler, T, len(templates), P, n_gaps,
                                    out.network_calls, out.seconds,
                                    judge.score_infill(ids, filled),
                                    _kept_settings(cfg, model), label))  # fmt: skip
    return rows


def oracle_model(judge: MarkovJudge, like: TextModel) -> TextModel:
    """``like`` (its config, schedule, tokenizer) with the chain's exact denoiser in place of the
    network (order 1): the samplers' own error, without the model's."""
    denoiser = judge.token_source().denoiser
    return TextModel(denoiser, like.cfg, like.tokenizer, torch.device("cpu"))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- output


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _sample_table(judge: str, group: list[FrontierRow]) -> str:
    q0 = group[0].quality
    assert isinstance(q0, SampleQuality)
    exact = judge == MARKOV_LABEL
    ref = ""
    if q0.reference_nll is not None:
        what = "the chain: NLL = entropy rate h" if exact else "held-out blocks"
        ref = (
            f" Reference ({what}): NLL {_f(q0.reference_nll)}, unigram entropy "
            f"{_f(q0.reference_unigram_entropy)}, EOS share {_f(q0.reference_eos_share, 4)}."
        )
    first = group[0]
    head = (
        f"Samples, {first.n_samples} x {first.length} tokens; judge: {judge}; NLL in nats per "
        f"scored token, ± one standard error over samples.{ref}"
    )
    middle = "NLL − h" if exact else "gen. PPL"
    lines = [
        f"| model | sampler | steps | calls | tokens/s | NLL ± SE | {middle} | unigram H | EOS "
        "| UNK |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in group:
        q = r.quality
        assert isinstance(q, SampleQuality)
        mid = f"{q.excess:+.3f}" if exact and q.excess is not None else _f(q.gen_ppl, 2)
        lines.append(
            f"| {r.model} | {r.sampler} | {r.steps} | {r.network_calls} | "
            f"{r.tokens_per_second:,.0f} | {_f(q.nll)} ± {_f(q.nll_se)} | {mid} | "
            f"{_f(q.unigram_entropy)} | {_f(q.eos_share, 4)} | {_f(q.unk_share, 4)} |"
        )
    return head + "\n\n" + "\n".join(lines)


def _infill_table(judge: str, group: list[FrontierRow]) -> str:
    q0 = group[0].quality
    assert isinstance(q0, InfillQuality)
    first = group[0]
    head = (
        f"Infill, {first.n_samples} held-out windows of {first.length} tokens, "
        f"{q0.n_gap_tokens} gap tokens; judge: {judge}; nats per gap token, ± one standard "
        f"error over templates; conditional entropy {q0.method}; 'EOS/UNK fills': templates "
        "whose fill put a non-symbol in the gap (left out of the means)."
    )
    lines = [
        "| model | sampler | steps | calls | tokens/s | gap NLL ± SE | cond. entropy | "
        "NLL − entropy ± SE | EOS/UNK fills |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in group:
        q = r.quality
        assert isinstance(q, InfillQuality)
        lines.append(
            f"| {r.model} | {r.sampler} | {r.steps} | {r.network_calls} | "
            f"{r.tokens_per_second:,.0f} | {_f(q.nll)} ± {_f(q.nll_se)} | "
            f"{_f(q.conditional_entropy)} | {q.excess:+.3f} ± {_f(q.excess_se)} | "
            f"{q.n_invalid} |"
        )
    return head + "\n\n" + "\n".join(lines)


def frontier_markdown(rows: Sequence[FrontierRow]) -> str:
    """The rows as compact markdown tables, one per task and judge, in the rows' order; each
    table's first line names the judge and the reference numbers."""
    groups: dict[tuple[str, str], list[FrontierRow]] = {}
    for row in rows:
        groups.setdefault((row.task, row.quality.judge), []).append(row)
    return "\n\n".join(
        _infill_table(judge, group) if task == "infill" else _sample_table(judge, group)
        for (task, judge), group in groups.items()
    )


def frontier_metrics(rows: Sequence[FrontierRow], prefix: str = "frontier") -> dict[str, float]:
    """Finite numbers keyed ``{prefix}.{task}.{sampler}.{steps}.{name}`` (valid MLflow metric
    names); rows of the exact denoiser under ``{prefix}.exact_denoiser.{task}...``."""
    out: dict[str, float] = {}
    for r in rows:
        model = "" if r.model == "model" else r.model.replace(" ", "_") + "."
        key = f"{prefix}.{model}{r.task}.{r.sampler}.{r.steps}"
        values = {"network_calls": r.network_calls, "tokens_per_second": r.tokens_per_second}
        values.update(r.quality.to_dict())
        for name, value in values.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and math.isfinite(float(value)):
                out[f"{key}.{name}"] = float(value)
    return out
