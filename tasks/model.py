"""Thin Prefect tasks for training, evaluation and sampling.

Training is never retried blindly: its folder is keyed by everything the weights depend on, and a
rerun of the flow resumes the unfinished folder from its last checkpoint
(:func:`maskdiff.ops.runs.claim_run_folder`). Metrics go to MLflow through the run tracker, in
batches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError

from maskdiff import scoring
from maskdiff import train as train_lib
from maskdiff.checkpoint import training_identity
from maskdiff.config import Config
from maskdiff.data.stage import config_hash, read_manifest
from maskdiff.launch import (
    LaunchError,
    LaunchSpec,
    resolve_nproc,
    run_training,
    torchrun_command,
    train_arguments,
)
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


def _with_kind(cfg: Config, kind: str) -> Config:
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"kind": kind})})


@contextlib.contextmanager
def _node_folder(root: Path, kind: str, identity: dict[str, Any]) -> Iterator[RunFolder]:
    """The run folder for a node other than node 0 of a multi-node job: a scratch one. Its ranks
    write into node 0's folder (``maskdiff.train`` agrees on it), so this node claims nothing."""
    with tempfile.TemporaryDirectory(prefix=f"maskdiff-{kind}-node-") as tmp:
        yield RunFolder(Path(tmp), False, open(os.devnull))  # noqa: SIM115 - closed by release


def _launched(
    spec: LaunchSpec,
    cfg: Config,
    folder: Path,
    args: dict[str, Any],
    log_metrics: train_lib.MetricsCallback,
    logger: logging.Logger | logging.LoggerAdapter,
) -> tuple[train_lib.TrainResult, dict[str, Any]]:
    """Train under torchrun (maskdiff.launch): metrics stream through ``log_metrics`` while it
    runs; a failed rank raises :class:`LaunchError` with its error tail."""
    config = folder / f"launch-config-node{spec.node_rank}.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    command = torchrun_command(spec, train_arguments(config, out=folder, **args))
    env = {**os.environ, "MASKDIFF_NODE_RANK": str(spec.node_rank)}

    def started(launcher: Any) -> None:
        logger.info("launched %d process(es) on node %d of %d (torchrun pid %d)",
                    spec.nproc_per_node, spec.node_rank, spec.nnodes,
                    launcher.proc.pid)  # fmt: skip

    try:
        line = run_training(command, log_metrics, env=env, on_start=started)
    except LaunchError as exc:
        logger.error("%s", exc)
        raise
    return train_lib.TrainResult.from_json(line), line


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
    validation curve scores its validation rows in either mode.
    """
    logger = task_logger()
    cfg = _with_kind(cfg, kind)
    stats = read_manifest(blocks)["stats"]
    corr = corruptions if (kind == "mdm" and cfg.corruption.mode == "precomputed") else None
    val = corruptions if (kind == "mdm" and cfg.train.eval_every > 0) else None
    tracker = _tracker(tracking)
    prefix = "train." if kind == "mdm" else "ar_train."

    bar = None
    flushed = [time.monotonic()]

    def log_metrics(step: int, metrics: dict[str, float]) -> None:
        if any(k.startswith("val.") for k in metrics):  # a validation point: val.* as named
            if tracker is not None:
                tracker.log_metrics(step, metrics)
            logger.info("%s step %d validation %s", kind, step,
                        ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))  # fmt: skip
            return
        if tracker is not None:
            tracker.log_metrics(step, metrics, prefix=prefix)
            if time.monotonic() - flushed[0] > 30.0:  # visible in MLflow while training runs
                tracker.flush()
                flushed[0] = time.monotonic()
        if bar is not None:
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}")
        if step % (cfg.train.log_every * 10) == 0 or step == cfg.train.max_steps:
            nan = float("nan")
            logger.info(
                "%s step %d/%d loss %.4f tokens/s %.0f (all ranks) MFU %.1f%% memory %.2f GB "
                "step %.1f ms, slowest rank %.1f ms, straggler ratio %.2f",
                kind, step, cfg.train.max_steps, metrics.get("loss", nan),
                metrics.get("tokens_per_s", nan), 100 * metrics.get("mfu", nan),
                metrics.get("memory_gb", nan), 1e3 * metrics.get("step_time_s", nan),
                1e3 * metrics.get("step_time_max_s", nan), metrics.get("straggler_ratio", nan),
            )  # fmt: skip

    started = time.perf_counter()
    identity = training_identity(cfg, blocks, corr, val)
    spec = LaunchSpec.from_runtime(cfg.runtime, f"maskdiff-{kind}-{config_hash(identity)}")
    claim = _node_folder if spec.node_rank > 0 else claim_run_folder
    with claim(Path(root), kind, identity) as folder:
        if folder.resumed:
            logger.info("resuming %s training in %s", kind, folder.path)
        bar = _progress(kind, cfg.train.max_steps, 0)
        run_dir = folder.path
        if spec.in_process:
            result = train_lib.train(
                cfg,
                blocks,
                folder.path,
                vocab_size=int(stats["vocab_size"]),
                corruptions_dir=corr,
                tokenizer_hash=str(stats["tokenizer_hash"]),
                log_metrics=log_metrics,
                validation_dir=val,
            )
        else:
            args = {"blocks": blocks, "vocab_size": int(stats["vocab_size"]), "corruptions": corr,
                    "tokenizer_hash": str(stats["tokenizer_hash"]), "validation": val}  # fmt: skip
            result, line = _launched(spec, cfg, folder.path, args, log_metrics, logger)
            run_dir = Path(line["out"])
        summary = {
            "kind": kind,
            "run_dir": str(run_dir),
            "checkpoint": str(result.checkpoint_path),
            "best_checkpoint": None
            if result.best_checkpoint is None
            else str(result.best_checkpoint),
            "best": result.best,
            "validation": result.curve[-1][1] if result.curve else None,
            "stopped": result.stopped,
            "step": result.step,
            "max_steps": cfg.train.max_steps,
            "resumed_from": result.resumed_from,
            "metrics": result.metrics,
            "seconds": time.perf_counter() - started,
            "train_seconds": result.train_seconds,
            "eval_seconds": result.eval_seconds,
            "eval_share": result.eval_share,
        }
        if bar is not None:
            bar.close()
        if spec.node_rank > 0:  # node 0 keeps the folder's records
            return {**summary, "node_rank": spec.node_rank}
        (folder.path / "history.json").write_text(json.dumps(result.history))
        (folder.path / "curve.json").write_text(json.dumps(result.curve))
        if result.curve:
            logger.info(
                "%s validation took %.1f%% of training time (%.1f s of %.1f s)",
                kind, 100 * result.eval_share, result.eval_seconds, result.train_seconds,
            )  # fmt: skip
        if result.stopped == "time":
            # not DONE: the next run of this config resumes the folder from this checkpoint
            logger.warning("%s stopped by train.max_minutes at step %d of %d; the next run "
                           "resumes it", kind, result.step, cfg.train.max_steps)  # fmt: skip
        else:
            folder.mark_done(summary)
    if tracker is not None:
        tracker.flush()
    return summary


def _scores(
    cfg: Config,
    data: dict[str, Any],
    mdm_checkpoint: str,
    ar_checkpoint: str | None,
    logger: logging.Logger | logging.LoggerAdapter,
) -> dict[str, scoring.SplitScores]:
    """In this process, or sharded over ``runtime.nproc_per_node`` ranks of this node (torchrun
    of ``maskdiff.scoring``): the same numbers either way (docs/evaluation-sharding.md). A job of
    several nodes evaluates on each node's own processes."""
    nproc = resolve_nproc(cfg.runtime)
    if nproc == 1:
        return scoring.score(
            cfg, data["blocks"], data["corruptions"], mdm_checkpoint, ar_checkpoint
        )
    with tempfile.TemporaryDirectory(prefix="maskdiff-eval-") as tmp:
        config, out = Path(tmp) / "config.yaml", Path(tmp) / "scores.json"
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        args = scoring.score_arguments(
            config, data["blocks"], data["corruptions"], mdm_checkpoint, ar_checkpoint, out
        )
        command = torchrun_command(LaunchSpec(nproc), args, module="maskdiff.scoring")
        try:
            line = run_training(command, what="evaluation")
        except LaunchError as exc:
            logger.error("%s", exc)
            raise
        logger.info("evaluated on %d processes (torchrun)", line["world_size"])
        return scoring.scores_from_json(json.loads(out.read_text()))


@task(name="evaluate")
def evaluate(
    cfg: Config,
    data: dict[str, Any],
    mdm_checkpoint: str,
    ar_checkpoint: str | None,
    tracking: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Every NELBO row and the AR comparison on each configured split; logged to MLflow."""
    scores = _scores(cfg, data, mdm_checkpoint, ar_checkpoint, task_logger())
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
