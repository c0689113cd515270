"""Figures for a run: training curves, the per-timestep NELBO curve, and NELBO against T.

Each function returns a ``matplotlib.figure.Figure`` built without pyplot (no global state, no
backend to select); the caller saves or logs it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from matplotlib.figure import Figure

from maskdiff.evaluate import EvalResult

__all__ = ["nelbo_curve", "nelbo_vs_T", "training_curves"]


def training_curves(series: dict[str, Sequence[tuple[int, float]]]) -> Figure:
    """One line per named (step, value) series: the training losses (solid) and the validation
    curves (dashed, markers; names holding ``val.``), one colour per model."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    colours: dict[str, str] = {}
    for name, points in series.items():
        if points:
            steps, values = zip(*points, strict=True)
            model = name.split()[0]
            colour = colours.setdefault(model, f"C{len(colours)}")
            style = {"linestyle": "--", "marker": "o"} if "val." in name else {"alpha": 0.8}
            ax.plot(steps, values, label=name, color=colour, **style)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per token")
    ax.set_title("training loss and validation curve")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def nelbo_curve(result: EvalResult) -> Figure:
    """The continuous NELBO's contribution from each t bin (bars sum to the total)."""
    est = result.continuous
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    if est is not None:
        edges = est.curve_t
        widths = [b - a for a, b in itertools.pairwise(edges)]
        ax.bar(edges[:-1], est.curve, width=widths, align="edge", edgecolor="black")
        ax.set_title(f"{result.split}: NELBO by t bin (total {est.nats_per_token:.3f} nats/token)")
    ax.set_xlabel("t")
    ax.set_ylabel("contribution (nats per token)")
    fig.tight_layout()
    return fig


def nelbo_vs_T(result: EvalResult, ar_nats: float | None = None) -> Figure:
    """Discrete T-step bounds against T, with the continuous bound (and the AR NLL) as lines."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    discrete = sorted(result.discrete.items())
    if discrete:
        Ts = [T for T, _ in discrete]
        vals = [e.nats_per_token for _, e in discrete]
        errs = [e.se for _, e in discrete]
        ax.errorbar(Ts, vals, yerr=errs, marker="o", capsize=3, label="discrete T-step bound")
        ax.set_xscale("log")
    cont = result.continuous
    if cont is not None:
        ax.axhline(cont.nats_per_token, color="C1", linestyle="--", label="continuous bound")
    if ar_nats is not None:
        ax.axhline(ar_nats, color="C2", linestyle=":", label="AR exact NLL")
    ax.set_xlabel("T (steps)")
    ax.set_ylabel("nats per token")
    ax.set_title(f"{result.split}: NELBO against T")
    ax.legend()
    fig.tight_layout()
    return fig
