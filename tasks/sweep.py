"""Thin tasks of a sweep: one point (the pipeline as a child flow run), and the comparison's
artifacts on both sides."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from maskdiff.compare import Comparison
from maskdiff.config import Config
from maskdiff.ops import plots
from maskdiff.ops.tracking import RunTracker


@task(name="sweep-point", task_run_name="point-{number}", cache_policy=NO_CACHE)
def run_point(cfg: Config, number: int, sweep: dict[str, Any]) -> dict[str, Any]:
    """Run one point: the pipeline up to its evaluation (a sweep registers no model), as a
    child flow run named after the sweep's; fails with the child's error."""
    from prefect.transactions import Transaction

    from flows.pipeline import pipeline

    name = f"{sweep['name']}-p{number}"
    # The child's tasks must not join this task's transaction: a failed point would roll it back
    # and leave the locks of the data tasks' cached reads held (SERIALIZABLE), hanging the next
    # run that needs those stages. Without a current transaction each task commits its own.
    token = Transaction.__var__.set(None)
    try:
        summary = pipeline.with_options(flow_run_name=name)(
            config=cfg, stage="evaluate", sweep=sweep
        )
    finally:
        Transaction.__var__.reset(token)
    return {"summary_path": summary["summary_path"], "mlflow_run_id": summary.get("mlflow_run_id")}


@task(name="sweep-report", cache_policy=NO_CACHE)
def publish_comparison(
    comparison: Comparison,
    axes: list[str],
    report: str,
    tracking: dict[str, str] | None,
) -> None:
    """The comparison as Prefect artifacts (markdown report, table) and, in the sweep's MLflow
    run, ``comparison.md``, ``comparison.json`` and the plots: the bound against each grid axis
    with error bars, and every point's validation curve on one chart."""
    create_markdown_artifact(key="maskdiff-sweep", markdown=report, description="sweep")
    create_table_artifact(key="maskdiff-sweep-table", table=comparison.to_dict(),
                          description="sweep points")  # fmt: skip
    if tracking is None:
        return
    tracker = RunTracker.attach(tracking["uri"], tracking["run_id"])
    tracker.log_text(report, "comparison.md")
    tracker.log_dict({"points": comparison.to_dict()}, "comparison.json")
    for axis in axes:
        tracker.log_figure(plots.bound_by_axis(comparison, axis), f"plots/bound_by_{axis}.png")
    facts = [row.facts for row in comparison.rows]
    if any(f.curve for f in facts):
        tracker.log_figure(plots.validation_curves(facts), "plots/validation_curves.png")
    tracker.flush()
