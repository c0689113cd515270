"""Training and evaluation jobs as the Prefect tasks run them: in this process for one device, or
under torchrun (:mod:`maskdiff.launch`) for several; what a training job returns and the records
it leaves in its run folder.

The caller claims the run folder (``maskdiff.ops.runs``, which the core does not import) and
passes in its path and its ``mark_done``. A failed launch is logged (the failing rank's error
tail) and raises :class:`maskdiff.launch.LaunchError`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

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

__all__ = ["TrainJob", "score"]

Logger = logging.Logger | logging.LoggerAdapter


def _write_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _run(command: list[str], logger: Logger, **kwargs: Any) -> dict[str, Any]:
    """:func:`run_training`, its failure logged before it propagates."""
    try:
        return run_training(command, **kwargs)
    except LaunchError as exc:
        logger.error("%s", exc)
        raise


@dataclass(frozen=True)
class TrainJob:
    """One training run of ``kind`` ("mdm" or "ar") on a blocks stage: what it reads, its folder's
    key (``identity``) and how it launches (``spec``)."""

    cfg: Config  # model.kind set to kind
    kind: str
    blocks: str
    corruptions: str | None  # what the MDM trains on in ``precomputed`` mode
    validation: str | None  # what the MDM's validation curve scores
    vocab_size: int
    tokenizer_hash: str
    identity: dict[str, Any]
    spec: LaunchSpec

    @classmethod
    def plan(cls, cfg: Config, kind: str, blocks: str, corruptions: str | None) -> TrainJob:
        """``corruptions``: the corruption stage; the MDM trains on it in ``precomputed`` mode
        and its validation curve scores its validation rows in either mode."""
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"kind": kind})})
        stats = read_manifest(blocks)["stats"]
        corr = corruptions if (kind == "mdm" and cfg.corruption.mode == "precomputed") else None
        val = corruptions if (kind == "mdm" and cfg.train.eval_every > 0) else None
        identity = training_identity(cfg, blocks, corr, val)
        spec = LaunchSpec.from_runtime(cfg.runtime, f"maskdiff-{kind}-{config_hash(identity)}")
        return cls(cfg, kind, blocks, corr, val, int(stats["vocab_size"]),
                   str(stats["tokenizer_hash"]), identity, spec)  # fmt: skip

    def run(
        self, folder: Path, log_metrics: train_lib.MetricsCallback, logger: Logger
    ) -> tuple[train_lib.TrainResult, Path]:
        """Train into ``folder``, in this process or under torchrun (metrics stream through
        ``log_metrics`` while the ranks run). Returns the result and the folder the weights are
        in (under torchrun, the one node 0's ranks agreed on)."""
        if self.spec.in_process:
            result = train_lib.train(self.cfg, self.blocks, folder, vocab_size=self.vocab_size,
                                     corruptions_dir=self.corruptions,
                                     tokenizer_hash=self.tokenizer_hash, log_metrics=log_metrics,
                                     validation_dir=self.validation)  # fmt: skip
            return result, folder
        line = self._launch(folder, log_metrics, logger)
        return train_lib.TrainResult.from_json(line), Path(line["out"])

    def _launch(
        self, folder: Path, log_metrics: train_lib.MetricsCallback, logger: Logger
    ) -> dict[str, Any]:
        """``torchrun -m maskdiff.train`` on this node; rank 0's result line."""
        spec = self.spec
        config = folder / f"launch-config-node{spec.node_rank}.yaml"
        _write_config(self.cfg, config)
        args = train_arguments(config, self.blocks, folder, vocab_size=self.vocab_size,
                               tokenizer_hash=self.tokenizer_hash, corruptions=self.corruptions,
                               validation=self.validation)  # fmt: skip
        env = {**os.environ, "MASKDIFF_NODE_RANK": str(spec.node_rank)}

        def started(launcher: Any) -> None:
            logger.info("launched %d process(es) on node %d of %d (torchrun pid %d)",
                        spec.nproc_per_node, spec.node_rank, spec.nnodes,
                        launcher.proc.pid)  # fmt: skip

        command = torchrun_command(spec, args)
        return _run(command, logger, on_metrics=log_metrics, env=env, on_start=started)

    def summary(
        self, result: train_lib.TrainResult, run_dir: Path, seconds: float
    ) -> dict[str, Any]:
        """What the train task returns and ``DONE`` records."""
        best = result.best_checkpoint
        return {
            "kind": self.kind,
            "run_dir": str(run_dir),
            "checkpoint": str(result.checkpoint_path),
            "best_checkpoint": None if best is None else str(best),
            "best": result.best,
            "validation": result.curve[-1][1] if result.curve else None,
            "stopped": result.stopped,
            "step": result.step,
            "max_steps": self.cfg.train.max_steps,
            "resumed_from": result.resumed_from,
            "metrics": result.metrics,
            "seconds": seconds,
            "train_seconds": result.train_seconds,
            "eval_seconds": result.eval_seconds,
            "eval_share": result.eval_share,
        }

    def finish(
        self,
        folder: Path,
        result: train_lib.TrainResult,
        summary: dict[str, Any],
        mark_done: Callable[[dict[str, Any]], None],
        logger: Logger,
    ) -> None:
        """Node 0's records in ``folder``: history.json, curve.json, then ``mark_done(summary)``
        unless ``train.max_minutes`` stopped the run (the next run of its config resumes it)."""
        (folder / "history.json").write_text(json.dumps(result.history))
        (folder / "curve.json").write_text(json.dumps(result.curve))
        kind = self.kind
        if result.curve:
            logger.info(
                "%s validation took %.1f%% of training time (%.1f s of %.1f s)",
                kind, 100 * result.eval_share, result.eval_seconds, result.train_seconds,
            )  # fmt: skip
        if result.stopped == "time":
            logger.warning("%s stopped by train.max_minutes at step %d of %d; the next run "
                           "resumes it", kind, result.step, self.cfg.train.max_steps)  # fmt: skip
        else:
            mark_done(summary)


def score(
    cfg: Config,
    data: dict[str, Any],
    mdm_checkpoint: str,
    ar_checkpoint: str | None,
    logger: Logger,
) -> dict[str, scoring.SplitScores]:
    """:func:`maskdiff.scoring.score` in this process, or sharded over ``runtime.nproc_per_node``
    ranks of this node (torchrun of ``maskdiff.scoring``): the same numbers either way
    (docs/evaluation-sharding.md). A job of several nodes evaluates on each node's own
    processes."""
    nproc = resolve_nproc(cfg.runtime)
    if nproc == 1:
        return scoring.score(
            cfg, data["blocks"], data["corruptions"], mdm_checkpoint, ar_checkpoint
        )
    with tempfile.TemporaryDirectory(prefix="maskdiff-eval-") as tmp:
        config, out = Path(tmp) / "config.yaml", Path(tmp) / "scores.json"
        _write_config(cfg, config)
        args = scoring.score_arguments(
            config, data["blocks"], data["corruptions"], mdm_checkpoint, ar_checkpoint, out
        )
        command = torchrun_command(LaunchSpec(nproc), args, module="maskdiff.scoring")
        line = _run(command, logger, what="evaluation")
        logger.info("evaluated on %d processes (torchrun)", line["world_size"])
        return scoring.scores_from_json(json.loads(out.read_text()))
