"""The process group for data-parallel training under ``torchrun`` (DDP).

``torchrun --nproc_per_node N`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` in each process; :func:`init_distributed` reads them and joins the group (nccl on
cuda, gloo on cpu). A single process (no ``WORLD_SIZE`` or 1) runs without a group: every helper
here is then the identity, so the loop is written once.

A rank that waits longer than ``runtime.collective_timeout`` in a collective fails. Under
:func:`naming_hung_ranks` it first holds a roll call in the job's rendezvous store (which lives
outside the process group, so it still answers when the group is stuck): every rank that timed
out answers, and the ranks that never answer are named in the error as the hung ones.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

__all__ = [
    "CollectiveTimeoutError",
    "DistInfo",
    "all_gather_rows",
    "all_reduce_mean",
    "barrier",
    "combine_disjoint",
    "end_worker",
    "init_distributed",
    "naming_hung_ranks",
    "shard_batches",
    "shutdown_distributed",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


class CollectiveTimeoutError(RuntimeError):
    """A collective waited past ``runtime.collective_timeout``; ``hung``: the ranks that never
    answered the roll call (empty when every rank answered, or the store did not)."""

    def __init__(self, message: str, hung: list[int]) -> None:
        super().__init__(message)
        self.hung = hung


def init_distributed(device: torch.device, timeout: float | None = None) -> DistInfo:
    """Join the process group described by the environment (or none for one process);
    ``timeout``: seconds a collective may wait (``runtime.collective_timeout``; None: torch's
    default)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict = {"device_id": device} if device.type == "cuda" else {}
        if timeout is not None:
            kwargs["timeout"] = timedelta(seconds=timeout)
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a tensor over the ranks (in place); the identity for one process."""
    if info.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world_size
    return values


def shard_batches(n_items: int, batch_size: int, info: DistInfo) -> range:
    """The start offsets of the batches this rank evaluates: a contiguous run of whole batches.

    The batches are those one process would form (``range(0, n_items, batch_size)``); rank r of
    W takes batches ``[k r / W, k (r + 1) / W)`` of the k. Whole batches keep every forward pass
    identical to the one-process run, so each item's value is bit for bit the same.
    """
    starts = range(0, n_items, batch_size)
    k = len(starts)
    return starts[k * info.rank // info.world_size : k * (info.rank + 1) // info.world_size]


def _on_backend(values: torch.Tensor) -> torch.Tensor:
    """The tensor on the device the group's backend needs (nccl: the current CUDA device)."""
    if dist.get_backend() == "nccl":
        return values.to(torch.device("cuda", torch.cuda.current_device()))
    return values


def combine_disjoint(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Every rank's entries in one tensor (in place), when each rank filled only its own entries
    and left the others at zero.

    The sum over ranks adds exact zeros to each entry, so the result equals the tensor one
    process would have filled, bit for bit (NaN and inf included). The identity for one process.
    """
    if info.enabled:
        buf = _on_backend(values)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        if buf is not values:
            values.copy_(buf)
    return values


def all_gather_rows(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """(W, *values.shape): every rank's tensor, rank order; ``values[None]`` for one process."""
    if not info.enabled:
        return values[None]
    buf = _on_backend(values)
    parts = [torch.empty_like(buf) for _ in range(info.world_size)]
    dist.all_gather(parts, buf)
    return torch.stack(parts).to(values.device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def end_worker(code: int) -> NoReturn:
    """End this process with ``code``; a torchrun worker skips the interpreter's teardown.

    A gloo rank that has finished cleanly (``destroy_process_group`` called, its result line
    printed) can still die of SIGABRT on the way out: "terminate called without an active
    exception" with no Python frame left, in 3 of 210 two-rank launches on a loaded 2-core
    machine (torch 2.13, CPU; ``benchmarks/bench_exits.py``). The message is C++'s for a thread
    still running when it is destroyed: the process group's native side racing the teardown at
    exit. torchrun then reports the whole job as failed. Here the exit handlers registered with
    :mod:`atexit` run as usual (logging's flush, torch's compile-worker shutdown, a user's own),
    the streams are flushed, and the process leaves with ``os._exit``: no object finalization
    and no native destructor, so there is nothing to race (0 of 210 launches). Outside torchrun
    this is ``sys.exit(code)``.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        sys.exit(code)
    atexit._run_exitfuncs()  # what sys.exit would run before the teardown, in the same order
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _roll_call(info: DistInfo, wait: float) -> list[int] | None:
    """The ranks that do not answer within ``wait`` s, through the rendezvous store at
    ``MASTER_ADDR:MASTER_PORT`` (torchrun's agent store); None when that store does not answer.
    Every rank that calls this answers for itself first."""
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              is_master=False, timeout=timedelta(seconds=max(wait, 1.0)),
                              wait_for_workers=False)  # fmt: skip
        run = os.environ.get("TORCHELASTIC_RUN_ID", "job")
        key = f"maskdiff/{run}/roll-call/{{}}".format
        store.set(key(info.rank), "here")
        deadline = time.monotonic() + wait
        while True:
            missing = [r for r in range(info.world_size) if not store.check([key(r)])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)
    except (KeyError, ValueError, RuntimeError):
        return None


@contextlib.contextmanager
def naming_hung_ranks(info: DistInfo, timeout: float) -> Iterator[None]:
    """Turn a collective's timeout inside the block into :class:`CollectiveTimeoutError` naming the
    ranks that never reached it. The ranks that time out wait up to ``min(max(timeout / 4, 2),
    30)`` s for each other's answer (they time out at about the same moment); a hung rank does
    not answer. Any other error passes through unchanged."""
    try:
        yield
    except RuntimeError as exc:
        if not info.enabled or "timed out" not in str(exc).lower():
            raise
        hung = _roll_call(info, min(max(timeout / 4, 2.0), 30.0))
        if hung:
            who = f"rank(s) {', '.join(map(str, hung))} never reached it (hung or gone)"
        else:
            who = "every rank answered afterwards (a slow rank, not a hung one)"
            who = who if hung == [] else "the rendezvous store did not answer"
        raise CollectiveTimeoutError(
            f"rank {info.rank}: a collective waited more than runtime.collective_timeout="
            f"{timeout:g} s; {who}",
            hung or [],
        ) from exc
