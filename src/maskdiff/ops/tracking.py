"""MLflow runs, behind one small interface (the logged model and the registry:
:mod:`maskdiff.ops.registry`).

A pipeline run is **one MLflow run**. Stages are told apart by metric prefixes
(``train.loss``, ``ar_train.loss``, ``validation.nelbo``...), not by nested runs: one run holds the
whole story (config, data digests, curves, samples, model), so comparing two nightly runs in the
MLflow UI is a single "compare" of two rows.

Step metrics are buffered and sent with ``log_batch`` (up to 1000 values a call), never one HTTP
call per value: the training loop only sees ``log_metrics(step, dict)``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from maskdiff.config import TrackingConfig
from maskdiff.ops.servers import MLFLOW_UI_QUERY
from maskdiff.ops.store_templates import keep_template, seed_from_template, template_path

__all__ = ["RunTracker", "flatten_numbers", "opening_store", "resolve_tracking_uri"]

log = logging.getLogger(__name__)
# MLflow 3 opens an experiment on its GenAI overview (traces, token usage) unless the experiment
# says it trains models: the tag its UI itself writes when a user picks "Machine learning".
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
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


@contextmanager
def opening_store(tracking_uri: str) -> Iterator[None]:
    """Hold an ``fcntl`` lock beside a SQLite store while it is opened the first time.

    Two runs starting at once on a new ``mlflow.db`` would otherwise both create its tables and
    both create the experiment (one fails). A new store starts as a copy of the MLflow template
    when there is one; without one, it is created here and kept as the template
    (:mod:`maskdiff.ops.store_templates`). Other stores (a tracking server) need no lock.
    """
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(f".{db.name}.lock"), "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            if not db.exists() and not seed_from_template(db, "mlflow"):
                template = template_path("mlflow")
                if template is not None and not template.exists():
                    MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
                    keep_template(db, "mlflow")  # tables and Default experiment only, so far
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class RunTracker:
    """One MLflow run: params, batched step metrics, dataset inputs, artifacts, tags."""

    def __init__(
        self, client: MlflowClient, run_id: str, tracking_uri: str, flush_every: int = 500
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
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
        with opening_store(tracking_uri):  # MLflow creates tables and experiment on first use
            client = MlflowClient(tracking_uri=tracking_uri)
            experiment = client.get_experiment_by_name(cfg.experiment)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:
                location = None
                if artifact_root is not None and not tracking_uri.startswith(("http:", "https:")):
                    location = Path(artifact_root).resolve().as_uri()
                try:
                    experiment_id = client.create_experiment(
                        cfg.experiment, artifact_location=location, tags=EXPERIMENT_KIND
                    )
                except MlflowException:  # another run (on a tracking server) created it first
                    existing = client.get_experiment_by_name(cfg.experiment)
                    if existing is None:
                        raise
                    experiment_id = existing.experiment_id
            if experiment is not None:  # made before the tag existed, or switched in the UI
                _mark_model_training(client, experiment)
        run = client.create_run(experiment_id, run_name=run_name, tags=tags or {})
        tracker = cls(client, run.info.run_id, tracking_uri)
        if cfg.system_metrics:
            tracker._start_system_metrics(tracking_uri)
        return tracker

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> RunTracker:
        """Continue logging into an existing run (another task or process)."""
        return cls(MlflowClient(tracking_uri=tracking_uri), run_id, tracking_uri)

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
        try:
            self.client.log_inputs(self.run_id, datasets=[entity])
        except MlflowException as err:
            # Two runs logging one dataset at once race the SQL store's look-up-then-insert
            # (PostgreSQL: UniqueViolation on "dataset_pk"); the loser's retry finds the row.
            if "dataset_pk" not in str(err):
                raise
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
        """Log a matplotlib figure as ``artifact_file`` (``plots/x.png``: the format from its
        suffix). It is rendered under :data:`maskdiff.ops.plots.DRAWING` (matplotlib is not
        thread-safe) and sent after, so an upload to a tracking server holds no other thread."""
        from maskdiff.ops.plots import DRAWING  # matplotlib only where figures are drawn

        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="maskdiff-figure-") as tmp:
            local = Path(tmp) / name
            with DRAWING:
                figure.savefig(local)
            self.client.log_artifact(self.run_id, str(local), folder or None)

    def ui_url(self, ui_base: str) -> str:
        """Link to this run in the MLflow UI (the tracking server's own when it is one)."""
        base = self.tracking_uri if self.tracking_uri.startswith("http") else ui_base
        experiment = self.client.get_run(self.run_id).info.experiment_id
        return f"{base.rstrip('/')}/#/experiments/{experiment}/runs/{self.run_id}{MLFLOW_UI_QUERY}"

    def experiment_url(self, ui_base: str) -> str:
        """Link to this run's experiment, opening on its runs and charts."""
        base = self.tracking_uri if self.tracking_uri.startswith("http") else ui_base
        experiment = self.client.get_run(self.run_id).info.experiment_id
        return f"{base.rstrip('/')}/#/experiments/{experiment}{MLFLOW_UI_QUERY}"


def _mark_model_training(client: MlflowClient, experiment: Any) -> None:
    """Tag an existing experiment as model training, unless someone chose its kind (a value the
    UI inferred, ``*_inferred`` or ``no_inferred_type``, is no choice)."""
    key, value = next(iter(EXPERIMENT_KIND.items()))
    current = experiment.tags.get(key)
    if current is None or current.endswith("_inferred") or current == "no_inferred_type":
        client.set_experiment_tag(experiment.experiment_id, key, value)


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)
    return text[:_PARAM_MAX]


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
