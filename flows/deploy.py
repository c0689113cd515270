"""Deployments: the pipeline as ``nightly`` (cron schedule from config) and ``data`` for
preparing data alone. ``maskdiff serve`` serves them in-process; ``prefect.yaml`` deploys the same
entrypoints to a work pool."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from prefect.deployments.runner import RunnerDeployment
from prefect.runner import Runner
from prefect.schedules import Cron

from flows.pipeline import pipeline
from maskdiff.config import Config
from maskdiff.ops.processes import SignalInterrupt


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


class _Runner(Runner):
    """Prefect's runner, stopping on SIGINT as it does on SIGTERM, and noting which came.

    Prefect's runner stops gracefully on SIGTERM (its flow runs cancelled, marked CANCELLED,
    schedules paused); on SIGINT it would leave through ``KeyboardInterrupt`` with its flow runs
    still RUNNING. A signal before it started, or during the graceful stop, interrupts at once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.signals: list[int] = []

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        signum = int(args[0]) if args else int(signal.SIGTERM)
        self.signals.append(signum)
        if not self.started or self.stopping:
            raise SignalInterrupt(signum)
        super().handle_sigterm(*args, **kwargs)


async def _start(runner: Runner, message: str) -> None:
    """Start ``runner``; print ``message`` once it runs (its signal handling is then in place)."""

    async def announce() -> None:
        while not runner.started:
            await asyncio.sleep(0.1)
        print(message, flush=True)

    announcing = asyncio.create_task(announce())
    try:
        await runner.start()
    finally:
        announcing.cancel()


def serve_deployments(preset: str, overrides: list[str], cfg: Config) -> int | None:
    """Serve until a signal (SIGINT or SIGTERM, the same); the schedule fires only while this
    runs. Returns the signal that stopped it (None if the runner ended by itself)."""
    runner = _Runner(pause_on_shutdown=True)
    served = deployments(preset, overrides, cfg)
    for deployment in served:
        runner.add_deployment(deployment)
    names = ", ".join(f"'{pipeline.name}/{d.name}'" for d in served)
    message = (f"Serving {names}. Start one with: prefect deployment run "
               f"'{pipeline.name}/<name>'\nCtrl-C or SIGTERM cancels the runs in progress and "
               "stops.")  # fmt: skip
    previous = signal.signal(signal.SIGINT, runner.handle_sigterm)
    try:
        asyncio.run(_start(runner, message))
    finally:
        signal.signal(signal.SIGINT, previous)
    return runner.signals[0] if runner.signals else None
