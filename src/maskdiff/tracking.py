"""MLflow, behind one small interface: the only module of the library that imports mlflow.

A pipeline run is **one MLflow run**. Stages are told apart by metric prefixes
(``train.loss``, ``ar_train.loss``, ``validation.nelbo``...), not by nested runs: one run holds the
whole story (config, data digests, curves, samples, model), so comparing two nightly runs in the
MLflow UI is a single "compare" of two rows.

Step metrics are buffered and sent with ``log_batch`` (up to 1000 values a call), never one HTTP
call per value: the training loop only sees ``log_metrics(step, dict)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from maskdiff.config import TrackingConfig

__all__ = ["RunTracker", "champion_metric", "promote_if_better", "resolve_tracking_uri"]

log = logging.getLogger(__name__)
_BATCH = 1000  # MLflow's limit of metrics per log_batch call
_PARAM_BATCH = 100
_PARAM_MAX = 6000  # longest parameter value MLflow stores


def resolve_tracking_uri(cfg: TrackingConfig, root: Path) -> str:
    """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite under the run root.

    Always explicit: MLflow 3 would otherwise create ``mlflow.db`` in whatever folder is current.
    """
    if cfg.tracking_uri:
        return cfg.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


class RunTracker:
    """One MLflow run: params, batched step metrics, dataset inputs, artifacts, tags."""

    def __init__(self, client: MlflowClient, run_id: str, flush_every: int = 500) -> None:
        self.client = client
        self.run_id = run_id
        self.flush_every = flush_every
        self._pending: list[Metric] = []
        self._history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._monitor: Any = None

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def start(
        cls,
        cfg: TrackingConfig,
        tracking_uri: str,
        run_name: str,
        tags: dict[str, str] | None = None,
        artifact_root: Path | None = None,
    ) -> RunTracker:
        """Create the experiment if needed and open a run; starts system metrics if asked.

        ``artifact_root``: where a new experiment keeps artifacts when the store is a local
        database (otherwise MLflow writes ``./mlruns`` in the current folder). A tracking server
        decides for itself.
        """
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = None
            if artifact_root is not None and not tracking_uri.startswith(("http:", "https:")):
                location = Path(artifact_root).resolve().as_uri()
            experiment_id = client.create_experiment(cfg.experiment, artifact_location=location)
        run = client.create_run(experiment_id, run_name=run_name, tags=tags or {})
        tracker = cls(client, run.info.run_id)
        if cfg.system_metrics:
            tracker._start_system_metrics(tracking_uri)
        return tracker

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> RunTracker:
        """Continue logging into an existing run (another task or process)."""
        return cls(MlflowClient(tracking_uri=tracking_uri), run_id)

    def _start_system_metrics(self, tracking_uri: str) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            self._monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=5, tracking_uri=tracking_uri
            )
            self._monitor.start()
        except Exception as exc:  # system metrics are a convenience, never a failure
            log.warning("system metrics are off: %s", exc)
            self._monitor = None

    def end(self, status: str = "FINISHED") -> None:
        """Flush what is buffered, stop system metrics, close the run with ``status``."""
        self.flush()
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self.client.set_terminated(self.run_id, status=status)

    # ------------------------------------------------------------------ values
    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), _PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _PARAM_BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def log_metrics(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        """Buffer ``metrics`` at ``step``; sent in batches. Non-finite values are kept as NaN."""
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            name = f"{prefix}{key}"
            val = float(value)
            self._pending.append(Metric(name, val if math.isfinite(val) else math.nan, now, step))
            self._history[name].append((step, val))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def callback(self, prefix: str) -> Callable[[int, dict[str, float]], None]:
        """The ``log_metrics(step, dict)`` callable a training loop takes."""
        return lambda step, metrics: self.log_metrics(step, metrics, prefix=prefix)

    def flush(self) -> None:
        while self._pending:
            chunk, self._pending = self._pending[:_BATCH], self._pending[_BATCH:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs logged through this tracker, for plots."""
        return list(self._history.get(key, []))

    # ------------------------------------------------------------------ datasets, files
    def log_dataset(self, name: str, digest: str, source: str, context: str) -> None:
        """Record a stage output as a dataset input of the run (name, digest, source)."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource

        dataset = MetaDataset(LocalArtifactDatasetSource(source), name=name, digest=digest[:36])
        tag = InputTag(key="mlflow.data.context", value=context)
        entity = DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[tag])
        self.client.log_inputs(self.run_id, datasets=[entity])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        self.client.log_text(self.run_id, json.dumps(data, indent=2, default=str), artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)
    return text[:_PARAM_MAX]


# ---------------------------------------------------------------------- model registry


def champion_metric(client: MlflowClient, model_name: str, metric: str) -> float | None:
    """``metric`` of the run behind the model version aliased ``champion``; None if no champion."""
    try:
        version = client.get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None
    if not version.run_id:
        return None
    value = client.get_run(version.run_id).data.metrics.get(metric)
    return None if value is None else float(value)


def promote_if_better(
    client: MlflowClient, model_name: str, version: str, metric: str, value: float
) -> tuple[bool, float | None]:
    """Move the ``champion`` alias to ``version`` only if ``value`` (lower is better) beats it.

    Returns (promoted, the previous champion's value or None).
    """
    previous = champion_metric(client, model_name, metric)
    better = math.isfinite(value) and (previous is None or value < previous)
    if better:
        client.set_registered_model_alias(model_name, "champion", version)
    return better, previous


def flatten_numbers(prefix: str, data: dict[str, Any]) -> dict[str, float]:
    """Numeric leaves of a nested dict as ``{prefix + "a.b": value}`` (for metrics)."""
    out: dict[str, float] = {}

    def walk(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{key}.{k}" if key else str(k), v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)

    walk("", data)
    return out
