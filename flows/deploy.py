"""Deployments: the pipeline as ``nightly`` (cron schedule from config), ``data`` for
preparing data alone, and ``sweep`` (a grid in the form: flows/sweep.py). ``maskdiff serve``
serves them in-process; ``prefect.yaml`` deploys the same entrypoints to a work pool, whose
workers need the zombie automation below once per server:

    python -m flows.deploy zombies            # within = 3 heartbeats of the current settings
    python -m flows.deploy regressions --block slack-webhook/team   # notify on regressions

A worker killed with its flow runs (SIGKILL, a lost machine) leaves them RUNNING: nothing is left
to report the crash. Each flow run emits a ``prefect.flow-run.heartbeat`` event every
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (default 180, at least 30); the automation marks a
run CRASHED when no heartbeat nor terminal event follows its last heartbeat within ``within``
seconds, as Prefect's guide "How to detect and respond to zombie flows" describes.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from datetime import timedelta
from typing import Any

from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.deployments.runner import RunnerDeployment
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.runner import Runner
from prefect.schedules import Cron
from prefect.settings import get_current_settings

from flows.pipeline import pipeline
from maskdiff.config import Config
from maskdiff.ops.processes import SignalInterrupt

# The sweep deployment's grid until the form says otherwise: two learning rates.
SWEEP_EXAMPLE = ["train.lr=0.0003,0.001"]


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
    sweep = pipeline.to_deployment(
        name="sweep",
        parameters={"preset": preset, "overrides": overrides, "grid": SWEEP_EXAMPLE},
        description="The pipeline over a grid: each `grid` line is key=v1,v2 (the values of one "
        "setting); every combination is a point. Points compared with paired standard errors; "
        "started again, it reruns only the points that failed.",
        tags=["maskdiff", "sweep"],
    )
    return [nightly, data, sweep]


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


ZOMBIE_AUTOMATION = "maskdiff: crash zombie flow runs"


def zombie_automation(within_s: float | None = None) -> Automation:
    """Create (or replace) the automation that marks silent flow runs CRASHED; returns it.

    ``within_s`` defaults to three heartbeat periods of ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``;
    it must exceed one period, or a healthy run is marked between two heartbeats.
    """
    period = get_current_settings().flows.heartbeat_frequency or 180
    within = float(within_s) if within_s is not None else 3.0 * period
    if within <= period:
        raise ValueError(f"within={within:g}s must exceed the heartbeat period ({period}s)")
    with get_client(sync_client=True) as client:  # one automation of this name per server
        for old in client.read_automations_by_name(name=ZOMBIE_AUTOMATION):
            client.delete_automation(old.id)
    terminal = (f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed"))
    return Automation(
        name=ZOMBIE_AUTOMATION,
        description="A flow run whose heartbeats stopped (worker or machine lost) is CRASHED.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *terminal},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {within:g} s: its worker or machine was lost",
            )
        ],
    ).create()


REGRESSION_AUTOMATION = "maskdiff: notify on a model regression"

# The notification's text; Prefect fills the {{ event... }} fields from the triggering event.
REGRESSION_BODY = (
    "maskdiff: {{ event.payload.model }} version {{ event.payload.version }} is worse than "
    "champion version {{ event.payload.champion_version }} by "
    "{{ event.payload.difference_nats_per_token }} nats/token (paired SE "
    "{{ event.payload.paired_se }}, z = {{ event.payload.z }}). "
    "MLflow run: {{ event.payload.mlflow_run_url }}"
)


def regression_automation(block: str) -> Automation:
    """Create (or replace) the automation that sends the notification block named ``block``
    (Slack, email, a webhook: any Prefect notification block) on each ``maskdiff.regression``
    event; returns it."""
    from prefect.blocks.core import Block
    from prefect.events.actions import SendNotification

    found = Block.load(block) if "/" in block else None
    with get_client(sync_client=True) as client:
        if found is None:
            docs = [d for d in client.read_block_documents() if d.name == block]
            if len(docs) != 1:
                raise ValueError(f"notification block {block!r}: found {len(docs)} blocks of that "
                                 "name; give it as <block-type-slug>/<name>")  # fmt: skip
            block_id = docs[0].id
        else:
            block_id = found._block_document_id
        for old in client.read_automations_by_name(name=REGRESSION_AUTOMATION):
            client.delete_automation(old.id)
    return Automation(
        name=REGRESSION_AUTOMATION,
        description="A nightly model worse than the champion (paired z above "
        "nightly.regression_z) sends a notification.",
        trigger=EventTrigger(
            expect={"maskdiff.regression"},
            match=ResourceSpecification({"prefect.resource.id": "maskdiff.model.*"}),
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[SendNotification(block_document_id=block_id,
                                  subject="maskdiff: model regression", body=REGRESSION_BODY)],
    ).create()  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.deploy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    zombies = sub.add_parser("zombies", help="create the automation that crashes silent runs")
    zombies.add_argument("--within", type=float, default=None, help="seconds (default 3 beats)")
    notify = sub.add_parser("regressions", help="notify through a block on maskdiff.regression")
    notify.add_argument(
        "--block", required=True, help="a notification block: <type-slug>/<name>, or a name"
    )
    args = parser.parse_args(argv)
    if args.command == "regressions":
        made = regression_automation(args.block)
        print(f"automation {made.name!r} ({made.id}): {args.block} on each maskdiff.regression")
        return
    made = zombie_automation(args.within)
    print(f"automation {made.name!r} ({made.id}): CRASHED after {made.trigger.within} silent")


if __name__ == "__main__":
    main()
