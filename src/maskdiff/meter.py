"""The training loop's window meter: loss and gradient norm summed on the device, one host sync
and one gather of the ranks' clocks per metric window, none per step."""

from __future__ import annotations

import time

import torch

from maskdiff.config import Config
from maskdiff.distributed import all_gather_rows, all_reduce_mean
from maskdiff.model import flops_per_token
from maskdiff.runtime import Runtime, memory_gb, peak_flops

__all__ = ["WindowMeter"]


class WindowMeter:
    """Window sums kept on the device (no sync per step); :meth:`report` syncs once, and gathers
    each rank's clocks once (a second collective per window, none per step).

    ``work`` sums this rank's seconds outside the gradient all-reduce: the step up to the last
    micro-batch's backward, and from its end on. Under DDP every rank waits there for the
    slowest, so wall step times agree and the work time is what tells a straggler.
    """

    def __init__(self, cfg: Config, rt: Runtime, vocab_size: int) -> None:
        self.rt, self.sums = rt, torch.zeros(2, device=rt.device)  # loss, grad norm
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        self.flops = flops_per_token(cfg.model, vocab_size, cfg.data.seq_len)
        self.peak = peak_flops(rt.device, rt.dtype, cfg.runtime.peak_tflops) * rt.dist.world_size
        self.start, self.steps, self.work = time.perf_counter(), 0, 0.0

    def report(self, lr: float) -> dict[str, float]:
        loss, gnorm = all_reduce_mean(self.sums.clone(), self.rt.dist).tolist()  # the host sync
        elapsed = time.perf_counter() - self.start
        mine = [elapsed, self.work, memory_gb(self.rt.device)]
        mine_t = torch.tensor(mine, dtype=torch.float64, device=self.rt.device)
        ranks = all_gather_rows(mine_t, self.rt.dist).cpu()  # (W, 3)
        wall, work = ranks[:, 0] / self.steps, ranks[:, 1] / self.steps  # (W,) s per step
        tps = self.tokens_per_step * self.steps / float(ranks[:, 0].max())  # global tokens
        metrics = {
            "loss": loss / self.steps,
            "lr": lr,
            "grad_norm": gnorm / self.steps,
            "tokens_per_s": tps,
            "mfu": self.flops * tps / self.peak,
            "memory_gb": float(ranks[:, 2].max()),
            "step_time_s": float(wall.mean()),
            "step_time_max_s": float(wall.max()),
            "work_time_s": float(work.mean()),
            "work_time_max_s": float(work.max()),
            "straggler_ratio": float(work.max() / work.mean()) if float(work.mean()) > 0 else 1.0,
        }
        self.sums.zero_()
        self.start, self.steps, self.work = time.perf_counter(), 0, 0.0
        return metrics
