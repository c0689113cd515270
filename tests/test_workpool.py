"""``prefect.yaml`` run by a real worker: a process pool, ``prefect deploy --all``, ``prefect worker
start``, flow runs created through the API as the UI's Run button does, MLflow on its own server.

The second test kills the worker with its flow run (SIGKILL to every process of the tree, as a lost
machine would): the zombie automation of ``flows.deploy`` marks the run CRASHED once its heartbeats
stop, and a new run of the deployment reuses the cached data stages and resumes training from the
newest checkpoint. Every process is stopped at the end, by process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import REPO, wait_until

from maskdiff.ops.servers import ServerProcess, prefect_env, start_mlflow, start_prefect

POOL = "maskdiff-process"
HEARTBEAT_S = 30  # Prefect's least heartbeat period
ZOMBIE_WITHIN_S = 40  # CRASHED 10-45 s after the kill (the trigger service looks every 5 s)
KILLED_STEPS = 300  # the killed run's schedule (steps)
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of ``proc`` and of each descendant (a flow run gets its own)."""
    groups = {proc.pid}
    for pid in descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    proc.wait(30)


class Stack:
    """The servers, the client's environment, and the workers started so far."""

    def __init__(self, tmp: Path, prefect: ServerProcess, mlflow: ServerProcess) -> None:
        self.tmp, self.prefect, self.mlflow = tmp, prefect, mlflow
        self.api = f"{prefect.url}/api"
        self.env = prefect_env(tmp / "client", api_url=self.api)
        self.env.update(
            MASKDIFF_CODE_DIR=str(REPO), PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_S)
        )
        self.http = httpx.Client(timeout=30)
        self.workers: list[ServerProcess] = []

    def prefect_cli(self, *args: str, timeout: float = 120) -> str:
        """``prefect <args>`` (or ``python -m``) from the repository root, as a user types it."""
        cmd = [_bin("prefect"), *args] if args[0] != "-m" else [sys.executable, *args]
        done = subprocess.run(
            cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"{cmd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    def start_worker(self, name: str) -> ServerProcess:
        """``prefect worker start`` with its own home; MLflow's server comes from its env."""
        env = prefect_env(self.tmp / "worker-home", api_url=self.api)
        scratch = self.tmp / f"{name}-tmp"  # a killed worker leaves its flow run's working dir
        scratch.mkdir(exist_ok=True)
        env.update(
            TMPDIR=str(scratch),
            MLFLOW_TRACKING_URI=self.mlflow.url,
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_S),
            PREFECT_LOGGING_LEVEL="INFO",  # the flow runs' logs in the worker's log
        )
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [_bin("prefect"), "worker", "start", "--pool", POOL, "--name", name],
                cwd=self.tmp, env=env, stdout=fh, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        worker = ServerProcess(name, "", proc, log)
        self.workers.append(worker)
        return worker

    def stop_workers(self) -> None:
        """Kill every worker started so far, with its flow runs (one pool: any may take a run)."""
        for worker in self.workers:
            if worker.process.poll() is None:
                kill_tree(worker.process)

    def procs(self) -> list[ServerProcess]:
        return [self.prefect, self.mlflow, *self.workers]

    def wait(
        self, predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5
    ) -> Any:
        """``predicate``'s value once true; fails if a server dies (the workers may be killed).
        Every 0.5 s: a poll of the API is a request the server answers."""
        servers = [self.prefect, self.mlflow]
        return wait_until(predicate, timeout, what, servers, interval, logs=self.procs())

    def run_nightly(self, overrides: list[str]) -> str:
        """A flow run of ``nightly`` with changed parameters, through the API; returns its id."""
        dep = self.http.get(f"{self.api}/deployments/name/maskdiff-pipeline/nightly").json()
        body = {"parameters": {"preset": "smoke", "overrides": overrides}}
        # Prefect on SQLite may answer 503 when the request meets another writer ("database is
        # locked", PrefectHQ/prefect#10188): a user clicks Run again, and so does the test.
        answers = []
        for attempt in range(4):
            resp = self.http.post(f"{self.api}/deployments/{dep['id']}/create_flow_run", json=body)
            answers.append(f"{resp.status_code}: {resp.text[:300]}")
            if resp.status_code == 201:
                return str(resp.json()["id"])
            time.sleep(2.0 * (attempt + 1))
        raise AssertionError("\n".join(answers) + "\n" + self.prefect.log_tail(60))

    def flow_run(self, run_id: str) -> dict[str, Any]:
        return self.http.get(f"{self.api}/flow_runs/{run_id}").json()

    def wait_final(self, run_id: str, timeout: float) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            state = self.flow_run(run_id)["state"]
            return state if state["type"] in FINAL else None

        try:
            return self.wait(final, timeout, f"flow run {run_id} to finish")
        except AssertionError as err:
            last = self.flow_run(run_id)["state"]
            raise AssertionError(f"{err}\nthe run's last state: {last['name']}") from None

    def task_runs(self, parent_run_id: str) -> dict[str, str]:
        """State name of each task run of a flow run and of its subflows, by task run name."""
        flows = self.http.post(
            f"{self.api}/flow_runs/filter",
            json={"flow_runs": {"parent_flow_run_id": {"any_": [parent_run_id]}}},
        ).json()
        ids = [parent_run_id, *(f["id"] for f in flows)]
        runs = self.http.post(
            f"{self.api}/task_runs/filter", json={"flow_runs": {"id": {"any_": ids}}}
        ).json()
        return {r["name"]: r["state"]["name"] for r in runs}

    def mlflow_run(self, flow_run_id: str) -> dict[str, Any]:
        """The one MLflow run tagged with ``flow_run_id``."""
        api = f"{self.mlflow.url}/api/2.0/mlflow"
        answer = self.http.get(
            f"{api}/experiments/get-by-name", params={"experiment_name": "maskdiff"}
        ).json()
        assert "experiment" in answer, f"no maskdiff experiment on the MLflow server: {answer}"
        exp = answer["experiment"]
        found = self.http.post(
            f"{api}/runs/search",
            json={
                "experiment_ids": [exp["experiment_id"]],
                "filter": f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
            },
        ).json()["runs"]
        assert len(found) == 1, found
        return found[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Both servers, the pool, both deployments (``prefect deploy --all``) and the zombie
    automation, set up as docs/team-setup.md says."""
    tmp = tmp_path_factory.mktemp("workpool")
    started: list[ServerProcess] = []
    made: Stack | None = None
    try:
        started.append(start_prefect(tmp / "prefect"))
        started.append(start_mlflow(tmp / "mlflow"))
        for server in started:
            server.wait_ready(180)
        made = Stack(tmp, *started)
        made.prefect_cli("work-pool", "create", POOL, "--type", "process")
        made.prefect_cli("--no-prompt", "deploy", "--all")
        made.prefect_cli("-m", "flows.deploy", "zombies", "--within", str(ZOMBIE_WITHIN_S))
        yield made
    finally:
        if made:
            made.stop_workers()
        for server in reversed(started):
            server.stop()
        if made:
            made.http.close()


def test_deploy_all_and_a_worker_runs_nightly(stack: Stack) -> None:
    """The deployments on the process pool; a worker completes a run created with changed
    parameters, tracked on the MLflow server the worker's environment names."""
    pool = stack.http.get(f"{stack.api}/work_pools/{POOL}").json()
    assert pool["type"] == "process"
    for name in ("nightly", "data", "sweep"):
        dep = stack.http.get(f"{stack.api}/deployments/name/maskdiff-pipeline/{name}").json()
        assert dep["work_pool_name"] == POOL, dep
        assert dep["entrypoint"] == "flows/pipeline.py:pipeline"
        step = dep["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
        assert step["directory"] == str(REPO)
    # the sweep's form: the grid, a list of key=v1,v2 strings, with an example filled in
    sweep = stack.http.get(f"{stack.api}/deployments/name/maskdiff-pipeline/sweep").json()
    assert sweep["parameters"]["grid"] == ["train.lr=0.0003,0.001"]
    grid = sweep["parameter_openapi_schema"]["properties"]["grid"]
    assert {"items": {"type": "string"}, "type": "array"} in grid["anyOf"]

    stack.stop_workers()
    stack.start_worker("worker-a")
    root = stack.tmp / "runs-a"
    run_id = stack.run_nightly([f"data.root={root}", "tracking.system_metrics=false",
                                "train.max_steps=10"])  # fmt: skip
    state = stack.wait_final(run_id, 600)
    assert state["type"] == "COMPLETED", f"{state}\n{stack.workers[0].log_tail(80)}"
    run = stack.flow_run(run_id)
    assert run["work_pool_name"] == POOL and run["parameters"]["overrides"][-1] == (
        "train.max_steps=10"
    )

    ml_run = stack.mlflow_run(run_id)
    assert ml_run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in ml_run["data"]["params"]}
    assert params["train.max_steps"] == "10"
    metrics = {m["key"] for m in ml_run["data"]["metrics"]}
    assert "validation.nelbo.continuous.nats_per_token" in metrics
    assert len(list((root / "pipeline").glob("*/run_summary.json"))) == 1
    stack.stop_workers()


def _newest_checkpoint(root: Path) -> tuple[int, Path | None]:
    """The step and folder of the newest checkpoint of an unfinished MDM training folder, else
    (0, None)."""
    found = [
        (int(ckpt.stem.split("-")[1]), folder)
        for folder in (root / "train").glob("mdm-*")
        if not (folder / "DONE").exists()
        for ckpt in folder.glob("ckpt-*.pt")
    ]
    return max(found, default=(0, None))


def test_killed_worker_run_is_crashed_and_the_next_run_resumes(stack: Stack) -> None:
    """The worker and its flow run SIGKILLed at a training checkpoint: the zombie automation
    marks the run CRASHED; a new run of ``nightly`` with the same parameters reads the data
    stages from the cache and resumes training from the newest checkpoint, in the same folder.
    The data root is the first test's (its stages cached: the killed run starts training sooner)
    when that test ran; the rerun's checks are the same either way."""
    root = stack.tmp / "runs-a"
    # checkpoints every 20 of 300 steps: the kill lands at the first one, polled every 0.1 s,
    # with 280 steps to spare before the end (about 12 ms a step on one idle core: 3 s or more)
    overrides = [f"data.root={root}", "tracking.system_metrics=false", "ar_baseline=false",
                 f"train.max_steps={KILLED_STEPS}", "train.checkpoint_every=20"]  # fmt: skip
    stack.stop_workers()
    worker = stack.start_worker("worker-b")
    first = stack.run_nightly(overrides)
    # files, not the API: every 0.1 s, so that the kill lands early in the training
    stack.wait(lambda: (root / "train").is_dir() and _newest_checkpoint(root)[0] > 0, 240,
               "a training checkpoint", interval=0.1)  # fmt: skip
    kill_tree(worker.process)  # the worker and the flow run it started: a lost machine
    killed_at, folder = _newest_checkpoint(root)
    assert 0 < killed_at < KILLED_STEPS, killed_at
    assert stack.flow_run(first)["state"]["type"] == "RUNNING"
    stages = sorted(p.name for p in (root / "data").iterdir() if not p.name.startswith("."))

    stack.start_worker("worker-c")  # starts while the server notices the silence
    state = stack.wait_final(first, ZOMBIE_WITHIN_S + 45)
    assert state["type"] == "CRASHED", state
    assert "no heartbeat" in state["message"]

    second = stack.run_nightly(overrides)
    state = stack.wait_final(second, 600)
    assert state["type"] == "COMPLETED", f"{state}\n{stack.workers[-1].log_tail(80)}"
    tasks = stack.task_runs(second)
    cached = {name.split("-")[0] for name, state in tasks.items() if state == "Cached"}
    assert {"ingest", "tokenizer"} <= cached, tasks
    assert not [name for name in tasks if name.startswith("tokenize-")], tasks
    assert sorted(p.name for p in (root / "data").iterdir() if not p.name.startswith(".")) == (
        stages
    )
    name = stack.flow_run(second)["name"]
    summaries = list((root / "pipeline").glob(f"*-{name}/run_summary.json"))
    assert len(summaries) == 1, summaries
    mdm = json.loads(summaries[0].read_text())["models"]["mdm"]
    assert mdm["resumed_from"] >= killed_at and mdm["step"] == KILLED_STEPS, mdm
    assert folder is not None and Path(mdm["run_dir"]).resolve() == folder.resolve(), (
        "the rerun must reuse the killed run's folder"
    )
    assert stack.mlflow_run(second)["info"]["status"] == "FINISHED"
