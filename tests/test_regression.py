"""The nightly's check against the champion, the model card, and ``maskdiff compare``.

Two pipeline runs in this process on the session's Prefect server, on one registry: a champion
trained for 60 steps, then a run of 2 steps on the same corruption stage. The second is worse by
far more than ``nightly.regression_z`` paired standard errors: the event ``maskdiff.regression``
must be in the server's event feed, the flow run FAILED and named ``Regressed``, the champion
unmoved, and each version's description its model card.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, SMOKE, code_env

MODEL = "regression-test-model"


def _overrides(root: Path, steps: int) -> list[str]:
    return [f"data.root={root}", f"tracking.tracking_uri=sqlite:///{root}/mlflow.db",
            f"tracking.registered_model={MODEL}", "ar_baseline=false",
            "sample.frontier_samples=0", "sample.n_samples=1", "sample.infill_examples=1",
            f"train.max_steps={steps}", "train.eval_every=0"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(prefect_harness, tmp_path_factory):
    from flows.pipeline import pipeline
    from maskdiff.config import load_config

    root = tmp_path_factory.mktemp("regression") / "runs"
    champion = pipeline(config=load_config(SMOKE, _overrides(root, 60)), return_state=True)
    nightly = pipeline(config=load_config(SMOKE, _overrides(root, 2)), return_state=True)
    return {"root": root, "champion": champion, "nightly": nightly}


def _client(root: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{root}/mlflow.db")


def test_the_champion_run_completes_and_becomes_champion(runs) -> None:
    state = runs["champion"]
    assert state.is_completed(), state
    registry = state.result()["registry"]
    assert registry["version"] == "1" and registry["champion"]
    assert registry["verdict"] is None  # nothing to compare with yet


def test_a_worse_run_ends_regressed_and_keeps_the_champion(runs) -> None:
    state = runs["nightly"]
    assert state.is_failed() and state.name == "Regressed", state
    assert "version 2 regressed against champion version 1" in state.message
    summary = state.result(raise_on_failure=False)
    verdict = summary["registry"]["verdict"]
    assert verdict["regressed"] and verdict["diff"] > 0 and verdict["z"] > 2.0
    assert verdict["diff"] == pytest.approx(verdict["z"] * verdict["se"])
    assert Path(summary["summary_path"]).is_file()  # the run's records are all written
    client = _client(runs["root"])
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["maskdiff.regression"] == "True"


def test_the_regression_event_is_in_the_event_feed(runs) -> None:
    from helpers import wait_until
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    summary = runs["nightly"].result(raise_on_failure=False)
    flow_run = f"prefect.flow-run.{summary['prefect_flow_run_id']}"

    def events():
        with get_client(sync_client=True) as client:
            page = client.read_events(EventFilter(
                event=EventNameFilter(name=["maskdiff.regression"]),
                related=EventRelatedFilter(id=[flow_run]),
            ), limit=50)  # fmt: skip
        return page.events

    found = wait_until(events, 30, "the maskdiff.regression event in the feed")
    assert len(found) == 1
    payload = found[0].payload
    verdict = summary["registry"]["verdict"]
    assert payload["version"] == "2" and payload["champion_version"] == "1"
    assert payload["difference_nats_per_token"] == pytest.approx(verdict["diff"])
    assert payload["paired_se"] == pytest.approx(verdict["se"])
    assert payload["threshold_z"] == 2.0
    assert found[0].resource.id == f"maskdiff.model.{MODEL}"
    # the champion's run emitted none
    champion_run = runs["champion"].result()["prefect_flow_run_id"]
    with get_client(sync_client=True) as client:
        page = client.read_events(EventFilter(
            event=EventNameFilter(name=["maskdiff.regression"]),
            related=EventRelatedFilter(id=[f"prefect.flow-run.{champion_run}"]),
        ), limit=50)  # fmt: skip
    assert page.events == []


def test_each_version_carries_its_model_card(runs) -> None:
    client = _client(runs["root"])
    summary = runs["nightly"].result(raise_on_failure=False)
    card = client.get_model_version(MODEL, "2").description
    local = client.download_artifacts(summary["mlflow_run_id"], "model_card.md", str(runs["root"]))
    assert Path(local).read_text() == card
    data = summary["stage_hashes"]
    for section in ("## Data", "## Configuration", "## Scores", "## Examples", "## Training",
                    "## Known limits"):  # fmt: skip
        assert section in card, section
    for name in ("documents", "tokenizer", "blocks", "corruptions"):
        assert data[name] in card, name
    # the configuration's difference from the preset: the steps and the other overrides
    assert "| `train.max_steps` | `20` | `2` |" in card
    assert "| `ar_baseline` | `true` | `false` |" in card
    # the bound with its SE, and the paired comparison with the champion it was checked against
    scores = summary["evaluation"]["scores"]["validation"]["mdm"]
    assert f"{scores['nelbo.continuous.nats_per_token']:.4f} ± " in card
    verdict = summary["registry"]["verdict"]
    assert "Against the champion (version 1), paired" in card
    assert f"{verdict['diff']:.4f} nats/token (paired SE {verdict['se']:.4f}" in card
    assert "Flagged as a regression" in card
    assert "Hardware: cpu" in card
    first = client.get_model_version(MODEL, "1").description
    assert "no champion to compare with" in first and "Flagged" not in first


def test_compare_pairs_the_two_runs(runs) -> None:
    champion = runs["champion"].result()["mlflow_run_id"]
    nightly = runs["nightly"].result(raise_on_failure=False)
    cmd = [sys.executable, "-m", "flows.cli", "compare", nightly["mlflow_run_id"], champion,
           "--config", str(SMOKE), "--set",
           f"tracking.tracking_uri=sqlite:///{runs['root']}/mlflow.db"]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, env=code_env(), capture_output=True, text=True,
                         timeout=180)  # fmt: skip
    assert out.returncode == 0, out.stderr
    verdict = nightly["registry"]["verdict"]
    # baseline: the first run (the nightly); the champion's difference is minus the nightly's
    assert "| baseline |" in out.stdout
    assert f"{-verdict['diff']:+.4f} ± {verdict['se']:.4f}" in out.stdout
    assert "same corruption stage" in out.stdout and "Not paired" not in out.stdout
    bad = subprocess.run([*cmd[:4], "no-such-run", *cmd[5:]], cwd=REPO, env=code_env(),
                         capture_output=True, text=True, timeout=180)  # fmt: skip
    assert bad.returncode == 1
    assert "no-such-run" in bad.stderr.strip().splitlines()[-1]


def test_the_automation_turns_the_event_into_a_notification(prefect_server) -> None:
    """``python -m flows.deploy regressions --block custom-webhook/<name>`` on a real Prefect
    server: a webhook block pointed at an HTTP server here; a ``maskdiff.regression`` event
    makes the server's automation post the notification, with the event's numbers in it."""
    import threading
    import uuid
    from datetime import datetime, timezone
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from helpers import wait_until
    from prefect import get_client
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import main as deploy_main

    received: list[bytes] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    hook = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    payload = {"model": MODEL, "version": "7", "champion_version": "5",
               "difference_nats_per_token": 0.25, "paired_se": 0.01, "z": 25.0,
               "mlflow_run_url": "http://mlflow/runs/x"}  # fmt: skip

    def notified() -> bool:
        """Post the event (again: the automation may not be loaded by the server yet)."""
        if not received:
            event = {"id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(),
                     "event": "maskdiff.regression", "payload": payload,
                     "resource": {"prefect.resource.id": f"maskdiff.model.{MODEL}"}}  # fmt: skip
            with get_client(sync_client=True) as client:
                client.request("POST", "/events", json=[event])
        return bool(received)

    try:
        with temporary_settings(updates={PREFECT_API_URL: f"{prefect_server.url}/api"}):
            CustomWebhookNotificationBlock(
                name="team", url=f"http://127.0.0.1:{hook.server_port}/hook",
                json_data={"text": "{{body}}"},
            ).save("maskdiff-team", overwrite=True)  # fmt: skip
            try:
                deploy_main(["regressions", "--block", "custom-webhook/maskdiff-team"])
                wait_until(notified, 120, "the webhook notification", [prefect_server],
                           interval=5)  # fmt: skip
            finally:
                # while this server is up: its event workers would otherwise be drained at the
                # session's end, after the server stopped, and wait for it for ever
                EventsWorker.drain_all()
    finally:
        hook.shutdown()
    text = json.loads(received[0])["text"]
    assert f"{MODEL} version 7 is worse than champion version 5 by 0.25 nats/token" in text
    assert "paired SE 0.01, z = 25.0" in text
