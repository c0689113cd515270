"""A sweep: the pipeline over the cartesian product of a grid, as one parent flow run
(``maskdiff-pipeline`` with a ``grid``; the ``sweep`` deployment, ``maskdiff sweep``).

1. Every point is expanded and validated first (:func:`maskdiff.sweep.expand`): a bad grid
   starts nothing.
2. The data stages are built once per distinct data config (``prepare-data`` child runs); the
   points then find them finished.
3. The points run as ``sweep-point`` tasks on a thread pool of ``sweep.max_concurrent`` workers
   (the task runner of the ``sweep-points`` child flow), each the pipeline up to its evaluation
   as a child flow run, whose MLflow run is a child of the sweep's. A failed point leaves the
   others running.
4. Points recorded as finished by an earlier start of the same sweep (same preset and grid,
   ``<root>/sweeps/<key>/sweep.json``) are reused, not rerun.
5. The comparison (:mod:`maskdiff.compare`) goes to the flow run's artifacts and the sweep's
   MLflow run. With failed points the flow run ends FAILED, naming them and their errors.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from flows.runners import task_runner
from maskdiff.compare import compare, facts_from_summary
from maskdiff.config import ConfigError
from maskdiff.data.stage import data_root
from maskdiff.ops.experiments import open_parent_run
from maskdiff.ops.tracking import resolve_tracking_uri
from maskdiff.sweep import Point, SweepRecord, choose_baseline, data_key, expand, parse_grid
from tasks import sweep as sweep_tasks


def plan(
    preset: str, overrides: list[str], grid: list[str], baseline: str | None
) -> tuple[list[Point], Point]:
    """The validated points and the baseline point; a :class:`ConfigError` refuses the sweep."""
    points = expand(preset, overrides, parse_grid(grid))
    return points, choose_baseline(points, baseline)


@flow(name="sweep-points", log_prints=True)
def run_points(points: list[dict[str, Any]], sweep: dict[str, Any]) -> dict[str, Any]:
    """Submit every point (``{"key", "number", "label", "config"}``) to this flow's task
    runner; wait for all. Returns per point key ``{"ok": True, "summary_path", ...}`` or
    ``{"ok": False, "error": ...}``."""
    futures = {}
    for p in points:
        child = {**sweep, "label": p["label"]}
        futures[p["key"]] = sweep_tasks.run_point.submit(p["config"], p["number"], child)
    out = {}
    for key, future in futures.items():
        future.wait()
        state = future.state
        if state.is_completed():
            out[key] = {"ok": True, **future.result()}
        else:
            error = state.result(raise_on_failure=False)
            text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else None
            out[key] = {"ok": False, "error": text or state.message or state.name}
    return out


def run_sweep(
    preset: str, overrides: list[str], grid: list[str], baseline: str | None
) -> dict[str, Any] | State:
    """The sweep in the current flow run (see the module docstring)."""
    logger = get_run_logger()
    started = time.perf_counter()
    points, base = plan(preset, overrides, grid, baseline)
    first = points[0].config
    root = data_root(first.data.root)
    record = SweepRecord.open(root, points)
    logger.info("sweep %s: %d points, record %s", record.key, len(points), record.path)
    tracker = None
    if first.tracking.enabled:
        uri = resolve_tracking_uri(first.tracking, root)
        tags = {"prefect.flow_run_id": str(flow_run.get_id()), "maskdiff.sweep": record.key,
                "maskdiff.preset": first.name, "maskdiff.sweep_grid": json.dumps(grid),
                "maskdiff.sweep_baseline": base.label}  # fmt: skip
        name = f"sweep-{flow_run.get_name()}"
        tracker = open_parent_run(first.tracking, uri, name, record.parent_run_id, tags,
                                  root / "mlartifacts")  # fmt: skip
        record.parent_run_id = tracker.run_id
        record.save()
    ref = {"parent_run_id": None if tracker is None else tracker.run_id, "key": record.key,
           "name": str(flow_run.get_name())}  # fmt: skip
    try:
        result = _run(points, base, record, ref, logger)
        result["wall_s"] = time.perf_counter() - started
        report = _report(result, record)
        comparison = result.pop("comparison")
        if comparison is not None:
            axes = list(points[0].values)
            sweep_tasks.publish_comparison(comparison, axes, report, _ref(tracker))
            result["comparison"] = comparison.to_dict()
        result["report"] = report
        if tracker is not None:
            tracker.end("FAILED" if result["failed"] else "FINISHED")
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    (record.folder / "report.md").write_text(report)
    result["report_path"] = str(record.folder / "report.md")
    if result["failed"]:
        names = "; ".join(f"{f['point']} ({f['label']}): {f['error']}" for f in result["failed"])
        message = f"{len(result['failed'])} of {len(points)} points failed: {names}"
        logger.error("%s", message)
        return Failed(name="Failed points", message=message, data=result)
    return result


def _ref(tracker: Any) -> dict[str, str] | None:
    return None if tracker is None else {"uri": tracker.tracking_uri, "run_id": tracker.run_id}


def _run(
    points: list[Point], base: Point, record: SweepRecord, ref: dict[str, Any], logger: Any
) -> dict[str, Any]:
    """Data stages once per data config, the unfinished points, then the facts of all."""
    from flows.pipeline import prepare_data

    todo = [p for p in points if record.finished(p) is None]
    reused = [p for p in points if p not in todo]
    if reused:
        logger.info("reused (finished before): %s", "; ".join(p.label for p in reused))
    built: dict[str, dict[str, Any]] = {}
    for point in todo:  # one prepare-data run per distinct data config
        key = data_key(point.config)
        if key not in built:
            cfg = point.config
            built[key] = prepare_data.with_options(task_runner=task_runner(cfg.runtime))(cfg)
    outcomes = {}
    if todo:
        workers = points[0].config.sweep.max_concurrent
        runner = ThreadPoolTaskRunner(max_workers=workers)
        work = [{"key": p.key, "number": p.index + 1, "label": p.label, "config": p.config}
                for p in todo]  # fmt: skip
        outcomes = run_points.with_options(task_runner=runner)(work, ref)
    failed = []
    for point in todo:
        outcome = outcomes[point.key]
        if outcome["ok"]:
            record.update(point, status="finished", summary=outcome["summary_path"],
                          mlflow_run_id=outcome.get("mlflow_run_id"))  # fmt: skip
        else:
            record.update(point, status="failed", error=outcome["error"])
            failed.append({"point": point.number, "label": point.label, "error": outcome["error"]})
    facts, finished = [], []
    split = points[0].config.tracking.champion_metric.partition(".")[0]
    for point in points:
        entry = record.finished(point)
        if entry is None:
            continue
        summary = json.loads(Path(entry["summary"]).read_text())
        facts.append(facts_from_summary(summary, point.label, split, point.values))
        finished.append(point)
    comparison, baseline = None, None
    if facts:
        index = finished.index(base) if base in finished else 0
        comparison, baseline = compare(facts, index), finished[index].label
    return {
        "sweep": record.key,
        "record": str(record.path),
        "points": len(points),
        "ran": [p.label for p in todo],
        "reused": [p.label for p in reused],
        "failed": failed,
        "data_stages": {k: v["corruptions"] for k, v in built.items()},
        "comparison": comparison,
        "baseline": baseline,
        "parent_run_id": ref["parent_run_id"],
    }


def _report(result: dict[str, Any], record: SweepRecord) -> str:
    lines = [f"# Sweep `{record.key}`", "",
             f"{result['points']} points; ran {len(result['ran'])}, reused "
             f"{len(result['reused'])} (finished before), failed {len(result['failed'])}; "
             f"{result['wall_s']:.0f} s.", ""]  # fmt: skip
    if result["comparison"] is not None:
        lines += ["## Comparison", "", result["comparison"].markdown()]
    if result["failed"]:
        lines += ["## Failed points", "", "Started again, the sweep reruns only these.", ""]
        lines += [f"- {f['point']} ({f['label']}): {f['error']}" for f in result["failed"]]
        lines.append("")
    lines += [f"Record: `{record.path}`."]
    if result.get("parent_run_id"):
        lines += [f"MLflow parent run: `{result['parent_run_id']}`."]
    return "\n".join(lines) + "\n"


def refuse_config_with_grid(config: Any, grid: list[str] | None) -> None:
    if grid and config is not None:
        raise ConfigError("a sweep takes a preset and overrides, not the config form: leave "
                          "`config` empty when `grid` is set")  # fmt: skip
