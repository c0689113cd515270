"""The flows: ``prepare-data``, ``train``, ``evaluate`` and the end-to-end ``maskdiff-pipeline``.

Each flow takes the typed config (so the Prefect UI renders a form). The data tasks get only the
sections they use (``config.data``, ``config.tokenizer``, ``config.corruption`` and
``config.diffusion``); the model tasks (train, evaluate, sample) and the report tasks that read the
config get all of it, since they use many sections. Tasks pass stage paths and hashes between
them, never tensors. The pipeline opens one MLflow run and closes it FINISHED or FAILED.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import State

from flows.orphans import claim_flow_run, sweep_orphans
from flows.runners import task_runner
from flows.sweep import refuse_config_with_grid, run_sweep
from maskdiff.config import Config, load_config
from maskdiff.data.stage import data_root
from maskdiff.ops.processes import interrupted
from tasks import data as data_tasks
from tasks import model as model_tasks
from tasks import report as report_tasks
from tasks.caching import root_generation

Stage = Literal["data", "train", "evaluate", "all"]


def _paths(config: Config) -> tuple[Path, Path]:
    root = data_root(config.data.root)
    return root, root / "data"


@flow(name="prepare-data", log_prints=True)
def prepare_data(config: Config) -> dict[str, Any]:
    """Ingest, tokenizer, token blocks and corruptions (shards mapped over the task runner),
    and a validation of every stage. Returns the stage folders by name, and under
    ``"validation"`` the validation report of each (markdown)."""
    _, data_dir = _paths(config)
    root_generation(data_dir)
    root = str(data_dir)
    docs = data_tasks.ingest(config.data, root)
    tok = data_tasks.tokenizer(config.tokenizer, str(docs.path), root)
    blocks = data_tasks.build_blocks(config.data, str(docs.path), str(tok.path), root)
    corr = data_tasks.corrupt(config.corruption, config.diffusion, str(blocks.path), root)
    stages = {
        "documents": str(docs.path),
        "tokenizer": str(tok.path),
        "blocks": str(blocks.path),
        "corruptions": str(corr.path),
    }
    checks = data_tasks.validate.map(list(stages.values()), list(stages))
    reports = dict(zip(stages, checks.result(), strict=True))
    return {**stages, "validation": reports}


@flow(name="train", log_prints=True)
def train(
    config: Config, data: dict[str, Any], tracking: dict[str, str] | None = None
) -> dict[str, Any]:
    """Train the masked diffusion model and, if ``ar_baseline``, the AR baseline."""
    root = str(_paths(config)[0])
    out = {"mdm": model_tasks.train(config, "mdm", data["blocks"], data["corruptions"], root,
                                    tracking)}  # fmt: skip
    if config.ar_baseline:
        out["ar"] = model_tasks.train(config, "ar", data["blocks"], None, root, tracking)
    return out


@flow(name="evaluate", log_prints=True)
def evaluate(
    config: Config,
    data: dict[str, Any],
    models: dict[str, Any],
    tracking: dict[str, str] | None = None,
) -> dict[str, Any]:
    """NELBO (continuous and every T), perplexity bounds, the AR comparison, and samples, of
    the checkpoints ``eval.checkpoint`` names (``last`` or ``best`` by validation)."""
    mdm_ckpt = scored_checkpoint(config, models["mdm"])
    ar_ckpt = scored_checkpoint(config, models["ar"]) if "ar" in models else None
    started = time.perf_counter()
    scores = model_tasks.evaluate(config, data, mdm_ckpt, ar_ckpt, tracking)
    scored = time.perf_counter()
    samples = model_tasks.sample(config, data, mdm_ckpt, ar_ckpt, tracking)
    timings = {"evaluate bounds": scored - started, "sample": time.perf_counter() - scored}
    return {
        "scores": scores,
        "samples": samples,
        "checkpoints": {"mdm": mdm_ckpt, "ar": ar_ckpt},
        "timings_s": timings,
    }


def scored_checkpoint(config: Config, model: dict[str, Any]) -> str:
    """The checkpoint of a trained model that the evaluation scores: ``best.pt`` when
    ``eval.checkpoint`` is ``best`` and the run kept one (it has a validation curve), else the
    last."""
    if config.eval.checkpoint == "best" and model.get("best_checkpoint"):
        return str(model["best_checkpoint"])
    return str(model["checkpoint"])


@flow(name="maskdiff-pipeline", log_prints=True)
def pipeline(
    preset: str = "default",
    overrides: list[str] | None = None,
    config: Config | None = None,
    stage: Stage = "all",
    grid: list[str] | None = None,
    baseline: str | None = None,
    sweep: dict[str, Any] | None = None,
) -> dict[str, Any] | State:
    """Corpus to tracked model. ``config`` (the form) wins over ``preset`` + ``overrides``.

    ``stage`` runs the pipeline up to and including ``data``, ``train`` or ``evaluate``;
    ``all`` also registers the model in MLflow and compares it with the champion, paired: a
    model worse by more than ``nightly.regression_z`` standard errors emits the event
    ``maskdiff.regression`` and ends the flow run in a FAILED state named ``Regressed`` (the
    summary is its data).

    ``grid`` (``key=v1,v2`` strings) makes this run a sweep over the grid's points, on the
    preset and overrides (flows/sweep.py); ``baseline`` (``key=value``) names the point the
    others are compared with (default: the first). ``sweep``: set by a sweep on its points.

    In a job of several nodes (``runtime.nnodes``) only node 0 opens the MLflow run, evaluates,
    registers and reports; on the other nodes the run stops after training (their ranks train
    in node 0's folder and node 0 streams the metrics, docs/distributed.md).
    """
    if grid:
        refuse_config_with_grid(config, grid)
        return run_sweep(preset, overrides or [], grid, baseline)
    wall_started = time.perf_counter()
    logger = get_run_logger()
    cfg = config if config is not None else load_config(preset, overrides or [])
    runner = task_runner(cfg.runtime)  # a missing extra fails here, before any run is opened
    root, _ = _paths(cfg)
    claim_flow_run(logger)  # owner tags first: a concurrent start's sweep then sees this run alive
    sweep_orphans(cfg, root, logger)
    run_dir = root / "pipeline" / f"{time.strftime('%Y%m%d-%H%M%S')}-{flow_run.get_name()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.runtime.node_rank > 0:  # a job of several nodes is evaluated and tracked once
        stage = "data" if stage == "data" else "train"
        logger.info(
            "node %d of %d: data and training only; node 0 evaluates, logs to MLflow and "
            "reports for the job", cfg.runtime.node_rank, cfg.runtime.nnodes,
        )  # fmt: skip
    leader = cfg.runtime.node_rank == 0
    tracker = report_tasks.open_tracking(cfg, root, run_dir, sweep) if leader else None
    summary: dict[str, Any] = {"config": cfg.name, "run_dir": str(run_dir), "stage": stage}
    summary.update(report_tasks.run_identity(tracker, cfg))
    ref = report_tasks.tracking_ref(tracker)
    timings: dict[str, float] = {}
    try:
        started = time.perf_counter()
        data = prepare_data.with_options(task_runner=runner)(cfg)
        timings["prepare-data"] = time.perf_counter() - started
        summary["stages"] = data
        summary["stage_hashes"] = report_tasks.stage_hashes(data)
        report_tasks.log_data(tracker, data)
        if stage in ("train", "evaluate", "all"):
            started = time.perf_counter()
            summary["models"] = train(cfg, data, ref)
            timings["train"] = time.perf_counter() - started
        if stage in ("evaluate", "all"):
            started = time.perf_counter()
            summary["evaluation"] = evaluate(cfg, data, summary["models"], ref)
            timings["evaluate"] = time.perf_counter() - started
        summary["device"] = report_tasks.device_name(cfg)
        summary["wall_s"] = time.perf_counter() - wall_started
        if stage == "all":
            summary["registry"] = report_tasks.register_model(cfg, ref, summary)
        summary["timings_s"] = timings
        if leader:
            summary["mlflow_run_url"] = report_tasks.publish_report(cfg, ref, summary,
                                                                    str(run_dir))  # fmt: skip
        report_tasks.close_tracking(tracker, "FINISHED")
    except BaseException as exc:  # a signal (KeyboardInterrupt, TerminationSignal) is no failure
        killed = not isinstance(exc, Exception) or interrupted()  # see processes.interrupted
        report_tasks.close_tracking(tracker, "KILLED" if killed else "FAILED")
        raise
    path = run_dir / "run_summary.json"
    summary["wall_s"] = time.perf_counter() - wall_started
    path.write_text(json.dumps(summary, indent=2, default=str))
    logger.info("run summary: %s", path)
    summary["summary_path"] = str(path)
    verdict = (summary.get("registry") or {}).get("verdict") or {}
    if verdict.get("regressed"):
        return report_tasks.flag_regression(cfg, summary)
    return summary
