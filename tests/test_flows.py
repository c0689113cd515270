"""The flows on the session's Prefect server (``prefect_harness`` in conftest.py: a real
temporary API server and SQLite database), with MLflow on a SQLite store: the whole pipeline
twice on the smoke preset; a stage task waiting on another process's lock."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from helpers import check_markov_scores, code_env, smoke_config, task_run_states
from mlflow import MlflowClient

from maskdiff.ops.servers import MLFLOW_UI_QUERY


@pytest.fixture(scope="module")
def two_runs(prefect_harness, tmp_path_factory):
    """Run the pipeline twice with one config; return both summaries and the store URI."""
    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("pipeline")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = smoke_config(
        root, f"tracking.tracking_uri={uri}", "tracking.system_metrics=false", "train.eval_every=10"
    )
    first = pipeline(config=cfg)
    second = pipeline(config=cfg)
    return first, second, uri, root


def test_pipeline_summary_and_files(two_runs) -> None:
    first, _, _, root = two_runs
    summary = json.loads(Path(first["summary_path"]).read_text())
    assert set(summary["stages"]) >= {"documents", "tokenizer", "blocks", "corruptions"}
    for name in ("documents", "tokenizer", "blocks", "corruptions"):
        assert (Path(summary["stages"][name]) / "manifest.json").is_file()
    # the markov corpus has a known entropy: no bound (nor the AR NLL) may go below it
    scores = summary["evaluation"]["scores"]["validation"]
    documents, blocks = Path(summary["stages"]["documents"]), Path(summary["stages"]["blocks"])
    rows = check_markov_scores(documents, blocks, {**scores["mdm"], **scores["ar"]})
    assert set(rows) == {"nelbo.continuous", "nelbo.T4", "nelbo.T16", "ar"}
    assert "MDM (bound ≤)" in scores["table"] and "AR (exact)" in scores["table"]
    assert set(summary["models"]) == {"mdm", "ar"}
    assert summary["models"]["mdm"]["step"] == 20
    assert Path(summary["models"]["mdm"]["checkpoint"]).is_file()
    for kind, name in (("mdm", "val.nelbo"), ("ar", "val.ar_nll")):
        model = summary["models"][kind]
        assert set(model["validation"]) == {name, f"{name}_se"}
        assert model["best"]["step"] in (10, 20) and model["stopped"] is None
        assert 0 < model["eval_share"] < 1 and model["eval_seconds"] > 0
        curve = json.loads((Path(model["run_dir"]) / "curve.json").read_text())
        assert [s for s, _ in curve] == [10, 20]
        assert model["best"]["value"] == min(m[name] for _, m in curve)
    report = (Path(summary["run_dir"]) / "report.md").read_text()
    assert report.startswith("# maskdiff run")
    assert "## Both models" in report and "## Where the time went" in report
    assert "masked diffusion (bound ≤)" in report and "autoregressive (exact)" in report
    # held-out infilling: the known text around the gap is the original's, only the gap differs
    infill = summary["evaluation"]["samples"]["infill"]
    assert len(infill) == 3 and "## Infilling held-out text (ancestral, 8 steps)" in report
    for example in infill:
        model_left, _, model_rest = example["filled"].partition("[[")
        orig_left, _, orig_rest = example["original"].partition("[[")
        assert model_left == orig_left and model_rest.split("]]")[1] == orig_rest.split("]]")[1]
        assert example["template"].startswith(orig_left + "[MASK:8]")  # L = 32: a quarter
        assert f"model:    {example['filled']}" in report
    # the sampler frontier, judged by the chain itself: every sampler at 8, 32 and L = 32 steps
    rows = summary["evaluation"]["samples"]["frontier"]["rows"]
    assert {(r["sampler"], r["steps"]) for r in rows} == {
        (s, t) for s in ("ancestral", "confidence", "remask") for t in (8, 32)
    }
    assert all(r["quality"]["judge"].startswith("exact") for r in rows)
    assert "## Samplers: quality against network calls" in report
    assert "| model | confidence | 32 | 32 |" in report
    assert summary["mlflow_run_id"] and summary["prefect_flow_run_id"]
    assert summary["mlflow_run_url"].endswith(f"/runs/{summary['mlflow_run_id']}{MLFLOW_UI_QUERY}")
    assert Path(root / "mlartifacts").is_dir()


def test_mlflow_run_contents(two_runs) -> None:
    first, _, uri, _ = two_runs
    client = MlflowClient(uri)
    run = client.get_run(first["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "20"
    assert run.data.tags["prefect.flow_run_id"] == first["prefect_flow_run_id"]
    assert len(run.data.tags["mlflow.source.git.commit"]) in (40, 7)  # sha or "unknown"
    metrics = run.data.metrics
    for key in (
        "validation.nelbo.continuous.nats_per_token",
        "validation.nelbo.continuous.perplexity",
        "validation.nelbo.continuous.bits_per_byte",
        "validation.nelbo.T16.nats_per_token",
        "validation.ar.perplexity",
        "samples.distinct_1",
    ):
        assert key in metrics, key
    history = client.get_metric_history(run.info.run_id, "train.loss")
    assert [m.step for m in history] == [5, 10, 15, 20]
    for name in ("val.nelbo", "val.nelbo_se", "val.ar_nll", "val.ar_nll_se"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [10, 20]
    inputs = {d.dataset.name for d in run.inputs.dataset_inputs}
    assert inputs == {"documents", "tokenizer", "blocks", "corruptions"}
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "manifests", "plots", "samples", "report.md", "tokenizer"} <= paths
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/infill.txt", "samples/frontier.md", "samples/samples.json"} <= samples
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/training_curves.png" in plots and "plots/validation_nelbo_vs_T.png" in plots


def test_model_registered_and_champion_kept_on_tie(two_runs) -> None:
    first, second, uri, _ = two_runs
    assert first["registry"]["version"] == "1" and first["registry"]["champion"] is True
    # same config and seed on CPU: the same number, which does not *beat* the champion
    assert second["registry"]["version"] == "2" and second["registry"]["champion"] is False
    assert second["registry"]["value"] == pytest.approx(first["registry"]["value"], rel=1e-9)
    client = MlflowClient(uri)
    assert str(client.get_model_version_by_alias("maskdiff-denoiser", "champion").version) == "1"


def test_registered_model_loads_and_samples(two_runs) -> None:
    import mlflow.pyfunc
    import pandas as pd

    _, _, uri, _ = two_runs
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/maskdiff-denoiser@champion")
    out = model.predict(pd.DataFrame({"prefix": ["", "#'"]}), params={"steps": 4, "seed": 1})
    assert list(out.columns) == ["text", "marked", "gaps"] and len(out) == 2
    assert all(isinstance(t, str) and t for t in out["text"]) and out["text"][1].startswith("#'")
    assert "[MASK]" not in "".join(out["text"])
    filled = model.predict(pd.DataFrame({"template": ["#[MASK:3]#"]}))
    assert filled["marked"][0] == f"#[[{filled['gaps'][0][0]}]]#"


def test_second_run_reuses_data_and_trains_anew(two_runs) -> None:
    first, second, _, _ = two_runs
    names = ("documents", "tokenizer", "blocks", "corruptions")
    assert [first["stages"][n] for n in names] == [second["stages"][n] for n in names]
    assert first["models"]["mdm"]["run_dir"] != second["models"]["mdm"]["run_dir"]
    assert second["models"]["mdm"]["resumed_from"] == 0

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    flow_run_id = second["prefect_flow_run_id"]
    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id={"any_": [flow_run_id]})
        )
    states = task_run_states([flow_run_id] + [str(f.id) for f in subflows])
    cached = {name for name, state in states.items() if state == "Cached"}
    assert any(n.startswith("ingest") for n in cached), states
    # blocks and corruptions: the library finds the finished stages, no shard task runs
    assert not any(n.startswith(("tokenize-", "corrupt-")) for n in states), states
    assert not any(n.startswith("train") for n in cached), states


def test_prefect_artifacts(two_runs) -> None:
    """The artifacts of this module's two runs (the session's Prefect server holds other
    modules' runs too)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        FlowRunFilter,
    )

    pipelines = [run["prefect_flow_run_id"] for run in two_runs[:2]]

    async def read(key: str):
        async with get_client() as client:
            subflows = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id={"any_": pipelines})
            )
            ids = [*pipelines, *(f.id for f in subflows)]
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=ids)
                )
            )

    report = asyncio.run(read("maskdiff-report"))
    assert report and "Evaluation: validation" in report[0].data
    link = asyncio.run(read("mlflow-run"))
    assert link and "/#/experiments/" in link[0].data
    table = asyncio.run(read("maskdiff-metrics"))
    assert table and "nelbo.continuous.nats_per_token" in table[0].data
    validation = asyncio.run(read("validation-blocks"))
    assert validation and "passed" in validation[0].data


def test_cli_samples_from_the_registry_and_from_a_checkpoint(two_runs, monkeypatch, capsys) -> None:
    from flows.cli import main

    first, _, uri, _ = two_runs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = "models:/maskdiff-denoiser@champion"
    assert main(["sample", "--model", model, "--n", "2", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("-" * 40) == 2 and "[MASK]" not in out
    ckpt, tok = first["models"]["mdm"]["checkpoint"], first["stages"]["tokenizer"]
    assert main(["sample", "--model", ckpt, "--tokenizer", tok, "--n", "1", "--steps", "4"]) == 0
    assert capsys.readouterr().out.count("-" * 40) == 1


def test_prepare_data_on_a_process_pool(prefect_harness, tmp_path) -> None:
    """Tokenization shards mapped over a ProcessPoolTaskRunner give the same blocks stage as the
    default thread pool."""
    from flows.pipeline import prepare_data, task_runner

    def build(root: Path, runner: str) -> dict:
        cfg = smoke_config(root, f"runtime.task_runner={runner}", "data.shard_rows=16")
        assert type(task_runner(cfg.runtime)).__name__.lower().startswith(runner)
        stages = prepare_data.with_options(task_runner=task_runner(cfg.runtime))(cfg)
        return json.loads((Path(stages["blocks"]) / "manifest.json").read_text())

    by_process = build(tmp_path / "process", "process")
    by_thread = build(tmp_path / "thread", "thread")
    assert by_process["content_hash"] == by_thread["content_hash"]
    assert by_process["stats"]["splits"]["train"]["blocks"] > 0


# A stage task under the data tasks' cache policy whose body waits for a file: the process that
# runs it first holds the stage's lock for as long as the test wants.
GATED_STAGE = """
import os, time
from pathlib import Path
from prefect import flow, task
from tasks.caching import data_cache_policy

@task(cache_policy=data_cache_policy(), persist_result=True)
def gated_stage(root: str) -> str:
    with open(Path(root) / "built-by", "a") as out:
        out.write(f"{os.getpid()}\\n")
    while not (Path(root) / "go").exists():
        time.sleep(0.05)
    return "built"

@flow
def gated(root: str) -> str:
    return gated_stage(root)

if __name__ == "__main__":
    import sys
    print(gated(sys.argv[1]), flush=True)
"""


def test_a_run_waiting_on_a_stage_lock_says_so_in_its_task_logs(prefect_harness, tmp_path) -> None:
    """A second run of a stage that another process is building waits for its lock; the wait
    shows in the waiting task run's logs (the Prefect UI) while it waits, naming the holder's
    process and host, and the stage is built once."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterLevel, LogFilterTimestamp
    from prefect.logging.handlers import APILogHandler

    from tasks.caching import root_generation

    module = tmp_path / "gated_stage.py"
    module.write_text(GATED_STAGE, encoding="utf-8")
    root = tmp_path / "root"
    root_generation(root)
    env = code_env()
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
    env["PREFECT_API_URL"] = prefect_harness  # else it would start a temporary server of its own
    started = datetime.now(timezone.utc)
    recent = LogFilter(level=LogFilterLevel(ge_=30), timestamp=LogFilterTimestamp(after_=started))

    def warnings_since_start() -> list:
        async def read() -> list:
            await APILogHandler.aflush()
            async with get_client() as client:
                return await client.read_logs(recent)

        return asyncio.run(read())

    command = [sys.executable, str(module), str(root)]
    holder = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)  # fmt: skip
    expected = f"waiting for process {holder.pid} on {socket.gethostname()}: it holds the lock"
    state: list = []
    try:
        deadline = time.monotonic() + 90
        while not (root / "built-by").exists():  # the holder is in the stage, lock held
            assert holder.poll() is None and time.monotonic() < deadline, holder.stdout.read()
            time.sleep(0.1)
        spec = importlib.util.spec_from_file_location("gated_stage", module)
        gated_stage = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gated_stage)
        waiter = threading.Thread(
            target=lambda: state.append(gated_stage.gated(str(root), return_state=True))
        )
        waiter.start()
        deadline = time.monotonic() + 60
        while not (said := [x for x in warnings_since_start() if expected in x.message]):
            assert time.monotonic() < deadline, "the waiting run said nothing in 60 s"
            time.sleep(0.5)
        assert waiter.is_alive()  # it said so while waiting
        (root / "go").touch()
        waiter.join(90)
        assert holder.wait(90) == 0, holder.stdout.read()
    finally:
        (root / "go").touch()
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait(10)
    assert state and state[0].is_completed() and state[0].result() == "built"
    assert (root / "built-by").read_text().split() == [str(holder.pid)]  # built once
    assert len(said) == 1  # said once, in the waiting task run
    assert said[0].flow_run_id == state[0].state_details.flow_run_id
    assert said[0].task_run_id is not None
