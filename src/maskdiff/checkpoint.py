"""Checkpoints: atomic, self-describing, loaded with ``weights_only=True``.

A checkpoint ``ckpt-{step:08d}.pt`` in the run folder is a plain dict of tensors and primitives::

    format        "maskdiff-checkpoint"      version        FORMAT_VERSION
    config        the whole Config as JSON   fingerprint    the keys a resume must match (flat,
    vocab_size    m                                         tokenizer_hash among them)
    step          optimizer steps done       rows_consumed  step x global batch (blocks read)
    model         state dict (float32)       ema            the EMA weights' state dict, or None
    optimizer     AdamW state dict           rng            {"torch": ByteTensor, "cuda": [...]}
    metrics       the last logged metrics    num_threads    CPU intra-op threads (reused on resume)

It is written to a hidden temporary file in the same folder, flushed to disk and renamed over the
final name, so a crash leaves either the previous checkpoint or the new one, never half of one.
The data position is the step alone: the loader's order is a function of (seed, step).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maskdiff.config import Config
from maskdiff.data.stage import read_manifest
from maskdiff.model import Denoiser, build_model

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "TrainState",
    "best_checkpoint_path",
    "check_compatible",
    "checkpoint_path",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model",
    "prune_checkpoints",
    "restore_state",
    "run_fingerprint",
    "run_settings",
    "save_checkpoint",
    "save_state",
    "signals_deferred",
    "state_payload",
    "training_identity",
]

FORMAT = "maskdiff-checkpoint"
FORMAT_VERSION = 1
# Keys of the training config that may change between a run and its resumption.
_FREE_TRAIN_KEYS = {
    "max_steps",
    "log_every",
    "checkpoint_every",
    "compile",
    "keep_checkpoints",
    "eval_every",
    "patience",
    "max_minutes",
}


class CheckpointError(ValueError):
    """A file that is not a maskdiff checkpoint, or one from another run configuration."""


def checkpoint_path(out_dir: str | os.PathLike[str], step: int) -> Path:
    return Path(out_dir) / f"ckpt-{step:08d}.pt"


def best_checkpoint_path(out_dir: str | os.PathLike[str]) -> Path:
    """``best.pt``: the checkpoint with the lowest validation value so far (kept beside the
    newest ones, never pruned, never resumed from)."""
    return Path(out_dir) / "best.pt"


def latest_checkpoint(out_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint with the highest step in ``out_dir``, or None."""
    found = sorted(Path(out_dir).glob("ckpt-*.pt")) if Path(out_dir).is_dir() else []
    return found[-1] if found else None


def prune_checkpoints(out_dir: str | os.PathLike[str], keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints."""
    for old in sorted(Path(out_dir).glob("ckpt-*.pt"))[:-keep]:
        old.unlink(missing_ok=True)


def run_settings(cfg: Config) -> dict[str, Any]:
    """The settings a training run's weights depend on, flat: model, diffusion, the training
    recipe (all of it but ``train.max_minutes``: a run stopped by its time budget is resumed by
    the next call whatever budget that call has), block length, corruption mode and seed.

    The one source of a run's identity: :func:`run_fingerprint` (what a checkpoint must match to
    be resumed) and :func:`training_identity` (the run folder's key) are both cut from it, so a
    training setting cannot enter one and miss the other.
    """
    keep = {
        k: v
        for k, v in cfg.flat().items()
        if k.startswith(("model.", "diffusion.", "train.")) and k != "train.max_minutes"
    }
    keep.update(
        {
            "data.seq_len": cfg.data.seq_len,
            "corruption.mode": cfg.corruption.mode,
            "corruption.seed": cfg.corruption.seed,
        }
    )
    return {k: list(v) if isinstance(v, tuple) else v for k, v in keep.items()}


def run_fingerprint(cfg: Config, vocab_size: int, tokenizer_hash: str) -> dict[str, Any]:
    """What must be equal for a checkpoint to continue this run: :func:`run_settings` less the
    keys a resumed run may change (its length, logging, evaluation, ``diffusion.T``), plus the
    vocabulary and the tokenizer."""
    free = {f"train.{k}" for k in _FREE_TRAIN_KEYS} | {"diffusion.T"}
    keep = {k: v for k, v in run_settings(cfg).items() if k not in free}
    return {**keep, "vocab_size": vocab_size, "tokenizer_hash": tokenizer_hash}


def training_identity(
    cfg: Config, blocks: str, corruptions: str | None, validation: str | None = None
) -> dict[str, Any]:
    """The key of a training run's folder: :func:`run_settings` and the content hashes of the
    data stages it reads (the blocks' hash covers the tokenizer and vocabulary). The validation
    stage enters only when it is not the corruptions stage (it then shapes the curve)."""
    identity: dict[str, Any] = {
        "settings": run_settings(cfg),
        "blocks": read_manifest(blocks)["content_hash"],
        "corruptions": read_manifest(corruptions)["content_hash"] if corruptions else None,
    }
    if validation is not None and validation != corruptions:
        identity["validation"] = read_manifest(validation)["content_hash"]
    return identity


def check_compatible(ckpt: dict[str, Any], expected: dict[str, Any], path: Path) -> None:
    """Raise :class:`CheckpointError` naming every key where the checkpoint's run differs."""
    stored = ckpt["fingerprint"]
    diffs = [
        f"{k}: checkpoint {stored.get(k, '<absent>')!r} vs config {expected.get(k, '<absent>')!r}"
        for k in sorted(set(stored) | set(expected))
        if stored.get(k) != expected.get(k)
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} belongs to another run configuration ({'; '.join(diffs)}); "
            "use another output folder or restore the original settings"
        )


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block take effect when it ends.

    A Python signal handler that raises while ``torch.save`` is writing runs inside torch's
    write callback, and torch turns the interrupt into an unrelated ``RuntimeError``
    ("unexpected pos ..."), so whoever stops the run sees a failure instead of an interrupt.
    Holding the signal until the checkpoint is on disk keeps the interrupt an interrupt and
    the newest checkpoint whole. Only the main thread can set handlers; elsewhere, or when a
    handler was installed outside Python, nothing is deferred.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not None:
            previous[sig] = signal.signal(sig, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):  # each once, in the order they came
            signal.raise_signal(sig)


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` (plus format and version) atomically: temporary file, fsync, rename.

    A SIGINT or SIGTERM during the write takes effect once the file is in place
    (:func:`signals_deferred`).
    """
    with signals_deferred():
        return _write_atomically(Path(path), state)


def _write_atomically(path: Path, state: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save({"format": FORMAT, "version": FORMAT_VERSION, **state}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; a clear error for anything else."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:  # torch's text suggests weights_only=False: not here
        text = str(exc)
        reason = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0]
        raise CheckpointError(
            f"{path} is not a readable maskdiff checkpoint: not a file of tensors and plain "
            f"values ({reason.split('. Please')[0]}); refused: checkpoints load with "
            "weights_only=True, which never runs code from the file"
        ) from exc
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} is not a readable maskdiff checkpoint (truncated or another format: {first})"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a maskdiff checkpoint (no '{FORMAT}' header)")
    if ckpt.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {ckpt.get('version')}, "
            f"this code reads version {FORMAT_VERSION}"
        )
    return ckpt


def load_model(
    path: str | os.PathLike[str], use_ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[Denoiser, Config]:
    """The model stored in a checkpoint (EMA weights when present and asked), in eval mode."""
    return model_from_checkpoint(load_checkpoint(path), use_ema, device)


def model_from_checkpoint(
    ckpt: dict[str, Any], use_ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[Denoiser, Config]:
    """:func:`load_model` on a checkpoint already read with :func:`load_checkpoint`."""
    cfg = Config.model_validate(json.loads(ckpt["config"]))
    model = build_model(cfg.model, int(ckpt["vocab_size"]))
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    model.load_state_dict(weights)
    return model.to(device).eval(), cfg


# ----------------------------------------------------------------------------- training state


@dataclass
class TrainState:
    """The mutable training state that a checkpoint captures."""

    model: Denoiser
    opt: torch.optim.AdamW
    ema: dict[str, torch.Tensor] | None
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    best: dict[str, float] | None = None
    bad_evals: int = 0  # validation points since the best
    stopped: str | None = None


def state_payload(state: TrainState, cfg: Config, fingerprint: dict, rows_per_step: int) -> dict:
    cuda = [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {
        "config": cfg.model_dump_json(),
        "fingerprint": fingerprint,
        "vocab_size": state.model.vocab_size,
        "step": state.step,
        "rows_consumed": state.step * rows_per_step,
        "model": state.model.state_dict(),
        "ema": state.ema,
        "optimizer": state.opt.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "cuda": cuda},
        "num_threads": torch.get_num_threads(),
        "metrics": dict(state.metrics),
        "validation": {
            "curve": [[s, dict(v)] for s, v in state.curve],
            "best": state.best,
            "bad_evals": state.bad_evals,
        },
        # only patience is final: a run stopped by its time budget resumes on the next call
        "stopped": state.stopped if state.stopped == "patience" else None,
    }


def restore_state(state: TrainState, path: Path, fingerprint: dict, keep_threads: bool) -> None:
    """Load the checkpoint into ``state``. Unless threads were configured, the CPU thread count
    of the checkpointed run is taken over too: float reductions depend on it, and a resumed run
    must repeat the uninterrupted one exactly."""
    ckpt = load_checkpoint(path)
    check_compatible(ckpt, fingerprint, path)
    if not keep_threads and ckpt.get("num_threads"):
        torch.set_num_threads(int(ckpt["num_threads"]))
    state.model.load_state_dict(ckpt["model"])
    state.opt.load_state_dict(ckpt["optimizer"])
    if state.ema is not None and ckpt.get("ema") is not None:
        for name, tensor in state.ema.items():
            tensor.copy_(ckpt["ema"][name])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if torch.cuda.is_available() and ckpt["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    state.step, state.metrics = int(ckpt["step"]), dict(ckpt.get("metrics", {}))
    val = ckpt.get("validation") or {}
    state.curve = [(int(s), dict(v)) for s, v in val.get("curve", [])]
    state.best, state.bad_evals = val.get("best"), int(val.get("bad_evals", 0))
    state.stopped = ckpt.get("stopped")


def save_state(state: TrainState, out_dir: Path, payload: dict, keep: int) -> Path:
    path = save_checkpoint(checkpoint_path(out_dir, state.step), payload)
    prune_checkpoints(out_dir, keep)
    return path
