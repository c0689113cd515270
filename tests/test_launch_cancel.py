"""Cancelling a served deployment's flow run through the Prefect API while 2 ranks train: every
rank is gone within 30 s, the run is CANCELLED, each checkpoint loads, and the same config
resumes from the newest one. Real servers (``prefect server start``, ``maskdiff serve``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from maskdiff.checkpoint import latest_checkpoint, load_checkpoint
from maskdiff.config import load_config
from maskdiff.ops.servers import ServerProcess, prefect_env, start_prefect
from tasks import model as model_tasks

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _wait(predicate, timeout: float, what: str, procs: list[ServerProcess]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for proc in procs:
            if proc.process.poll() is not None:
                raise AssertionError(f"{proc.name} died waiting for {what}:\n{proc.log_tail()}")
        time.sleep(0.5)
    logs = "\n\n".join(f"== {p.name}\n{p.log_tail(80)}" for p in procs)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def _training_pids(marker: str) -> list[int]:
    """Processes of ``maskdiff.train`` (torchrun agent and ranks) whose command names
    ``marker``."""
    found = []
    for entry in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = entry.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "maskdiff.train" in cmd and marker in cmd:
            found.append(int(entry.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def prefect(tmp_path):
    procs: list[ServerProcess] = []
    try:
        server = start_prefect(tmp_path / "prefect")
        procs.append(server)
        server.wait_ready(180)
        yield server, procs
    finally:
        for proc in reversed(procs):
            proc.stop()
        for pid in _training_pids(str(tmp_path)):  # ranks a failed test left behind
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cancel_stops_every_rank_and_the_rerun_resumes(prefect, tmp_path) -> None:
    server, procs = prefect
    api = f"{server.url}/api"
    root = tmp_path / "runs"
    overrides = [f"data.root={root}", "ar_baseline=false", "runtime.device=cpu",
                 "runtime.num_threads=1", "runtime.nproc_per_node=2", "train.max_steps=100000",
                 "train.log_every=100000", "train.checkpoint_every=5", "train.eval_every=0",
                 "tracking.system_metrics=false"]  # fmt: skip
    preset = tmp_path / "cancel.yaml"
    preset.write_text(yaml.safe_dump(load_config(REPO / "conf" / "smoke.yaml", overrides)
                                     .model_dump(mode="json")))  # fmt: skip
    env = prefect_env(tmp_path / "prefect-client", api_url=api)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--config", str(preset)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    procs.append(ServerProcess("maskdiff serve", "", serve, log_path))
    client = httpx.Client(timeout=30)

    def deployment():
        resp = client.get(f"{api}/deployments/name/maskdiff-pipeline/nightly")
        ready = resp.status_code == 200 and resp.json().get("status") == "READY"
        return resp.json() if ready else None

    dep = _wait(deployment, 180, "the served deployment", procs)
    body = {"parameters": {"preset": str(preset), "overrides": []}}
    for attempt in range(3):  # SQLite may answer "database is locked" once (see test_e2e)
        resp = client.post(f"{api}/deployments/{dep['id']}/create_flow_run", json=body)
        if resp.status_code == 201:
            break
        time.sleep(2.0 * (attempt + 1))
    assert resp.status_code == 201, resp.text
    run_id = resp.json()["id"]

    def training():  # two ranks and their agent, and a checkpoint past the first
        folders = list((root / "train").glob("mdm-*-0"))
        ckpts = sorted(folders[0].glob("ckpt-*.pt")) if folders else []
        pids = _training_pids(str(root))
        return (folders[0], pids) if len(pids) >= 3 and len(ckpts) >= 2 else None

    folder, pids = _wait(training, 240, "two training ranks", procs)
    resp = client.post(f"{api}/flow_runs/{run_id}/set_state",
                       json={"state": {"type": "CANCELLING"}, "force": True})  # fmt: skip
    assert resp.status_code in (200, 201), resp.text
    cancelled_at = time.monotonic()
    _wait(lambda: not any(_alive(p) for p in pids), 30, "every rank to end", procs)
    gone_after = time.monotonic() - cancelled_at

    def final():
        state = client.get(f"{api}/flow_runs/{run_id}").json()["state"]
        return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    state = _wait(final, 60, "the cancelled state", procs)
    assert state["type"] == "CANCELLED", f"{state}\n{procs[-1].log_tail(80)}"
    assert not _training_pids(str(root))
    checkpoints = sorted(folder.glob("ckpt-*.pt"))
    assert checkpoints and not (folder / "DONE").exists()
    steps = [int(load_checkpoint(p)["step"]) for p in checkpoints]  # each loads whole
    newest = steps[-1]
    assert latest_checkpoint(folder) == checkpoints[-1]

    # the same config again (one process, a minute's budget: not part of the run's identity)
    cfg = load_config(preset, ["runtime.nproc_per_node=1", "train.max_minutes=0.0001"])
    blocks = next(p for p in (root / "data").glob("blocks-*") if (p / "manifest.json").is_file())
    corr = next(p for p in (root / "data").glob("corrupt*") if (p / "manifest.json").is_file())
    again = model_tasks.train.fn(cfg, "mdm", str(blocks), str(corr), str(root), None)
    assert again["run_dir"] == str(folder)
    assert again["resumed_from"] == newest and again["step"] > newest
    print(f"ranks gone {gone_after:.1f} s after the cancel request; resumed from step {newest}")
