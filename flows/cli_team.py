"""The team's commands: ``maskdiff sweep`` (the pipeline over a grid, flows/sweep.py) and
``maskdiff compare`` (finished runs side by side, paired)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from flows.cli import console_without_tracebacks  # imported when the command runs
from flows.stores import (
    prepare_local_prefect_database,
    start_temporary_server,
    use_project_stores,
    wait_for_temporary_server,
)
from maskdiff.config import load_config
from maskdiff.ops.processes import paused_gc


def cmd_sweep(args: argparse.Namespace) -> int:
    """The pipeline over a grid (flows/sweep.py); the comparison printed. Exit status 1 when a
    point failed (the rest finished; the same command reruns only the failed points)."""
    from maskdiff.sweep import choose_baseline, expand, parse_grid

    # the points are checked and the stores chosen before Prefect is imported: Prefect reads its
    # settings (PREFECT_HOME among them) once, when it is first imported
    points = expand(args.config, args.set or [], parse_grid(args.grid))
    choose_baseline(points, args.baseline)  # a ConfigError refuses the sweep here
    use_project_stores(points[0].config)
    os.environ["MASKDIFF_PROGRESS"] = "0" if args.no_progress else "1"
    with paused_gc():
        server = start_temporary_server(prepare_local_prefect_database())
        from flows.pipeline import pipeline
    wait_for_temporary_server(server)

    with console_without_tracebacks(args.debug):
        try:
            state = pipeline(preset=args.config, overrides=args.set or [], grid=args.grid,
                             baseline=args.baseline, return_state=True)  # fmt: skip
            partial = state.is_failed() and state.name == "Failed points"
            result = state.result(raise_on_failure=not partial)
        except Exception:
            logging.getLogger("prefect").setLevel(logging.WARNING)
            raise
    print(result["report"], file=sys.stderr)
    print(result["report_path"])
    if partial:
        logging.getLogger("prefect").setLevel(logging.WARNING)
        raise SystemExit(f"maskdiff: sweep: {state.message}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """The comparison table of finished MLflow runs (``maskdiff compare RUN_ID ...``)."""
    with paused_gc():
        from mlflow import MlflowClient

        from maskdiff.compare import compare
        from maskdiff.ops.experiments import NotComparableError, run_facts
        from maskdiff.ops.tracking import resolve_tracking_uri

    cfg = load_config(args.config, args.set or [])
    uri = resolve_tracking_uri(cfg.tracking, Path(cfg.data.root).resolve())
    client = MlflowClient(tracking_uri=uri)
    split = args.split or cfg.tracking.champion_metric.partition(".")[0]
    try:
        facts = [run_facts(client, run_id, split) for run_id in args.run_ids]
    except NotComparableError as exc:
        raise SystemExit(f"maskdiff: compare: {exc} (store {uri})") from None
    baseline = 0
    if args.baseline:
        ids = [f.run_id for f in facts]
        if args.baseline not in ids:
            raise SystemExit(
                f"maskdiff: compare: --baseline {args.baseline} is not one of the runs"
            )
        baseline = ids.index(args.baseline)
    comparison = compare(facts, baseline)
    print(comparison.markdown())
    if not comparison.paired:
        unpaired = [r.facts.name for r in comparison.rows if r.diff is None]
        print(f"Not paired: {', '.join(unpaired)}: scored on another corruption stage than the "
              "baseline, so their differences have no paired standard error.")  # fmt: skip
    return 0
