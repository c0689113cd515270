"""Figures for a run: training curves, the per-timestep NELBO curve, and NELBO against T.

Each function returns a ``matplotlib.figure.Figure`` built without pyplot (no global state, no
backend to select); the caller saves or logs it, holding :data:`DRAWING` while it does.

Matplotlib is not thread-safe, figures without pyplot included: its mathtext parser (the tick
labels of a log axis, ``$10^{1}$``) keeps state between calls, and two threads laying out text at
once fail with a ``ParseException``. A sweep on the thread task runner evaluates its points side
by side, each drawing its figures, so every figure here is built under the lock :data:`DRAWING`,
and :meth:`maskdiff.ops.tracking.RunTracker.log_figure` saves under it.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

from matplotlib.figure import Figure

from maskdiff.evaluate import EvalResult

__all__ = [
    "DRAWING",
    "bound_by_axis",
    "nelbo_curve",
    "nelbo_vs_T",
    "training_curves",
    "validation_curves",
]

# Held while matplotlib lays out or renders anything: see the module's docstring.
DRAWING = threading.RLock()

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _drawn(build: Callable[_P, _R]) -> Callable[_P, _R]:
    """``build`` run under :data:`DRAWING`."""

    @functools.wraps(build)
    def locked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with DRAWING:
            return build(*args, **kwargs)

    return locked


@_drawn
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


@_drawn
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


@_drawn
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


@_drawn
def bound_by_axis(comparison: Any, axis: str) -> Figure:
    """A sweep against one grid axis, one line per combination of the other axes: left, each
    point's bound (nats per token, ± 1 SE); right, its paired difference from the baseline
    (± 1 paired SE), far narrower since the block-to-block variation cancels. Numeric values sit
    on a numeric axis (logarithmic when they span more than a factor of 20), others evenly."""
    rows = comparison.rows
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    values = [r.facts.values.get(axis) for r in rows]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    order = sorted(set(values), key=lambda v: v if numeric else str(v))
    position = {v: (v if numeric else i) for i, v in enumerate(order)}
    lines: dict[str, list[Any]] = {}
    for row in rows:
        rest = ", ".join(f"{k}={v}" for k, v in row.facts.values.items() if k != axis)
        lines.setdefault(rest or "bound", []).append(row)
    for i, (label, group) in enumerate(lines.items()):
        group = sorted(group, key=lambda r: order.index(r.facts.values.get(axis)))
        xs = [position[r.facts.values.get(axis)] for r in group]
        left.errorbar(xs, [r.facts.bound.nats_per_token for r in group],
                      yerr=[r.facts.bound.se for r in group], marker="o", capsize=3, label=label,
                      color=f"C{i}")  # fmt: skip
        paired = [(x, r) for x, r in zip(xs, group, strict=True) if r.diff is not None]
        if paired:
            right.errorbar([x for x, _ in paired], [r.diff for _, r in paired],
                           yerr=[r.diff_se for _, r in paired], marker="o", capsize=3,
                           label=label, color=f"C{i}")  # fmt: skip
    base = rows[comparison.baseline].facts.name
    right.axhline(0.0, color="grey", linewidth=0.8)
    for ax, title in ((left, f"bound against {axis}"), (right, f"difference from {base}")):
        if numeric and order and min(order) > 0 and max(order) / min(order) > 20:
            ax.set_xscale("log")
        ax.set_xticks([position[v] for v in order], [str(v) for v in order])
        ax.minorticks_off()
        ax.set_xlabel(axis)
        ax.set_title(title, fontsize="medium")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    left.set_ylabel("NELBO, nats per token (± 1 SE)")
    right.set_ylabel("Δ nats per token (± 1 paired SE)")
    fig.tight_layout()
    return fig


@_drawn
def validation_curves(facts: Sequence[Any]) -> Figure:
    """Every point's validation curve (``val.nelbo`` against the optimizer step) on one chart."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for i, f in enumerate(facts):
        if f.curve:
            steps, values = zip(*f.curve, strict=True)
            ax.plot(steps, values, marker="o", label=f.name, color=f"C{i % 10}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("val.nelbo (nats per token)")
    ax.set_title("validation curves of the sweep's points")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
