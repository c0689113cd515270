"""MLflow tracking against a real SQLite store (and one real server): batching, datasets,
artifacts, champion alias, the experiment's kind, the server without job runners."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from maskdiff.config import TrackingConfig
from maskdiff.evaluate import EvalResult, NelboEstimate
from maskdiff.ops import plots
from maskdiff.ops.registry import promote_if_better
from maskdiff.ops.runs import DONE, claim_run_folder
from maskdiff.ops.servers import ServerProcess, mlflow_experiment_url
from maskdiff.ops.tracking import RunTracker, flatten_numbers, resolve_tracking_uri


@pytest.fixture
def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_uri_resolution(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(TrackingConfig(), tmp_path / "root")
    assert uri == f"sqlite:///{(tmp_path / 'root' / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(TrackingConfig(), tmp_path) == "http://127.0.0.1:1"
    explicit = TrackingConfig(tracking_uri="sqlite:////x.db")
    assert resolve_tracking_uri(explicit, tmp_path) == "sqlite:////x.db"


def _estimate(T: int, nats: float) -> NelboEstimate:
    import torch

    return NelboEstimate(T=T, nats_per_token=nats, se=0.01, n_tokens=64, n_bytes=64, n_blocks=1,
                         rows_per_block=1.0, curve_t=[0.0, 1.0], curve=[nats],
                         per_block=torch.zeros(1), blocks=torch.zeros(1))  # fmt: skip


def test_figures_drawn_and_logged_from_threads_at_once(store, tmp_path) -> None:
    """A sweep on the thread task runner draws and logs its points' figures side by side.
    Matplotlib is not thread-safe: without the lock ``plots.DRAWING`` this failed in 7 of 8
    threads (a ``ParseException`` laying out a log axis's ``$10^{1}$`` tick label), and once in
    the suite (tests/test_sweep.py)."""
    tracker = RunTracker.start(TrackingConfig(experiment="t-threads", system_metrics=False), store,
                               "run", artifact_root=tmp_path / "art")  # fmt: skip
    failures: list[BaseException] = []

    def draw(k: int) -> None:
        try:
            for i in range(3):  # T grids of their own: each thread lays out new tick labels
                Ts = [2 + k + i, 50 + 7 * k + 3 * i]
                rows = [_estimate(0, 2.0), *(_estimate(T, 2 + 1 / T) for T in Ts)]
                result = EvalResult("validation", "linear", 0, rows)
                tracker.log_figure(plots.nelbo_vs_T(result, 1.5), f"plots/{k}-{i}.png")
        except BaseException as exc:  # reported below, with the others' failures
            failures.append(exc)

    threads = [threading.Thread(target=draw, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    tracker.end()
    assert not failures, failures[:2]
    logged = MlflowClient(store).list_artifacts(tracker.run_id, "plots")
    assert {a.path for a in logged if a.file_size} == {
        f"plots/{k}-{i}.png" for k in range(8) for i in range(3)
    }


def test_batched_metrics_params_inputs_artifacts(store, tmp_path) -> None:
    cfg = TrackingConfig(experiment="t-batch", system_metrics=False)
    tracker = RunTracker.start(cfg, store, "run", {"k": "v"}, artifact_root=tmp_path / "art")
    tracker.flush_every = 10_000
    tracker.log_params({"train.lr": 0.001, "diffusion.T": [10, 100]})
    for step in range(2500):
        tracker.log_metrics(step, {"loss": 1.0 / (step + 1), "lr": 0.1}, prefix="train.")
    assert len(tracker._pending) == 5000  # nothing sent yet: one batch call per 1000 later
    tracker.log_dataset("blocks", "f" * 64, str(tmp_path), context="training")
    (tmp_path / "m.json").write_text("{}")
    tracker.log_artifact(tmp_path / "m.json", "manifests")
    tracker.log_dict({"a": 1}, "config/config.json")
    tracker.end()

    client = MlflowClient(store)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.001", "diffusion.T": "[10, 100]"}
    assert run.data.tags["k"] == "v"
    history = client.get_metric_history(tracker.run_id, "train.loss")
    assert len(history) == 2500
    assert history[-1].value == pytest.approx(1 / 2500)
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["blocks"]
    names = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert names == {"manifests", "config"}
    assert (tmp_path / "art").is_dir()  # artifacts land under the given root, not ./mlruns
    assert tracker.history("train.loss")[0] == (0, 1.0)


def test_champion_moves_only_on_improvement(store) -> None:
    client = MlflowClient(store)
    client.create_registered_model("m")
    exp = client.create_experiment("t-champ")
    versions = []
    for bpb in (1.5, 1.7, 1.2):
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "validation.bits_per_byte", bpb)
        versions.append(client.create_model_version("m", "file:///nowhere", run.info.run_id))
    assert promote_if_better(client, "m", versions[0].version, "validation.bits_per_byte", 1.5) == (
        True,
        None,
    )
    promoted, previous = promote_if_better(
        client, "m", versions[1].version, "validation.bits_per_byte", 1.7
    )
    assert (promoted, previous) == (False, 1.5)
    assert client.get_model_version_by_alias("m", "champion").version == versions[0].version
    promoted, _ = promote_if_better(
        client, "m", versions[2].version, "validation.bits_per_byte", 1.2
    )
    assert promoted
    assert client.get_model_version_by_alias("m", "champion").version == versions[2].version
    nan_try = promote_if_better(client, "m", versions[1].version, "x", float("nan"))
    assert nan_try[0] is False


def test_flatten_numbers() -> None:
    out = flatten_numbers("validation.", {"nelbo": 1.5, "T": {"10": 2.0}, "note": "x", "ok": True})
    assert out == {"validation.nelbo": 1.5, "validation.T.10": 2.0}


def test_run_folders_resume_unfinished_and_skip_done_or_locked(tmp_path) -> None:
    ident = {"model": 1}
    first = claim_run_folder(tmp_path, "mdm", ident)
    assert not first.resumed
    (first.path / "ckpt").write_text("x")
    # a second claimant while the first holds the lock gets a fresh folder
    second = claim_run_folder(tmp_path, "mdm", ident)
    assert second.path != first.path
    second.release()
    first.release()
    # the unfinished first folder is resumed by the next run
    again = claim_run_folder(tmp_path, "mdm", ident)
    assert again.path == first.path and again.resumed
    again.mark_done({"step": 10})
    again.release()
    assert (first.path / DONE).exists()
    # a finished folder is not reused: the next run trains anew
    fresh = claim_run_folder(tmp_path, "mdm", ident)
    assert fresh.path not in (first.path,) and not (fresh.path / DONE).exists()
    fresh.release()
    other = claim_run_folder(tmp_path, "mdm", {"model": 2})
    assert other.path.name.split("-")[1] != first.path.name.split("-")[1]
    other.release()
    assert Path(tmp_path / "train").is_dir()


def test_experiments_open_as_model_training(store) -> None:
    """A new experiment is tagged as model training; a found one without the tag (or with a
    kind the UI only inferred) gets it; a kind someone chose stays."""
    cfg = TrackingConfig(experiment="t-kind", system_metrics=False)
    tracker = RunTracker.start(cfg, store, "run")
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("t-kind")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert tracker.experiment_url("http://127.0.0.1:5000") == (
        f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}"
        "?workflowType=machine_learning"
    )
    for name, before, after in [
        ("t-old", None, "custom_model_development"),
        ("t-inferred", "genai_development_inferred", "custom_model_development"),
        ("t-chosen", "genai_development", "genai_development"),
    ]:
        tags = {} if before is None else {"mlflow.experimentKind": before}
        client.create_experiment(name, tags=tags)
        RunTracker.start(TrackingConfig(experiment=name, system_metrics=False), store, "run")
        assert client.get_experiment_by_name(name).tags.get("mlflow.experimentKind") == after


def _process_group(leader: int) -> list[str]:
    """Command lines of every live process in the process group ``leader``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == leader:
                out.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ProcessLookupError):
            continue
    return out


def test_the_mlflow_server_starts_no_job_runner(mlflow_server: ServerProcess) -> None:
    """`maskdiff ui`'s MLflow server (``start_mlflow``, the session's): the server and its web
    worker, no GenAI job runner or huey consumers (MLflow 3 starts eight of them, about 2 GB,
    unless job execution is off); and the UI link of the experiment opens on its runs."""
    server = mlflow_server
    time.sleep(3)  # the job runner, when on, starts beside the web worker
    group = _process_group(server.process.pid)
    assert len(group) >= 2, group  # `mlflow server` and its uvicorn worker
    assert not [cmd for cmd in group if "huey" in cmd or "_job_runner" in cmd], group
    assert mlflow_experiment_url(server.url, "t-ui") is None
    cfg = TrackingConfig(experiment="t-ui", system_metrics=False)
    RunTracker.start(cfg, server.url, "run")
    experiment = MlflowClient(server.url).get_experiment_by_name("t-ui")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert mlflow_experiment_url(server.url, "t-ui") == (
        f"{server.url}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"
    )


def test_report_rounds_sample_statistics_as_the_evaluation_table() -> None:
    from maskdiff.config import Config
    from tasks.report import _report_markdown

    stats = {
        "samples.n": 2,
        "samples.unigram_entropy_nats": 2.0794415416798357,
        "samples.distinct_1": 0.123456789012345,
        "samples.gen_ppl": 123.45678901234567,
        "samples.gen_ppl_label": "AR baseline",
        "samples.gen_ppl_tokens": 0,
    }
    summary = {"evaluation": {"samples": {"texts": ["abc"], "stats": stats}}}
    markdown = _report_markdown(Config(), summary)
    for row in (
        "| samples.n | 2 |",
        "| samples.unigram_entropy_nats | 2.0794 |",
        "| samples.distinct_1 | 0.1235 |",
        "| samples.gen_ppl | 123.457 |",
        "| samples.gen_ppl_label | AR baseline |",
    ):
        assert row in markdown, markdown
