"""MLflow for the team's loop: a sweep's parent run, the facts of finished runs for
``maskdiff compare`` and for the champion check, and model cards on registered versions.

A sweep is one MLflow run with a child run per point (tag ``mlflow.parentRunId``, which the UI
nests under the parent). A sweep started again reopens its parent run, so the points it reruns
sit beside the ones it reused.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from maskdiff.compare import RunFacts, facts_from_summary
from maskdiff.config import TrackingConfig
from maskdiff.ops.registry import champion_version
from maskdiff.ops.tracking import RunTracker

__all__ = ["champion_facts", "open_parent_run", "run_facts", "set_model_card"]


def open_parent_run(
    cfg: TrackingConfig, tracking_uri: str, name: str, run_id: str | None,
    tags: dict[str, str], artifact_root: Path,
) -> RunTracker:  # fmt: skip
    """The sweep's parent run: ``run_id`` reopened (RUNNING again) when it still exists, else a
    new run."""
    if run_id:
        client = MlflowClient(tracking_uri=tracking_uri)
        try:
            client.get_run(run_id)
        except MlflowException:
            run_id = None
        else:
            client.update_run(run_id, status="RUNNING")
            tracker = RunTracker(client, run_id, tracking_uri)
            tracker.set_tags(tags)
            return tracker
    system = cfg.model_copy(update={"system_metrics": False})  # the children record their own
    return RunTracker.start(system, tracking_uri, name, tags, artifact_root=artifact_root)


class NotComparableError(ValueError):
    """A run that cannot enter a comparison (no evaluation, no per-block scores)."""


def run_facts(client: MlflowClient, run_id: str, split: str | None = None) -> RunFacts:
    """The facts of a finished MLflow run of the pipeline, from its artifacts
    (``run_summary.json``, ``evaluation/<split>_scores.json``)."""
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise NotComparableError(f"run {run_id}: not found in the tracking store") from exc
    if run.info.status != "FINISHED":
        raise NotComparableError(f"run {run_id} ({run.info.run_name}) is {run.info.status}, not "
                            "FINISHED")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="maskdiff-compare-") as tmp:
        try:
            local = client.download_artifacts(run_id, "run_summary.json", tmp)
        except (MlflowException, OSError) as exc:
            raise NotComparableError(f"run {run_id} ({run.info.run_name}) has no run_summary.json: "
                                "not a maskdiff pipeline run") from exc  # fmt: skip
        summary = json.loads(Path(local).read_text())
        scores = summary.get("evaluation", {}).get("scores", {})
        if not scores:
            raise NotComparableError(f"run {run_id} ({run.info.run_name}) was not evaluated")
        chosen = split if split in scores else next(iter(scores))
        try:
            scores_file = client.download_artifacts(run_id, f"evaluation/{chosen}_scores.json", tmp)
        except (MlflowException, OSError) as exc:
            raise NotComparableError(
                f"run {run_id} ({run.info.run_name}) kept no per-block scores "
                f"(evaluation/{chosen}_scores.json): it cannot be paired"
            ) from exc
        curve = _download(client, run_id, "evaluation/curve.json", tmp)
        name = run.data.tags.get("maskdiff.sweep_point") or run.info.run_name or run_id
        facts = facts_from_summary(summary, name, chosen, scores_file=scores_file,
                                   curve_file=curve or Path(tmp) / "none")  # fmt: skip
    facts.run_id = run_id
    return facts


def _download(client: MlflowClient, run_id: str, path: str, folder: str) -> Path | None:
    try:
        return Path(client.download_artifacts(run_id, path, folder))
    except (MlflowException, OSError):
        return None


def champion_facts(
    client: MlflowClient, model_name: str, split: str | None
) -> tuple[str, RunFacts] | None:
    """(version, facts) of the version aliased ``champion``; None when there is none or its run
    cannot be compared (older runs kept no per-block scores)."""
    version = champion_version(client, model_name)
    if version is None:
        return None
    try:
        return str(version.version), run_facts(client, version.run_id, split)
    except NotComparableError:
        return None


def set_model_card(tracker: RunTracker, model_name: str, version: str, card: str) -> None:
    """The card as the model version's description and as the run's ``model_card.md``."""
    tracker.client.update_model_version(model_name, version, description=card)
    tracker.log_text(card, "model_card.md")
