"""Cancelling a served deployment's flow run through the Prefect API while 2 ranks train: every
rank is gone within 30 s, the run is CANCELLED, each checkpoint loads, and the same config
resumes from the newest one. Real servers (the session's ``prefect server start``, ``maskdiff
serve``)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from helpers import serve, smoke_config, wait_served, wait_until, write_preset

from maskdiff.checkpoint import latest_checkpoint, load_checkpoint, training_identity
from maskdiff.config import load_config
from maskdiff.data.stage import read_manifest
from maskdiff.ops.runs import claim_run_folder
from maskdiff.ops.servers import ServerProcess, prefect_env
from maskdiff.train import train

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
DEPLOYMENT = "cancel"  # its own name on the shared server (test_e2e serves "nightly")


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
def procs(prefect_server: ServerProcess, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    """The Prefect server, then what the test starts (stopped at the end)."""
    procs = [prefect_server]
    try:
        yield procs
    finally:
        for proc in reversed(procs[1:]):
            proc.stop()
        for pid in _training_pids(str(tmp_path)):  # ranks a failed test left behind
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cancel_stops_every_rank_and_the_rerun_resumes(
    procs: list[ServerProcess], tmp_path: Path
) -> None:
    api = f"{procs[0].url}/api"
    root = tmp_path / "runs"
    cfg = smoke_config(root, "ar_baseline=false", "runtime.device=cpu", "runtime.num_threads=1",
                       "runtime.nproc_per_node=2", "train.max_steps=100000",
                       "train.log_every=100000", "train.checkpoint_every=5", "train.eval_every=0",
                       "tracking.system_metrics=false",
                       f"nightly.deployment={DEPLOYMENT}")  # fmt: skip
    preset = write_preset(tmp_path / "cancel.yaml", cfg)
    env = prefect_env(tmp_path / "prefect-client", api_url=api)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    since = datetime.now(timezone.utc)
    procs.append(serve(preset, env, tmp_path / "serve.log"))
    client = httpx.Client(timeout=30)
    dep = wait_served(client, api, DEPLOYMENT, procs, since)
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

    folder, pids = wait_until(training, 240, "two training ranks", procs)
    resp = client.post(f"{api}/flow_runs/{run_id}/set_state",
                       json={"state": {"type": "CANCELLING"}, "force": True})  # fmt: skip
    assert resp.status_code in (200, 201), resp.text
    cancelled_at = time.monotonic()
    wait_until(lambda: not any(map(_alive, pids)), 30, "every rank to end", procs)
    gone_after = time.monotonic() - cancelled_at

    def final():
        state = client.get(f"{api}/flow_runs/{run_id}").json()["state"]
        return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    state = wait_until(final, 60, "the cancelled state", procs)
    assert state["type"] == "CANCELLED", f"{state}\n{procs[-1].log_tail(80)}"
    assert not _training_pids(str(root))
    checkpoints = sorted(folder.glob("ckpt-*.pt"))
    assert checkpoints and not (folder / "DONE").exists()
    steps = [int(load_checkpoint(p)["step"]) for p in checkpoints]  # each loads whole
    newest = steps[-1]
    assert latest_checkpoint(folder) == checkpoints[-1]

    # the same config claims this folder again and resumes from its newest checkpoint (a few
    # steps of the library's loop: the task would train to max_steps)
    cfg = load_config(preset, [])
    blocks = next(p for p in (root / "data").glob("blocks-*") if (p / "manifest.json").is_file())
    corr = next(p for p in (root / "data").glob("corrupt*") if (p / "manifest.json").is_file())
    stats = read_manifest(blocks)["stats"]
    identity = training_identity(cfg, str(blocks), str(corr), None)  # no curve
    with claim_run_folder(root, "mdm", identity) as claimed:
        assert claimed.path == folder and claimed.resumed
        again = train(cfg, blocks, folder, vocab_size=int(stats["vocab_size"]),
                      corruptions_dir=corr, tokenizer_hash=str(stats["tokenizer_hash"]),
                      stop_at_step=newest + 5)  # fmt: skip
    assert again.resumed_from == newest and again.step == newest + 5
    print(f"ranks gone {gone_after:.1f} s after the cancel request; resumed from step {newest}")
