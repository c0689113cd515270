"""Comparing finished runs: a table of their bounds, and the paired difference of each against a
baseline run with its exact standard error.

Runs scored on the same corruption stage (the same content hash) saw the same corrupted blocks,
so the difference of two bounds is a mean of per-block differences and its SE is that of the
difference (:func:`maskdiff.evaluate.paired_difference`), usually far below the SE of either
bound. Runs on different corruption stages cannot be paired; the table says so and gives no z.

The inputs are :class:`RunFacts`, built from a run's ``run_summary.json`` and its scores file
(:func:`facts_from_summary`); the MLflow side (``maskdiff compare RUN_ID ...``) downloads both
from the runs' artifacts (:mod:`maskdiff.ops.experiments`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskdiff.evaluate import NelboEstimate, paired_difference
from maskdiff.heldout import metric_name

__all__ = ["Comparison", "RunFacts", "compare", "facts_from_summary", "regression"]


@dataclass
class RunFacts:
    """What the comparison needs of one finished run."""

    name: str  # a grid point's label, or a run's name
    bound: NelboEstimate  # the continuous-time NELBO of the compared split
    corruptions: str | None  # content hash of the corruption stage it was scored on
    split: str
    values: dict[str, Any] = field(default_factory=dict)  # grid values, for plots
    ar_nats: float | None = None
    ar_se: float | None = None
    steps: int | None = None
    wall_s: float | None = None
    best: dict[str, float] | None = None  # {"step", "value"} of the best validation point
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val.nelbo)
    run_id: str | None = None


def scores_split(summary: dict[str, Any], split: str | None) -> str:
    """``split`` if the run scored it, else its first scored split."""
    scores = summary.get("evaluation", {}).get("scores", {})
    if not scores:
        raise ValueError(f"run {summary.get('run_dir', '?')} has no evaluation to compare")
    if split in scores:
        return str(split)
    return next(iter(scores))


def facts_from_summary(
    summary: dict[str, Any],
    name: str,
    split: str | None = None,
    values: dict[str, Any] | None = None,
    scores_file: str | Path | None = None,
    curve_file: str | Path | None = None,
) -> RunFacts:
    """The facts of a run from its summary, its per-block scores file (default: the path the
    summary names) and its validation curve (default: ``curve.json`` in the MDM's folder)."""
    from maskdiff.scoring import SplitScores

    split = scores_split(summary, split)
    entry = summary["evaluation"]["scores"][split]
    path = Path(scores_file or entry.get("scores_file") or "")
    if not path.is_file():
        raise ValueError(
            f"run {name}: no per-block scores file ({path or 'none recorded'}); runs evaluated "
            "before per-block scores were kept cannot be paired"
        )
    scores = SplitScores.from_json(json.loads(path.read_text()))
    bound = scores.mdm.continuous or scores.mdm.estimates[0]
    mdm = summary.get("models", {}).get("mdm", {})
    if curve_file is None and mdm.get("run_dir"):
        curve_file = Path(mdm["run_dir"]) / "curve.json"
    curve: list[tuple[int, float]] = []
    if curve_file is not None and Path(curve_file).is_file():
        key = metric_name("mdm")
        curve = [(int(s), float(m[key])) for s, m in json.loads(Path(curve_file).read_text())
                 if key in m]  # fmt: skip
    ar = scores.ar
    return RunFacts(
        name=name,
        bound=bound,
        corruptions=summary.get("stage_hashes", {}).get("corruptions"),
        split=split,
        values=dict(values or {}),
        ar_nats=None if ar is None else ar.nats_per_token,
        ar_se=None if ar is None else ar.se,
        steps=mdm.get("step"),
        wall_s=summary.get("wall_s"),
        best=mdm.get("best"),
        curve=curve,
        run_id=summary.get("mlflow_run_id"),
    )


@dataclass
class Row:
    facts: RunFacts
    diff: float | None = None  # nats per token, this run minus the baseline
    diff_se: float | None = None
    note: str = ""

    @property
    def z(self) -> float | None:
        if self.diff is None or not self.diff_se:
            return None
        return self.diff / self.diff_se


@dataclass
class Comparison:
    rows: list[Row]
    baseline: int  # index into rows

    @property
    def paired(self) -> bool:
        return all(r.diff is not None for r in self.rows)

    def to_dict(self) -> list[dict[str, Any]]:
        """One flat dict per run: the table's numbers (a Prefect table artifact, JSON)."""
        out = []
        for i, row in enumerate(self.rows):
            f = row.facts
            best = f.best or {}
            out.append(
                {
                    "run": f.name,
                    "baseline": i == self.baseline,
                    "bound_nats_per_token": f.bound.nats_per_token,
                    "bound_se": f.bound.se,
                    "bits_per_byte": f.bound.bits_per_byte,
                    "bits_per_byte_se": f.bound.bits_per_byte_se,
                    "ar_nats_per_token": f.ar_nats,
                    "ar_se": f.ar_se,
                    "steps": f.steps,
                    "wall_s": f.wall_s,
                    "best_step": best.get("step"),
                    "best_value": best.get("value"),
                    "diff": row.diff,
                    "diff_se": row.diff_se,
                    "z": row.z,
                    "note": row.note,
                    "run_id": f.run_id,
                }
            )
        return out

    def markdown(self) -> str:
        """The table, then a line on what was paired."""
        base = self.rows[self.baseline].facts
        head = ("| run | bound (nats/token) ± SE | bits/byte ± SE | AR NLL ± SE | steps | wall s "
                f"| best val. (step) | Δ vs {base.name} ± paired SE | z |")  # fmt: skip
        lines = [head, "|" + "---|" * 9]
        for i, row in enumerate(self.rows):
            f = row.facts
            ar = "-" if f.ar_nats is None else f"{f.ar_nats:.4f} ± {_num(f.ar_se)}"
            best = "-" if not f.best else f"{f.best['value']:.4f} ({int(f.best['step'])})"
            if i == self.baseline:
                diff, z = "baseline", ""
            elif row.diff is None:
                diff, z = f"not paired: {row.note}", ""
            else:
                diff, z = f"{row.diff:+.4f} ± {_num(row.diff_se)}", _num(row.z, 2)
            lines.append(
                f"| {f.name} | {f.bound.nats_per_token:.4f} ± {_num(f.bound.se)} "
                f"| {f.bound.bits_per_byte:.4f} ± {_num(f.bound.bits_per_byte_se)} | {ar} "
                f"| {f.steps if f.steps is not None else '-'} "
                f"| {'-' if f.wall_s is None else f'{f.wall_s:.0f}'} | {best} | {diff} | {z} |"
            )
        split = base.split
        what = f"Bounds: the continuous-time NELBO on `{split}`."
        if self.paired:
            what += (
                f" Every run was scored on the same corruption stage (`{base.corruptions}`): Δ is "
                "the mean per-block difference and its SE the exact paired one; z = Δ / SE "
                "(positive: worse than the baseline)."
            )
        else:
            what += (
                " Some runs were scored on another corruption stage than the baseline: their "
                "bounds saw other corrupted blocks and cannot be paired; compare their bounds "
                "± SE only."
            )
        lines += ["", what]
        return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def compare(facts: Sequence[RunFacts], baseline: int = 0) -> Comparison:
    """The paired difference of every run against ``facts[baseline]`` where both were scored on
    the same corruption stage (and on the same split)."""
    if not facts:
        raise ValueError("nothing to compare")
    base = facts[baseline]
    rows = []
    for i, f in enumerate(facts):
        row = Row(f)
        if i != baseline:
            if f.corruptions is None or f.corruptions != base.corruptions:
                row.note = (f"corruption stage {f.corruptions or 'unknown'} is not the "
                            f"baseline's {base.corruptions or 'unknown'}")  # fmt: skip
            elif f.split != base.split:
                row.note = f"split {f.split} is not the baseline's {base.split}"
            else:
                row.diff, row.diff_se = paired_difference(f.bound, base.bound)
        else:
            row.diff, row.diff_se = 0.0, 0.0
        rows.append(row)
    return Comparison(rows, baseline)


@dataclass
class Verdict:
    """A new run against the champion: its paired difference, and whether it is a regression."""

    diff: float | None  # new minus champion, nats per token
    se: float | None
    z: float | None
    regressed: bool
    reason: str


def regression(new: RunFacts, champion: RunFacts, threshold_z: float) -> Verdict:
    """``new`` is a regression when its bound exceeds the champion's by more than
    ``threshold_z`` paired standard errors. Runs on different corruption stages are not judged."""
    if new.corruptions is None or new.corruptions != champion.corruptions:
        return Verdict(None, None, None, False,
                       f"not paired: corruption stage {new.corruptions} against the champion's "
                       f"{champion.corruptions}")  # fmt: skip
    diff, se = paired_difference(new.bound, champion.bound)
    z = diff / se if se and math.isfinite(se) and se > 0 else (math.inf if diff > 0 else -math.inf)
    bad = z > threshold_z
    word = "worse" if diff > 0 else "better"
    reason = (f"{word} than the champion by {abs(diff):.4f} nats/token (paired SE {se:.4f}, "
              f"z = {z:+.2f}; flagged above z = {threshold_z:g})")  # fmt: skip
    return Verdict(diff, se, z, bad, reason)
