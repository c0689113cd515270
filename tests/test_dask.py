"""The data stages on the Dask task runner (``runtime.task_runner: dask``, the ``dask`` extra).

One module-scoped build: the smoke data stages through ``prepare_data`` on a local Dask cluster of
2 worker processes started for the run, on the thread runner, and a second time on an existing
scheduler (``runtime.dask_address``). Every stage must come out byte-identical, and the second
run must reuse them without tokenizing or corrupting anything. Also: the corruption stage built
in one process equals the one built by a task per shard, and a missing extra is a config error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from helpers import smoke_config, task_run_states

from maskdiff.config import Config, ConfigError
from maskdiff.data.contracts import MANIFEST
from maskdiff.data.corrupt import build_corruptions
from maskdiff.data.stage import read_manifest

STAGES = ("documents", "tokenizer", "blocks", "corruptions")


def smoke(root: Path, runner: str, *extra: str) -> Config:
    """The smoke preset with 20-block shards (training groups of 32 straddle them), 2 workers."""
    return smoke_config(root, f"runtime.task_runner={runner}", "runtime.max_workers=2",
                        "data.shard_rows=20", "corruption.train_epochs=2", *extra)  # fmt: skip


def run_data(cfg: Config) -> tuple[dict, dict[str, str]]:
    """``prepare_data`` on the config's task runner: (stage folders, task run name -> state)."""
    from flows.pipeline import prepare_data, task_runner

    state = prepare_data.with_options(task_runner=task_runner(cfg.runtime))(cfg, return_state=True)
    stages = state.result()
    return stages, task_run_states([str(state.state_details.flow_run_id)])


def files(folder: str | Path) -> dict[str, bytes]:
    """Every file of a stage folder but its manifest (which holds times), by name."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.name != MANIFEST}


@pytest.fixture(scope="module")
def runs(prefect_harness, tmp_path_factory):
    from distributed import LocalCluster

    root = tmp_path_factory.mktemp("dask")
    dask_first = run_data(smoke(root / "dask", "dask"))
    thread = run_data(smoke(root / "thread", "thread"))
    # the second run: a scheduler that exists already, given by its address
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster:
        before = cluster.scheduler.transition_counter
        address = f"runtime.dask_address={cluster.scheduler_address}"
        dask_second = run_data(smoke(root / "dask", "dask", address))
        transitions = cluster.scheduler.transition_counter - before
    return {"first": dask_first, "thread": thread, "second": dask_second, "remote": transitions}


def test_dask_runner_publishes_the_thread_runner_stages(runs) -> None:
    (dask, dask_states), (thread, _) = runs["first"], runs["thread"]
    for name in STAGES:
        assert Path(dask[name]).name == Path(thread[name]).name, name  # same key
        assert (
            read_manifest(dask[name])["content_hash"] == read_manifest(thread[name])["content_hash"]
        ), name
        assert files(dask[name]) == files(thread[name]), name
    # one task per corruption shard ran on the cluster's workers and reported to this API
    shards = [n for n in files(dask["corruptions"]) if n.endswith(".parquet")]
    corrupt_runs = {n: s for n, s in dask_states.items() if n.startswith("corrupt-")}
    assert len(shards) > 4 and len(corrupt_runs) == len(shards), (shards, dask_states)
    assert set(corrupt_runs.values()) == {"Completed"}, corrupt_runs
    assert any(n.startswith("tokenize-") for n in dask_states), dask_states


def test_second_run_on_an_existing_scheduler_reuses_every_stage(runs) -> None:
    (first, _), (second, states) = runs["first"], runs["second"]
    for name in STAGES:
        assert second[name] == first[name], name
    recomputed = [n for n in states if n.startswith(("tokenize-", "corrupt-"))]
    assert not recomputed, states
    cached = {n for n, state in states.items() if state == "Cached"}
    assert any(n.startswith("ingest") for n in cached), states
    assert any(n.startswith("tokenizer") for n in cached), states
    assert {n for n in states if n.startswith("validate-")} == {f"validate-{s}" for s in STAGES}
    assert runs["remote"] > 0  # the validations ran on the scheduler named by dask_address


def test_one_process_builds_the_corruption_stage_of_the_shard_tasks(runs, tmp_path) -> None:
    """The corruptions built in this process, one shard after the other (the former single
    ``corrupt`` task), equal those of the task per shard: every file's bytes and the stats."""
    dask, _ = runs["first"]
    cfg = smoke(tmp_path, "thread")
    alone = build_corruptions(cfg.corruption, cfg.diffusion, dask["blocks"], tmp_path)
    assert alone.path.name == Path(dask["corruptions"]).name
    assert files(alone.path) == files(dask["corruptions"])
    mapped = read_manifest(dask["corruptions"])
    assert alone.content_hash == mapped["content_hash"]
    assert alone.manifest["stats"]["splits"] == mapped["stats"]["splits"]
    assert alone.manifest["stats"]["validated"] == mapped["stats"]["validated"]


def test_dask_runner_settings() -> None:
    from flows.runners import local_cluster, task_runner

    local = task_runner(smoke(Path("unused"), "dask", "runtime.max_workers=3").runtime)
    assert type(local).__name__ == "DaskTaskRunner" and local.address is None
    assert local.cluster_class is local_cluster
    kwargs = local.cluster_kwargs
    assert (kwargs["n_workers"], kwargs["threads_per_worker"], kwargs["processes"]) == (3, 1, True)
    remote = task_runner(smoke(Path("unused"), "dask", "runtime.dask_address=tcp://h:8786").runtime)
    assert remote.address == "tcp://h:8786" and not remote.cluster_kwargs


def test_local_workers_get_the_flow_runs_api_url(prefect_harness, monkeypatch) -> None:
    """Worker processes inherit the environment, not the flow's Prefect settings: the local
    cluster puts the API URL the flow run talks to in their environment (without it, on a
    temporary server, each worker would start one of its own), and the worker settings."""
    from prefect import flow, task
    from prefect.settings import PREFECT_API_URL

    from flows.runners import task_runner

    @task
    def probe(_: int) -> tuple[int, str | None, str]:
        return os.getpid(), os.environ.get("PREFECT_API_URL"), os.environ["TOKENIZERS_PARALLELISM"]

    @flow
    def probes() -> list:
        return [future.result() for future in probe.map(range(2))]

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # what the workers would inherit
    runner = task_runner(smoke(Path("unused"), "dask", "runtime.max_workers=1").runtime)
    (pid, url, tokenizers), _ = probes.with_options(task_runner=runner)()
    assert pid != os.getpid() and tokenizers == "false"
    assert url == PREFECT_API_URL.value().rstrip("/") and url.startswith("http://")


def test_missing_extra_is_a_config_error_naming_it(prefect_harness, monkeypatch, tmp_path) -> None:
    """With ``prefect_dask`` not importable (``None`` in ``sys.modules`` makes the import system
    raise ImportError, as for an absent package), the runner is refused with the extra's name,
    and the pipeline stops before it opens a tracking run."""
    from flows.cli import one_line
    from flows.pipeline import pipeline, task_runner

    monkeypatch.setitem(sys.modules, "prefect_dask", None)
    cfg = smoke(tmp_path, "dask", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ConfigError) as info:
        task_runner(cfg.runtime)
    message = one_line(info.value)
    assert "runtime.task_runner=dask" in message and "pip install -e '.[dask]'" in message
    assert message.startswith("maskdiff: config error:")
    with pytest.raises(ConfigError):
        pipeline(config=cfg)
    assert not (tmp_path / "mlflow.db").exists()
