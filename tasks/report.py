"""Reporting: the MLflow run of a pipeline, Prefect artifacts, the model registry.

The pipeline opens one MLflow run (:func:`open_tracking`), tasks attach to it by
``{"uri", "run_id"}`` (:func:`tracking_ref`), and :func:`publish_report` leaves on the Prefect
run a markdown report, a table of metrics and a link to the MLflow run.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.events import emit_event
from prefect.runtime import flow_run
from prefect.settings import get_current_settings
from prefect.states import Failed, State
from prefect.utilities.urls import url_for

from maskdiff.compare import Verdict, facts_from_summary, regression
from maskdiff.config import Config
from maskdiff.data.stage import data_root, read_manifest
from maskdiff.heldout import metric_name
from maskdiff.modelcard import model_card
from maskdiff.ops import plots
from maskdiff.ops.experiments import champion_facts, set_model_card
from maskdiff.ops.orphans import owner_tags
from maskdiff.ops.registry import log_model, promote_if_better
from maskdiff.ops.servers import LOCALHOST, PREFECT_UI_PORT, project_prefect_home
from maskdiff.ops.tracking import RunTracker, resolve_tracking_uri
from tasks.model import task_logger
from tasks.overview import models_table, timings_table

_REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The commit of the code that runs, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def prefect_flow_run_url(root: Path) -> str | None:
    """The Prefect UI page of the current flow run, or None when no UI will show it.

    A Prefect server (``PREFECT_API_URL`` or ``PREFECT_UI_URL``) serves its own UI. Without one
    the run goes through a temporary server that stops with the run; Prefect then knows no UI URL
    (``flow_run.ui_url`` reads ``None/flow-runs/...``). Its database is the one ``maskdiff ui``
    serves, at 127.0.0.1:4200 by default, when ``PREFECT_HOME`` is the run root's; with another
    home no command of ours serves it, and there is no link to give.
    """
    run_id = flow_run.get_id()
    if run_id is None:
        return None
    settings = get_current_settings()
    if settings.ui_url:
        return url_for("flow-run", obj_id=run_id)
    if Path(settings.home).expanduser().resolve() == project_prefect_home(root):
        base = f"http://{LOCALHOST}:{PREFECT_UI_PORT}"
        return url_for("flow-run", obj_id=run_id, default_base_url=base)
    return None


def open_tracking(
    cfg: Config, root: Path, run_dir: Path, sweep: dict[str, Any] | None = None
) -> RunTracker | None:
    """Open the pipeline's MLflow run: tags linking to Prefect and git, params, the config.
    A sweep's point is a child of the sweep's run (``mlflow.parentRunId``)."""
    if not cfg.tracking.enabled:
        return None
    uri = resolve_tracking_uri(cfg.tracking, root)
    tags = {
        "prefect.flow_run_id": str(flow_run.get_id()),
        "prefect.flow_run_name": str(flow_run.get_name()),
        "mlflow.source.git.commit": git_commit(),
        "mlflow.source.name": "flows/pipeline.py:pipeline",
        "maskdiff.preset": cfg.name,
        "maskdiff.run_dir": str(run_dir),
        **owner_tags(),  # this process: a later start closes the run KILLED if it is killed
    }
    if sweep:
        tags |= {"maskdiff.sweep": sweep["key"], "maskdiff.sweep_point": sweep["label"]}
        if sweep.get("parent_run_id"):
            tags["mlflow.parentRunId"] = sweep["parent_run_id"]
    url = prefect_flow_run_url(root)
    if url:
        tags["prefect.flow_run_url"] = url
    else:  # left out rather than a link that leads nowhere
        task_logger().info(
            "no prefect.flow_run_url tag: this run used a temporary Prefect server on "
            "PREFECT_HOME=%s, which `maskdiff ui` does not serve (it serves %s)",
            get_current_settings().home, project_prefect_home(root),
        )  # fmt: skip
    tracker = RunTracker.start(
        cfg.tracking, uri, str(flow_run.get_name()), tags, artifact_root=root / "mlartifacts"
    )
    tracker.log_params(cfg.flat())
    tracker.log_dict(cfg.model_dump(mode="json"), "config/config.json")
    return tracker


def tracking_ref(tracker: RunTracker | None) -> dict[str, str] | None:
    return None if tracker is None else {"uri": tracker.tracking_uri, "run_id": tracker.run_id}


def run_identity(tracker: RunTracker | None, cfg: Config) -> dict[str, Any]:
    """Ids and links of this run on both sides, for ``run_summary.json``."""
    out: dict[str, Any] = {
        "prefect_flow_run_id": str(flow_run.get_id()),
        "prefect_flow_run_url": prefect_flow_run_url(data_root(cfg.data.root)),
    }
    if tracker is not None:
        out.update(
            mlflow_run_id=tracker.run_id,
            mlflow_tracking_uri=tracker.tracking_uri,
            mlflow_experiment_url=tracker.experiment_url(cfg.tracking.ui_url),
        )
    return out


def stage_hashes(data: dict[str, Any]) -> dict[str, str]:
    """The content hash of each stage folder: what ``maskdiff compare`` pairs runs by."""
    return {k: read_manifest(v)["content_hash"] for k, v in data.items() if isinstance(v, str)}


def device_name(cfg: Config) -> str:
    """The device the run trained on, for the model card: the GPU's name, or the CPU's."""
    import platform

    import torch

    from maskdiff.runtime import resolve_runtime

    device = resolve_runtime(cfg.runtime).device
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def log_data(tracker: RunTracker | None, data: dict[str, Any]) -> None:
    """Stage outputs as MLflow dataset inputs (name, digest, source) and their manifests."""
    if tracker is None:
        return
    contexts = {"blocks": "training", "corruptions": "evaluation"}
    tracker.set_tags({f"maskdiff.stage.{k}": v for k, v in stage_hashes(data).items()})
    for name, path in data.items():
        if not isinstance(path, str):
            continue
        manifest = read_manifest(path)
        tracker.log_dataset(name, manifest["content_hash"], path, contexts.get(name, name))
        tracker.log_dict(manifest, f"manifests/{name}.json")
    for name, report in data.get("validation", {}).items():
        tracker.log_text(report, f"validation/{name}.md")
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, str):
        tracker.log_artifact(Path(tokenizer) / "tokenizer.json", "tokenizer")


@task(name="register-model")
def register_model(cfg: Config, tracking: dict[str, str] | None, summary: dict) -> dict:
    """Log the MDM as an MLflow pyfunc, register it, move ``champion`` only on improvement."""
    if tracking is None or not cfg.tracking.log_model:
        return {"registered": False}
    tracker = RunTracker.attach(tracking["uri"], tracking["run_id"])
    scored = summary.get("evaluation", {}).get("checkpoints", {}).get("mdm")
    version = log_model(
        tracker,
        scored or summary["models"]["mdm"]["checkpoint"],
        summary["stages"]["tokenizer"],
        cfg.tracking.registered_model,
    )
    value = _metric(summary, cfg.tracking.champion_metric)
    model = cfg.tracking.registered_model
    verdict, champion = _against_champion(cfg, tracker, summary) if version else (None, None)
    promoted, previous = (False, None)
    if version is not None and value is not None:
        promoted, previous = promote_if_better(
            tracker.client, model, version, cfg.tracking.champion_metric, value
        )
    tracker.set_tags({"maskdiff.champion": promoted, "maskdiff.model_version": version})
    if verdict is not None:
        tracker.set_tags({"maskdiff.regression": verdict.regressed})
    logger = task_logger()
    logger.info("registered %s version %s; champion %s (previous %s)",
                model, version, "moved" if promoted else "kept", previous)  # fmt: skip
    if verdict is not None:
        (logger.warning if verdict.regressed else logger.info)(
            "against champion version %s: %s", champion, verdict.reason)  # fmt: skip
    if version is not None:
        card = model_card(cfg, summary, model, version, verdict, champion)
        set_model_card(tracker, model, version, card)
    return {
        "registered": version is not None,
        "model": model,
        "version": version,
        "champion": promoted,
        "previous_champion_value": previous,
        "metric": cfg.tracking.champion_metric,
        "value": value,
        "champion_version": champion,
        "verdict": None if verdict is None else asdict(verdict),
    }


def _against_champion(
    cfg: Config, tracker: RunTracker, summary: dict
) -> tuple[Verdict | None, str | None]:
    """This run against the current champion, paired on the same corruptions (before the alias
    moves): (verdict, champion version), or (None, None) without a comparable champion."""
    split = cfg.tracking.champion_metric.partition(".")[0]
    found = champion_facts(tracker.client, cfg.tracking.registered_model, split)
    if found is None:
        return None, None
    version, champion = found
    if champion.run_id == tracker.run_id:
        return None, None
    ours = facts_from_summary(summary, str(flow_run.get_name()), split)
    return regression(ours, champion, cfg.nightly.regression_z), version


def flag_regression(cfg: Config, summary: dict) -> State:
    """Emit ``maskdiff.regression`` (both versions, the difference and its SE in the payload;
    the flow run is a related resource) and return the FAILED state named ``Regressed`` that
    ends the flow run, with the summary as its data."""
    registry = summary["registry"]
    verdict = registry["verdict"]
    model = registry["model"]
    payload = {
        "model": model, "version": registry["version"],
        "champion_version": registry["champion_version"], "difference_nats_per_token":
        verdict["diff"], "paired_se": verdict["se"], "z": verdict["z"],
        "threshold_z": cfg.nightly.regression_z, "mlflow_run_id": summary.get("mlflow_run_id"),
        "mlflow_run_url": summary.get("mlflow_run_url"),
    }  # fmt: skip
    emit_event(
        event="maskdiff.regression",
        resource={"prefect.resource.id": f"maskdiff.model.{model}", "prefect.resource.name": model},
        payload=payload,
    )
    message = (f"{model} version {registry['version']} regressed against champion version "
               f"{registry['champion_version']}: {verdict['reason']}")  # fmt: skip
    task_logger().error("%s", message)
    return Failed(name="Regressed", message=message, data=summary)


def _metric(summary: dict, key: str) -> float | None:
    """``validation.nelbo.continuous.bits_per_byte`` out of the evaluation summary."""
    split, _, rest = key.partition(".")
    scores = summary.get("evaluation", {}).get("scores", {}).get(split, {})
    value = (scores.get("mdm") or {}).get(rest)
    if value is None:
        value = (scores.get("ar") or {}).get(rest)
    return None if value is None else float(value)


def _report_markdown(cfg: Config, summary: dict) -> str:
    lines = [f"# maskdiff run `{summary.get('run_dir', '')}`", "", f"Preset: `{cfg.name}`.", ""]
    for split, sc in summary.get("evaluation", {}).get("scores", {}).items():
        lines += [f"## Evaluation: {split}", "", sc["table"], ""]
    samples = summary.get("evaluation", {}).get("samples", {})
    if samples.get("texts"):
        lines += ["## Samples", ""]
        for text in samples["texts"][:4]:
            lines += ["```", text[:1000], "```", ""]
        stats = samples.get("stats", {})
        lines += ["| statistic | value |", "|---|---|"]
        lines += [f"| {k} | {_statistic(k, v)} |" for k, v in stats.items()]
        lines.append("")
    infill = samples.get("infill") or []
    if infill:
        first = infill[0]
        lines += [f"## Infilling held-out text ({first['sampler']}, {first['steps']} steps)", "",
                  "The model fills the [[bracketed]] gap of validation blocks; the original is "
                  "below it.", ""]  # fmt: skip
        for example in infill:
            lines += ["```", f"model:    {example['filled'][:600]}",
                      f"original: {example['original'][:600]}", "```", ""]  # fmt: skip
    frontier = samples.get("frontier") or {}
    if frontier.get("markdown"):
        lines += ["## Samplers: quality against network calls", "", frontier["markdown"], ""]
    overview = models_table(summary)
    if overview:
        lines[4:4] = ["## Both models", "", "```", overview, "```", ""]
    lines += ["## Where the time went", "", "```", timings_table(summary), "```"]
    for kind, info in summary.get("models", {}).items():
        lines.append(
            f"\n`{kind}`: {info['step']} steps in {info['seconds']:.1f} s, resumed from step "
            f"{info['resumed_from']}; checkpoint `{info['checkpoint']}`"
        )
    return "\n".join(lines) + "\n"


def _statistic(key: str, value: Any) -> str:
    """A sample statistic as the evaluation table prints numbers: perplexities to 3 decimals,
    other reals (entropy in nats, distinct-n fractions) to 4, counts and labels as they are."""
    if isinstance(value, float):
        return f"{value:.3f}" if "ppl" in key else f"{value:.4f}"
    return "-" if value is None else str(value)


def _metric_rows(summary: dict) -> list[dict[str, Any]]:
    rows = []
    for split, sc in summary.get("evaluation", {}).get("scores", {}).items():
        for side in ("mdm", "ar"):
            for key, value in (sc.get(side) or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    rows.append({"split": split, "model": side, "metric": key, "value": value})
    return rows


@task(name="report")
def publish_report(
    cfg: Config, tracking: dict[str, str] | None, summary: dict, run_dir: str
) -> str | None:
    """Prefect artifacts (markdown report, metric table, MLflow link) and MLflow report files.

    Returns the URL of the MLflow run (None without tracking).
    """
    markdown = _report_markdown(cfg, summary)
    (Path(run_dir) / "report.md").write_text(markdown)
    create_markdown_artifact(key="maskdiff-report", markdown=markdown, description="run report")
    rows = _metric_rows(summary)
    if rows:
        create_table_artifact(key="maskdiff-metrics", table=rows, description="evaluation")
    url = None
    if tracking is not None:
        tracker = RunTracker.attach(tracking["uri"], tracking["run_id"])
        url = tracker.ui_url(cfg.tracking.ui_url)
        create_link_artifact(key="mlflow-run", link=url, link_text="MLflow run")
        tracker.log_text(markdown, "report.md")
        tracker.log_text(json.dumps(summary, indent=2, default=str), "run_summary.json")
        series = {}
        for kind, info in summary.get("models", {}).items():
            hist_path = Path(info["run_dir"]) / "history.json"
            if hist_path.exists():
                history = json.loads(hist_path.read_text())
                series[f"{kind} train loss"] = [(s, m["loss"]) for s, m in history if "loss" in m]
            curve_path = Path(info["run_dir"]) / "curve.json"
            if curve_path.exists() and kind == "mdm":  # for `maskdiff compare`
                tracker.log_artifact(curve_path, "evaluation")
            if curve_path.exists():
                name = metric_name(kind)
                curve = json.loads(curve_path.read_text())
                series[f"{kind} {name}"] = [(s, m[name]) for s, m in curve if name in m]
        if series:
            tracker.log_figure(plots.training_curves(series), "plots/training_curves.png")
    return url


def close_tracking(tracker: RunTracker | None, status: str) -> None:
    if tracker is not None:
        tracker.end(status)
