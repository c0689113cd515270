"""Thin Prefect tasks for training, evaluation and sampling.

Training is never retried blindly: its folder is keyed by everything the weights depend on, and a
rerun of the flow resumes the unfinished folder from its last checkpoint
(:func:`maskdiff.ops.runs.claim_run_folder`). Metrics go to MLflow through the run tracker, in
batches. The jobs themselves (in process or under torchrun) are :mod:`maskdiff.jobs`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError

from maskdiff import jobs, scoring
from maskdiff.config import Config
from maskdiff.ops import plots
from maskdiff.ops.runs import RunFolder, claim_run_folder
from maskdiff.ops.tracking import RunTracker


def task_logger() -> logging.Logger | logging.LoggerAdapter:
    """The task run's logger, or a plain one when called as ``task.fn()`` outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("maskdiff.tasks")


def _progress(kind: str, total: int, start: int) -> Any:
    """A terminal progress bar when the command line asked for one (``MASKDIFF_PROGRESS=1``)."""
    if os.environ.get("MASKDIFF_PROGRESS") != "1":
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=f"train {kind}", unit="step", leave=True)


def _tracker(tracking: dict[str, str] | None) -> RunTracker | None:
    if not tracking:
        return None
    return RunTracker.attach(tracking["uri"], tracking["run_id"])


class _MetricsLog:
    """The training loop's ``log_metrics``: to MLflow (flushed every 30 s, so the run shows them
    while training runs), to the progress bar, and a log line every ``10 * train.log_every``
    steps. A validation point (``val.*`` metrics) is logged as named."""

    def __init__(
        self, cfg: Config, kind: str, tracker: RunTracker | None, logger: jobs.Logger
    ) -> None:
        self.cfg, self.kind, self.tracker, self.logger = cfg, kind, tracker, logger
        self.prefix = "train." if kind == "mdm" else "ar_train."
        self.bar = _progress(kind, cfg.train.max_steps, 0)
        self.flushed = time.monotonic()

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if any(k.startswith("val.") for k in metrics):
            if self.tracker is not None:
                self.tracker.log_metrics(step, metrics)
            self.logger.info("%s step %d validation %s", self.kind, step,
                             ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))  # fmt: skip
            return
        if self.tracker is not None:
            self.tracker.log_metrics(step, metrics, prefix=self.prefix)
            if time.monotonic() - self.flushed > 30.0:
                self.tracker.flush()
                self.flushed = time.monotonic()
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}")
        if step % (self.cfg.train.log_every * 10) == 0 or step == self.cfg.train.max_steps:
            self._line(step, metrics)

    def _line(self, step: int, metrics: dict[str, float]) -> None:
        nan = float("nan")
        self.logger.info(
            "%s step %d/%d loss %.4f tokens/s %.0f (all ranks) MFU %.1f%% memory %.2f GB "
            "step %.1f ms, slowest rank %.1f ms, straggler ratio %.2f",
            self.kind, step, self.cfg.train.max_steps, metrics.get("loss", nan),
            metrics.get("tokens_per_s", nan), 100 * metrics.get("mfu", nan),
            metrics.get("memory_gb", nan), 1e3 * metrics.get("step_time_s", nan),
            1e3 * metrics.get("step_time_max_s", nan), metrics.get("straggler_ratio", nan),
        )  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def _node_folder(root: Path, kind: str, identity: dict[str, Any]) -> Iterator[RunFolder]:
    """The run folder for a node other than node 0 of a multi-node job: a scratch one. Its ranks
    write into node 0's folder (``maskdiff.train`` agrees on it), so this node claims nothing."""
    with tempfile.TemporaryDirectory(prefix=f"maskdiff-{kind}-node-") as tmp:
        yield RunFolder(Path(tmp), False, open(os.devnull))  # noqa: SIM115 - closed by release


@task(name="train", task_run_name="train-{kind}")
def train(
    cfg: Config,
    kind: str,
    blocks: str,
    corruptions: str | None,
    root: str,
    tracking: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train ``kind`` ("mdm" or "ar") on the blocks stage; resume an unfinished folder.

    ``corruptions``: the corruption stage; the MDM trains on it in ``precomputed`` mode and its
    validation curve scores its validation rows in either mode (:class:`maskdiff.jobs.TrainJob`).
    """
    logger = task_logger()
    tracker = _tracker(tracking)
    started = time.perf_counter()
    job = jobs.TrainJob.plan(cfg, kind, blocks, corruptions)
    node_rank = job.spec.node_rank
    claim = _node_folder if node_rank > 0 else claim_run_folder
    with claim(Path(root), kind, job.identity) as folder:
        if folder.resumed:
            logger.info("resuming %s training in %s", kind, folder.path)
        log_metrics = _MetricsLog(job.cfg, kind, tracker, logger)
        result, run_dir = job.run(folder.path, log_metrics, logger)
        summary = job.summary(result, run_dir, time.perf_counter() - started)
        log_metrics.close()
        if node_rank > 0:  # node 0 keeps the folder's records
            return {**summary, "node_rank": node_rank}
        job.finish(folder.path, result, summary, folder.mark_done, logger)
    if tracker is not None:
        tracker.flush()
    return summary


@task(name="evaluate")
def evaluate(
    cfg: Config,
    data: dict[str, Any],
    mdm_checkpoint: str,
    ar_checkpoint: str | None,
    tracking: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Every NELBO row and the AR comparison on each configured split; logged to MLflow."""
    scores = jobs.score(cfg, data, mdm_checkpoint, ar_checkpoint, task_logger())
    tracker = _tracker(tracking)
    files = scoring.save_scores(cfg, data, mdm_checkpoint, ar_checkpoint, scores)
    out: dict[str, Any] = {}
    for split, sc in scores.items():
        out[split] = {
            "mdm": sc.mdm.to_dict(),
            "ar": None if sc.ar is None else sc.ar.to_dict(),
            "table": sc.table,
            "scores_file": str(files[split]),
        }
        if tracker is not None:  # the per-block terms: `maskdiff compare` pairs runs on them
            tracker.log_artifact(files[split], "evaluation")
        if tracker is not None:
            tracker.log_metrics(cfg.train.max_steps, sc.metrics())
            ar_nats = None if sc.ar is None else sc.ar.nats_per_token
            tracker.log_figure(plots.nelbo_curve(sc.mdm), f"plots/{split}_nelbo_by_t.png")
            tracker.log_figure(plots.nelbo_vs_T(sc.mdm, ar_nats), f"plots/{split}_nelbo_vs_T.png")
            tracker.log_dict(out[split], f"evaluation/{split}.json")
    if tracker is not None:
        tracker.flush()
    return out


@task(name="sample")
def sample(
    cfg: Config,
    data: dict[str, Any],
    mdm_checkpoint: str,
    ar_checkpoint: str | None,
    tracking: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Unconditional samples (and prefix-conditioned ones if ``sample.prefix``), with stats, and
    held-out infills and the sampler frontier (:func:`maskdiff.scoring.showcase`)."""
    result: dict[str, Any] = {"texts": [], "stats": {}}
    if cfg.sample.n_samples > 0:
        out = scoring.sample_checkpoint(
            cfg, data["tokenizer"], mdm_checkpoint, data["blocks"], ar_checkpoint
        )
        result = {"texts": out.texts, "stats": out.stats.to_dict(),
                  "network_calls": out.network_calls}  # fmt: skip
    result |= scoring.showcase(cfg, data, mdm_checkpoint, ar_checkpoint)
    tracker = _tracker(tracking)
    if tracker is not None:
        numbers = {k: float(v) for k, v in result["stats"].items() if isinstance(v, (int, float))}
        tracker.log_metrics(cfg.train.max_steps, numbers)
        tracker.log_metrics(cfg.train.max_steps, result["frontier"].get("metrics", {}))
        tracker.log_text(result["frontier"].get("markdown", ""), "samples/frontier.md")
        tracker.log_text("\n\n---\n\n".join(result["texts"]), "samples/samples.txt")
        tracker.log_text(infill_text(result["infill"]), "samples/infill.txt")
        tracker.log_dict(result, "samples/samples.json")
        tracker.flush()
    return result


def infill_text(examples: list[dict[str, Any]]) -> str:
    """The infill examples as plain text: template, model, original; gaps in [[brackets]]."""
    parts = [f"template:  {e['template']}\nmodel:     {e['filled']}\noriginal:  {e['original']}"
             for e in examples]  # fmt: skip
    return "\n\n---\n\n".join(parts)
