"""The overview a finished run closes on: both models side by side, and where the time went.

Built from ``run_summary.json`` alone (no Prefect, no MLflow), so the command line, the Prefect
report and a notebook show the same table. Figures are on the first evaluated split; ± is one
standard error over blocks (perplexity's by the delta method, exp(x) * se).
"""

from __future__ import annotations

import math
from typing import Any

LN2 = math.log(2.0)  # as maskdiff.evaluate.LN2; not imported from there, which would load torch


def _pm(value: float | None, se: float | None, digits: int) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")


def _model_rows(summary: dict[str, Any]) -> tuple[str, list[list[str]]]:
    scores = summary.get("evaluation", {}).get("scores", {})
    if not scores:
        return "", []
    split, sc = next(iter(scores.items()))
    models = summary.get("models", {})
    rows = []
    for kind, label in (("mdm", "masked diffusion (bound ≤)"), ("ar", "autoregressive (exact)")):
        res = sc.get(kind)
        if not res:
            continue
        key = "nelbo.continuous." if kind == "mdm" else "ar."
        nats, se = res.get(f"{key}nats_per_token"), res.get(f"{key}nats_per_token_se")
        n_tok, n_bytes = res.get(f"{key}n_tokens"), res.get(f"{key}n_bytes")
        bpb = bpb_se = None
        if nats is not None and n_tok and n_bytes:
            bpb, bpb_se = nats * n_tok / (n_bytes * LN2), (se or 0.0) * n_tok / (n_bytes * LN2)
        ppl = math.exp(nats) if nats is not None else None
        info = models.get(kind, {})
        train_loss = (info.get("metrics") or {}).get("loss")
        val = (info.get("validation") or {}).get("val.nelbo" if kind == "mdm" else "val.ar_nll")
        rows.append([
            label,
            _pm(nats, se, 3),
            _pm(ppl, None if ppl is None or se is None else ppl * se, 1),
            _pm(bpb, bpb_se, 3),
            _pm(train_loss, None, 3),
            _pm(val, None, 3),
            f"{info.get('step', '-')}/{info.get('max_steps', info.get('step', '-'))}"
            + (f" ({info['stopped']})" if info.get("stopped") else ""),
        ])  # fmt: skip
    return split, rows


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def models_table(summary: dict[str, Any]) -> str:
    """Both models: the evaluation (nats/token, perplexity, bits per byte, with SE), the last
    training-loss window and the last validation-curve point (overfitting shows as a gap)."""
    split, rows = _model_rows(summary)
    if not rows:
        return ""
    head = ["model", "nats/token", "perplexity", "bits/byte", "train loss", "val curve", "steps"]
    note = (
        f"Split `{split}`, every position of each block counted; ± one standard error.\n"
        "train loss: mean of the last logging window; val curve: the last point of the "
        "validation curve\n(a fixed subset of the split). A curve that rises while the train "
        "loss falls is over-fitting:\nsee plots/training_curves.png in the MLflow run."
    )
    return _table(head, rows) + "\n" + note


def timings_table(summary: dict[str, Any], total_s: float | None = None) -> str:
    """Seconds per stage, per model and per evaluation step, and the validation share."""
    rows: list[list[str]] = []
    timings = summary.get("timings_s", {})
    for name, seconds in timings.items():
        rows.append([name, f"{seconds:.1f}", ""])
        if name == "train":
            for kind, info in summary.get("models", {}).items():
                share = info.get("eval_share")
                note = "" if not share else f"validation curve {100 * share:.1f}% of training"
                rows.append([f"  train {kind}", f"{info.get('seconds', 0.0):.1f}", note])
        if name == "evaluate":
            for part, seconds_part in summary.get("evaluation", {}).get("timings_s", {}).items():
                rows.append([f"  {part}", f"{seconds_part:.1f}", ""])
    if total_s is not None:
        rest = total_s - sum(timings.values())
        rows.append(["other (imports, Prefect server start, tracking, report)", f"{rest:.1f}", ""])
        rows.append(["total", f"{total_s:.1f}", ""])
    return _table(["stage", "seconds", ""], rows) if rows else ""
