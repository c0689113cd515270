"""The training loop: one entry point for a Prefect task, a notebook and ``torchrun``.

``train(cfg, blocks_dir, out_dir, vocab_size=m, ...)`` trains ``cfg.model`` on the train split of
a blocks stage (and its corruption stage when ``corruption.mode == "precomputed"``), resuming from
the newest checkpoint in ``out_dir``. Per optimizer step k::

    lr_k = lr * (k + 1) / W                                          k < W (warmup)
         = lr * (r + (1 - r) (1 + cos(pi (k - W) / (K - W))) / 2)     cosine, r = min_lr_ratio
    g    = sum_{j < A} grad(loss_j / A)       (DDP averages g over ranks; the global batch is B)
    g   <- g * min(1, clip / ||g||)           AdamW(lr_k, betas, decoupled weight decay on matrices)
    ema <- ema + (1 - decay) (theta - ema)    (the weights the evaluator uses)

Metrics reach ``log_metrics(step, dict)`` on rank 0 every ``train.log_every`` steps (the only host
sync of the loop): loss (mean over the window and the ranks), lr, grad_norm, tokens_per_s (global),
mfu, memory_gb (max over ranks), step_time_s (mean over ranks), and the health of the ranks:
step_time_max_s, work_time_s, work_time_max_s, straggler_ratio (docs/evaluation-sharding.md;
on one process the max equals the mean). The loop knows nothing of MLflow.

Validation curve (:mod:`maskdiff.heldout`): every ``train.eval_every`` steps and at ``max_steps``
the model is scored on a fixed validation subset (``val.nelbo`` or ``val.ar_nll``, nats/token, and
its ``_se``), reported through the same callback. The lowest value so far is kept as ``best.pt``;
``train.patience`` points without a new best end the run for good. ``train.max_minutes`` ends this
call at a checkpoint once its wall time is spent; the learning-rate schedule stays the one fixed
by ``max_steps``, and the next call resumes. Checkpoints carry the curve and the best so far.

Multi-GPU (DDP). One node with N GPUs::

    torchrun --standalone --nproc_per_node N -m maskdiff.train --config default \
        --blocks RUNS/blocks-... --corruptions RUNS/corrupt-... --out RUNS/train-... --vocab-size m

Several nodes: the same command on every node with ``--nnodes K --node_rank i
--rdzv_backend c10d --rdzv_endpoint HOST:29500`` instead of ``--standalone`` (the data folders on
a shared filesystem). ``train.batch_size`` is the global batch: each of the W = K N processes
keeps rows ``b = rank (mod W)`` of every global batch, so the data, t draws and masks do not
depend on W and a run may resume on another world size. Gradients are averaged by DDP, metrics
are all-reduced, rank 0 writes checkpoints. nccl on GPUs, gloo on CPUs. The Prefect ``train``
task starts this command itself when ``runtime.nproc_per_node`` or ``runtime.nnodes`` asks for
more than one process (:mod:`maskdiff.launch`, docs/distributed.md); :func:`main` then prints the
metric lines it streams to MLflow and a last ``{"result": true, ...}`` line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel

from maskdiff import checkpoint as ckpt_io
from maskdiff.checkpoint import TrainState, restore_state, save_state, state_payload
from maskdiff.config import Config, TrainConfig, load_config
from maskdiff.data.loader import Batch, BatchLoader, BlockSource, LoaderSpec, to_device
from maskdiff.data.stage import read_manifest
from maskdiff.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    end_worker,
    naming_hung_ranks,
    shutdown_distributed,
)
from maskdiff.heldout import HeldOut, ValidationScorer
from maskdiff.launch import set_parent_death_signal
from maskdiff.loss import Objective
from maskdiff.meter import WindowMeter
from maskdiff.model import Denoiser, build_model
from maskdiff.runtime import Runtime, resolve_runtime
from maskdiff.schedule import make_schedule
from maskdiff.worker_args import TRAIN_FLAGS
from maskdiff.worker_args import parser as worker_parser

__all__ = ["MetricsCallback", "TrainResult", "learning_rate", "main", "train"]

MetricsCallback = Callable[[int, dict[str, float]], None]
_Meter = WindowMeter  # the name benchmarks/gpu_check.py wraps to time its windows


@dataclass
class TrainResult:
    """What a finished (or already complete) run leaves behind."""

    checkpoint_path: Path
    step: int
    metrics: dict[str, float]
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    resumed_from: int = 0
    curve: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    best: dict[str, float] | None = None  # {"step", "value"} of the lowest validation point
    best_checkpoint: Path | None = None
    stopped: str | None = None  # "patience" or "time" when the run ended before max_steps
    train_seconds: float = 0.0  # this call's wall time in the loop, validation excluded
    eval_seconds: float = 0.0  # this call's validation time

    @property
    def eval_share(self) -> float:
        """Validation time over training time in this call."""
        return self.eval_seconds / self.train_seconds if self.train_seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (the launched entry point's last line); :meth:`from_json` reads it."""
        return {
            "checkpoint": str(self.checkpoint_path),
            "step": self.step,
            "metrics": self.metrics,
            "history": [[s, m] for s, m in self.history],
            "resumed_from": self.resumed_from,
            "curve": [[s, m] for s, m in self.curve],
            "best": self.best,
            "best_checkpoint": None if self.best_checkpoint is None else str(self.best_checkpoint),
            "stopped": self.stopped,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainResult:
        best = data.get("best_checkpoint")
        return cls(
            checkpoint_path=Path(data["checkpoint"]),
            step=int(data["step"]),
            metrics=dict(data["metrics"]),
            history=[(int(s), dict(m)) for s, m in data["history"]],
            resumed_from=int(data["resumed_from"]),
            curve=[(int(s), dict(m)) for s, m in data["curve"]],
            best=data.get("best"),
            best_checkpoint=None if best is None else Path(best),
            stopped=data.get("stopped"),
            train_seconds=float(data["train_seconds"]),
            eval_seconds=float(data["eval_seconds"]),
        )


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` at max_steps, or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    r = cfg.min_lr_ratio
    return cfg.lr * (r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _optimizer(model: Denoiser, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (linear and embedding weights) only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused, foreach=not fused)


def train(
    cfg: Config,
    blocks_dir: str | Path,
    out_dir: str | Path,
    *,
    vocab_size: int,
    corruptions_dir: str | Path | None = None,
    tokenizer_hash: str = "",
    log_metrics: MetricsCallback | None = None,
    resume: bool = True,
    stop_at_step: int | None = None,
    validation_dir: str | Path | None = None,
    log_rank: int = 0,
) -> TrainResult:
    """Train (or resume) the run in ``out_dir``; see the module docstring.

    ``stop_at_step`` ends this call early (with a checkpoint) without changing the schedule, as a
    pre-emption would. ``validation_dir``: the corruption stage whose validation rows score the
    masked model's curve (default ``corruptions_dir``; without either the MDM has no curve).
    ``log_metrics`` is called on the process of global rank ``log_rank`` only.
    Raises :class:`maskdiff.checkpoint.CheckpointError` when ``out_dir`` holds a checkpoint of
    another configuration or tokenizer.
    """
    owns_group = not (torch_dist.is_available() and torch_dist.is_initialized())
    rt = resolve_runtime(cfg.runtime)
    held = None
    if cfg.train.eval_every > 0:
        held = HeldOut.load(cfg, blocks_dir, validation_dir or corruptions_dir, vocab_size)
    try:
        logger = log_metrics if rt.dist.rank == log_rank else None
        return _train(cfg, rt, Path(blocks_dir), Path(out_dir), vocab_size, corruptions_dir,
                      tokenizer_hash, logger, resume, stop_at_step, held)  # fmt: skip
    finally:
        if owns_group:
            shutdown_distributed(rt.dist)


def _train(
    cfg: Config,
    rt: Runtime,
    blocks_dir: Path,
    out_dir: Path,
    vocab_size: int,
    corruptions_dir: str | Path | None,
    tokenizer_hash: str,
    log_metrics: MetricsCallback | None,
    resume: bool,
    stop_at_step: int | None,
    held: HeldOut | None,
) -> TrainResult:
    tc, device = cfg.train, rt.device
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model, vocab_size).to(device)
    ema = {n: p.detach().clone() for n, p in model.named_parameters()} if tc.ema > 0 else None
    state = TrainState(model, _optimizer(model, tc, device), ema)
    fingerprint = ckpt_io.run_fingerprint(cfg, vocab_size, tokenizer_hash)
    if rt.is_main:
        for stale in out_dir.glob(".*.pt.tmp-*"):  # left by a process killed while saving
            stale.unlink(missing_ok=True)
    latest = ckpt_io.latest_checkpoint(out_dir) if resume else None
    if latest is not None:
        restore_state(state, latest, fingerprint, keep_threads=cfg.runtime.num_threads is not None)
    resumed_from = state.step
    stop = min(tc.max_steps, stop_at_step or tc.max_steps)
    if (state.step >= stop or state.stopped) and latest is not None:
        return _result(state, out_dir, latest, [], resumed_from, (0.0, 0.0))
    schedule = make_schedule(cfg.diffusion)
    runner: torch.nn.Module = Objective(model, schedule, cfg.diffusion.t_min)
    if rt.dist.enabled:
        # the model's buffers (rotary tables) are constants built alike on every rank: no
        # broadcast per forward, so the gradient all-reduce is the only collective of a step
        runner = DistributedDataParallel(
            runner, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False
        )
    if tc.compile:
        runner = torch.compile(runner)
    spec = LoaderSpec(
        seq_len=cfg.data.seq_len,
        global_batch=tc.batch_size,
        grad_accum=tc.grad_accum,
        seed=tc.seed,
        shuffle_buffer=tc.shuffle_buffer,
        mode="none" if cfg.model.kind == "ar" else cfg.corruption.mode,
        mask_id=model.mask_id,
        t_min=cfg.diffusion.t_min,
        antithetic=tc.antithetic,
        rank=rt.dist.rank,
        world_size=rt.dist.world_size,
    )
    if spec.mode == "precomputed" and corruptions_dir is None:
        raise ValueError("corruption.mode is 'precomputed': pass the corruption stage folder")
    source = BlockSource(blocks_dir, cfg.data.seq_len, corruptions_dir and Path(corruptions_dir))
    loader = BatchLoader(source, spec, schedule, state.step, pin_memory=device.type == "cuda",
                         background=device.type != "cpu")  # fmt: skip
    try:
        history, seconds = _loop(cfg, rt, state, runner, to_device(iter(loader), device), stop,
                                 out_dir, fingerprint, log_metrics, held)  # fmt: skip
    finally:
        loader.close()
    last = ckpt_io.checkpoint_path(out_dir, state.step)
    return _result(state, out_dir, last, history, resumed_from, seconds)


def _result(
    state: TrainState,
    out_dir: Path,
    last: Path,
    history: list[tuple[int, dict[str, float]]],
    resumed_from: int,
    seconds: tuple[float, float],
) -> TrainResult:
    best = ckpt_io.best_checkpoint_path(out_dir)
    return TrainResult(
        checkpoint_path=last,
        step=state.step,
        metrics=state.metrics,
        history=history,
        resumed_from=resumed_from,
        curve=list(state.curve),
        best=state.best,
        best_checkpoint=best if state.best is not None and best.is_file() else None,
        stopped=state.stopped,
        train_seconds=seconds[0],
        eval_seconds=seconds[1],
    )


def _loop(
    cfg: Config,
    rt: Runtime,
    state: TrainState,
    runner: torch.nn.Module,
    batches: Iterator[Batch],
    stop: int,
    out_dir: Path,
    fingerprint: dict,
    log_metrics: MetricsCallback | None,
    held: HeldOut | None,
) -> tuple[list[tuple[int, dict[str, float]]], tuple[float, float]]:
    """Run steps up to ``stop``; returns the metric windows and (loop seconds, of which
    validation)."""
    tc, A = cfg.train, cfg.train.grad_accum
    params = list(state.model.parameters())
    ema_list = list(state.ema.values()) if state.ema is not None else None
    meter = WindowMeter(cfg, rt, state.model.vocab_size)
    scorer = ValidationScorer(cfg, rt, state, held) if held is not None else None
    history: list[tuple[int, dict[str, float]]] = []
    started, eval_seconds = time.perf_counter(), 0.0
    for step in range(state.step, stop):
        lr = learning_rate(step, tc)
        for group in state.opt.param_groups:
            group["lr"] = lr
        began = time.perf_counter()
        batch = next(batches)
        for j in range(A):
            sync = j == A - 1 or not rt.dist.enabled
            with nullcontext() if sync else runner.no_sync():
                with rt.autocast():
                    loss = runner(batch.x0[j], batch.x_t[j], batch.t[j]) / A
                if j == A - 1:  # the all-reduce: this rank's work stops until it returns
                    meter.work += time.perf_counter() - began
                loss.backward()
                if j == A - 1:
                    began = time.perf_counter()
            meter.sums[0] += loss.detach()
        if tc.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip, foreach=True)
        else:
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        meter.sums[1] += gnorm.detach()
        state.opt.step()
        state.opt.zero_grad(set_to_none=True)
        if ema_list is not None:
            torch._foreach_lerp_(ema_list, params, 1.0 - tc.ema)
        meter.work += time.perf_counter() - began
        state.step, meter.steps = step + 1, meter.steps + 1
        if state.step % tc.log_every == 0 or state.step == stop:
            state.metrics = meter.report(lr)
            history.append((state.step, state.metrics))
            if log_metrics is not None:
                log_metrics(state.step, dict(state.metrics))
            if tc.max_minutes is not None and _over_budget(started, tc.max_minutes, rt):
                state.stopped = "time"
        if scorer is not None and (state.step % tc.eval_every == 0 or state.step == tc.max_steps):
            paused = time.perf_counter()
            scorer.point(state, out_dir, fingerprint, log_metrics)
            eval_seconds += time.perf_counter() - paused
            meter.start += time.perf_counter() - paused  # validation is not training time
        if state.step % tc.checkpoint_every == 0 or state.step == stop or state.stopped:
            paused = time.perf_counter()
            if rt.is_main:
                payload = state_payload(state, cfg, fingerprint, tc.batch_size)
                save_state(state, out_dir, payload, tc.keep_checkpoints)
            barrier(rt.dist)
            meter.start += time.perf_counter() - paused  # checkpointing is not training time
        if state.stopped:
            break
    total = time.perf_counter() - started
    return history, (total - eval_seconds, eval_seconds)


def _over_budget(started: float, max_minutes: float, rt: Runtime) -> bool:
    """Whether this call's wall time passed ``max_minutes``, agreed by all ranks (rank 0's
    clock decides)."""
    over = time.perf_counter() - started >= 60.0 * max_minutes
    flag = torch.tensor([float(over and rt.is_main)], device=rt.device)
    return bool(all_reduce_mean(flag, rt.dist).item() > 0)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    return worker_parser(
        "python -m maskdiff.train",
        "Train a masked diffusion (or AR) model; run under torchrun for DDP.",
        TRAIN_FLAGS,
    ).parse_args(argv)


def _agree_on_folder(out: Path, dist: DistInfo) -> tuple[Path, int]:
    """The run folder and the reporting rank, the same on every rank: those of local rank 0 on
    node 0 (``MASKDIFF_NODE_RANK``, set by :mod:`maskdiff.launch`; else global rank 0). With
    c10d the global ranks follow the hosts' names, so node 0 need not hold rank 0; the folder
    must then be on a filesystem every node shares."""
    if not dist.enabled:
        return out, 0
    node = int(os.environ.get("MASKDIFF_NODE_RANK", "0"))
    mine = (node, dist.local_rank, dist.rank, str(out))
    gathered: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, mine)
    _, _, rank, folder = min(gathered)
    return Path(folder), int(rank)


@record
def main(argv: list[str] | None = None) -> int:
    """Command line entry. The reporting process (global rank 0 unless launched on several
    nodes) prints one JSON line per metric window or validation point; local rank 0 of every
    node prints a last line ``{"result": true, ...}`` (:meth:`TrainResult.to_json`)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        set_parent_death_signal()  # a rank dies with its torchrun agent
    args = _parse_args(argv)
    cfg = load_config(args.config, args.set)
    blocks = Path(args.blocks)
    stats = read_manifest(blocks, missing_ok=True).get("stats", {})  # vocab, tokenizer hash
    vocab = args.vocab_size or stats.get("vocab_size")
    if not vocab:
        raise SystemExit(f"--vocab-size not given and {blocks}/manifest.json names none")
    tok_hash = args.tokenizer_hash or str(stats.get("tokenizer_hash", ""))

    def emit(step: int, metrics: dict[str, float]) -> None:
        print(json.dumps({"step": step, **metrics}), flush=True)

    rt = resolve_runtime(cfg.runtime)  # joins the process group under torchrun
    try:
        with naming_hung_ranks(rt.dist, cfg.runtime.collective_timeout):
            out, log_rank = _agree_on_folder(Path(args.out), rt.dist)
            result = train(cfg, blocks, out, vocab_size=int(vocab),
                           corruptions_dir=args.corruptions, tokenizer_hash=tok_hash,
                           log_metrics=emit, resume=not args.no_resume,
                           validation_dir=args.validation, log_rank=log_rank)  # fmt: skip
    finally:
        shutdown_distributed(rt.dist)
    if rt.dist.local_rank == 0:
        line = {"result": True, "out": str(out), "reporter": rt.dist.rank == log_rank}
        print(json.dumps({**line, **result.to_json()}), flush=True)
    return 0


if __name__ == "__main__":
    end_worker(main())
