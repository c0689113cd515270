"""Where and how the computation runs: device, precision, threads, seeds, process group, peak FLOPs.

Everything that depends on the machine is resolved here once, by :func:`resolve_runtime`, and
handed down as a :class:`Runtime`; the model, loss and loop never look at the environment.

* device ``auto``: cuda, else mps, else cpu. Under ``torchrun`` each process takes
  ``cuda:LOCAL_RANK``.
* precision ``auto``: bf16 autocast on cuda (and mps), float32 on cpu. Parameters and optimizer
  state always stay float32; only the matmuls run in bf16 under autocast.
* TF32 matmuls on cuda when ``runtime.tf32`` (the float32 paths: loss, EMA, optimizer).
* CPU threads: ``runtime.num_threads``, else the cores shared between the local processes
  (see :func:`_auto_threads`).
* Distributed: ``WORLD_SIZE > 1`` in the environment (set by ``torchrun``) starts a process group,
  nccl on cuda, gloo elsewhere (see :mod:`maskdiff.distributed`).
"""

from __future__ import annotations

import functools
import os
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch

from maskdiff.config import RuntimeConfig
from maskdiff.distributed import DistInfo, init_distributed

__all__ = [
    "Runtime",
    "inference_context",
    "memory_gb",
    "model_device",
    "peak_flops",
    "resolve_runtime",
]

# Dense (no sparsity) peak tensor throughput per device, FLOP/s, by name fragment.
_GPU_PEAK_BF16: dict[str, float] = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM / HBM3
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16 tensor cores
    "T4": 65e12,
}


@dataclass(frozen=True)
class Runtime:
    """The resolved execution environment of one process."""

    device: torch.device
    dtype: torch.dtype  # autocast dtype: torch.bfloat16, or torch.float32 for no autocast
    dist: DistInfo
    num_threads: int

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    def autocast(self) -> AbstractContextManager[object]:
        """bf16 autocast on the device, or nothing in float32."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _pick_device(cfg: RuntimeConfig, local_rank: int) -> torch.device:
    name = cfg.device
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("runtime.device is 'cuda' but no CUDA device is visible")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def resolve_runtime(cfg: RuntimeConfig) -> Runtime:
    """Pick the device and precision, set threads and TF32, start the process group if any."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
        torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type in ("cuda", "mps") else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    threads = cfg.num_threads or _auto_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    dist = init_distributed(device, cfg.collective_timeout)
    return Runtime(device=device, dtype=dtype, dist=dist, num_threads=threads)


def _auto_threads() -> int:
    """Intra-op threads: this process's share of the cores (cores / local processes).

    A function of the machine and the launch only, never of the momentary load: float
    reductions depend on the thread count, and the same config and seed must give the same
    numbers run after run. On a machine that other jobs keep busy, set
    ``runtime.num_threads`` (OpenMP threads spin at barriers: a small model on 2 oversubscribed
    cores was measured 5-40x slower on 2 threads than on 1).
    """
    cores = os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return max(1, cores // max(1, local_world))


@functools.lru_cache(maxsize=8)
def _measure_cpu_flops(dtype: torch.dtype, threads: int) -> float:
    """Measured matmul FLOP/s of this CPU (a 1024^3 product, best of 5): the CPU 'peak'."""
    n = 1024
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def peak_flops(
    device: torch.device, dtype: torch.dtype, override_tflops: float | None = None
) -> float:
    """Peak FLOP/s of one device in this precision, the denominator of MFU.

    GPUs: the vendor's dense bf16 tensor peak by card name (float32 under TF32 counts half of
    it). CPU: a measured large matmul, so CPU MFU reads as "fraction of what a matmul reaches".
    ``override_tflops`` (``runtime.peak_tflops``) wins over both.
    """
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, value in _GPU_PEAK_BF16.items():
            if fragment in name:
                return value if dtype != torch.float32 else value / 2
        return float("nan")
    if device.type == "cpu":
        return _measure_cpu_flops(dtype, torch.get_num_threads())
    return float("nan")


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated on a GPU, resident (max RSS) on the host."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@contextmanager
def inference_context(model: Callable) -> Iterator[None]:
    """inference_mode, and eval() for an nn.Module (restored afterwards)."""
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def model_device(model: Callable, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(model, torch.nn.Module):
        param = next(model.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")
