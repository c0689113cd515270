"""Deployments: the pipeline as ``nightly`` (cron schedule from config) and ``data`` for
preparing data alone. ``maskdiff serve`` serves them in-process; ``prefect.yaml`` deploys the same
entrypoints to a work pool."""

from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows.pipeline import pipeline
from maskdiff.config import Config


def deployments(preset: str, overrides: list[str], cfg: Config) -> list[RunnerDeployment]:
    """The deployments ``maskdiff serve`` offers in the Prefect UI."""
    nightly = pipeline.to_deployment(
        name=cfg.nightly.deployment,
        schedule=Cron(cfg.nightly.cron, timezone=cfg.nightly.timezone),
        parameters={"preset": preset, "overrides": overrides},
        description="The whole pipeline; change the preset, overrides or the full config form.",
        tags=["maskdiff", "nightly"],
    )
    data = pipeline.to_deployment(
        name="data",
        parameters={"preset": preset, "overrides": overrides, "stage": "data"},
        description="Ingest, tokenize, corrupt and validate, without training.",
        tags=["maskdiff"],
    )
    return [nightly, data]


def serve_deployments(preset: str, overrides: list[str], cfg: Config) -> None:
    """Serve until interrupted; the schedule fires only while this runs."""
    serve(*deployments(preset, overrides, cfg))
