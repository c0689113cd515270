"""A job of two nodes through the pipeline: two flow runs (``runtime.nnodes=2``, node ranks 0
and 1, one process each) meet at a c10d rendezvous on 127.0.0.1 and train one model; the job is
evaluated, logged to MLflow and reported once, by node 0, even when node 1 is asked for
``stage=all`` too. The session's Prefect server; MLflow on a SQLite file."""

from __future__ import annotations

import threading
from pathlib import Path

from helpers import CPU, smoke_config, task_run_states
from mlflow import MlflowClient
from mlflow.entities import ViewType
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from maskdiff.ops.servers import free_port


def test_two_nodes_evaluate_and_log_once_for_the_job(prefect_harness: str, tmp_path: Path):
    from flows.pipeline import pipeline

    root = tmp_path / "runs"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    endpoint = f"127.0.0.1:{free_port()}"
    states: dict[int, object] = {}
    errors: list[BaseException] = []

    def node(rank: int) -> None:
        cfg = smoke_config(root, *CPU, f"tracking.tracking_uri={uri}", "ar_baseline=false",
                           "tracking.system_metrics=false", "train.max_steps=6",
                           "train.log_every=2", "sample.n_samples=1", "runtime.nnodes=2",
                           "runtime.nproc_per_node=1", f"runtime.node_rank={rank}",
                           f"runtime.rdzv_endpoint={endpoint}")  # fmt: skip
        try:
            states[rank] = pipeline(config=cfg, stage="all", return_state=True)
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=400)
    assert not errors and not any(t.is_alive() for t in threads), errors
    summaries = {r: s.result() for r, s in states.items()}  # type: ignore[attr-defined]
    lead, other = summaries[0], summaries[1]

    # one model: node 1's ranks trained in node 0's folder
    assert lead["models"]["mdm"]["run_dir"] == other["models"]["mdm"]["run_dir"]
    assert other["models"]["mdm"]["node_rank"] == 1 and lead["models"]["mdm"]["step"] == 6
    # evaluated, registered and tracked by node 0 only
    assert "evaluation" in lead and "registry" in lead and "mlflow_run_id" in lead
    assert not {"evaluation", "registry", "mlflow_run_id", "mlflow_run_url"} & set(other)
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments(ViewType.ALL)]
    runs = client.search_runs(experiments, run_view_type=ViewType.ALL)
    assert [r.info.run_id for r in runs] == [lead["mlflow_run_id"]]
    run_id = lead["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "train.loss")] == [2, 4, 6]
    history = client.get_metric_history(run_id, "validation.nelbo.continuous.nats_per_token")
    assert len(history) == 1  # one evaluation logged
    assert [a.path for a in client.list_artifacts(run_id, "evaluation")].count(
        "evaluation/validation.json"
    ) == 1
    # and in Prefect: the evaluate subflow ran once for the job, the train subflow on each node
    flow_runs = [str(s.state_details.flow_run_id) for s in states.values()]  # type: ignore[attr-defined]
    task_run_states(flow_runs)  # every task run has its final state in the API
    with get_client(sync_client=True) as api:
        names = [t.name for t in api.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=flow_runs)))]  # fmt: skip
    assert sum(n.startswith("evaluate") for n in names) == 1, names
    assert sum(n.startswith("train-") for n in names) == 2, names
