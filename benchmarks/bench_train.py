"""Training throughput: the project's loop against a bare PyTorch loop, and the loader's headroom.

Figures, not tests. In one process, on synthetic parquet blocks of random tokens:

1. ``loop``: :func:`maskdiff.train.train` (loader thread, host-to-device prefetch, EMA, LR
   schedule, metrics) for ``2 W`` steps, logging at W and 2W; the second window is measured.
2. ``bare``: the same model, the same batch already on the device, forward + float32 loss +
   backward + clipping + AdamW, nothing else; W warm-up steps, then W measured steps.
   The two alternate ``--repeats`` times. The judged ratio is the fastest loop over the fastest
   bare step: on a shared machine another process only ever slows a window down (windows of the
   same code vary by 5-10% here), so each side's fastest is the closest to its own cost; the
   median of the adjacent pairs' ratios is printed beside it. Both at ``--batch x --seq-len``
   (32 x 128) and at ``--small`` (12 x 64, where the loop's per-step bookkeeping weighs most).
   Goal: loop / bare >= 0.97 at both.
3. ``loader``: batches per second of the loader alone (synchronous and threaded), against the
   steps per second the training loop consumes. Goal: >= 10x.
4. On a GPU: MFU (model FLOPs per token x tokens/s / the card's bf16 peak) of the chosen preset,
   with ``--compile`` as asked; the card's name is printed. Goal on an H100: MFU >= 50% (small).

With ``--nproc N`` (N > 1) it measures data parallelism instead: ``torchrun`` of
``maskdiff.train`` with 1 process and with N (through :mod:`maskdiff.launch`), the same global
batch, the global tokens/s of the second metric window of each, alternated ``--repeats`` times;
it prints both medians, their ratio and the scaling efficiency ratio / N, with the straggler
ratio of the N-process runs. On a CPU each process gets 1 thread (on a GPU node, one GPU each).

:func:`parser` and :func:`measure` (one repeat: tokens/s, MFU, peak memory) are what
``benchmarks/gpu_check.py`` reuses for its ``bench`` and ``largest batch`` lines.

Examples::

    .venv/bin/python benchmarks/bench_train.py                        # CPU, tiny, fp32
    python benchmarks/bench_train.py --config small --batch 32 --seq-len 1024 --vocab 50257
    python benchmarks/bench_train.py --config small --batch 32 --seq-len 1024 --vocab 50257 \
        --compile
    .venv/bin/python benchmarks/bench_train.py --nproc 2 --repeats 3   # 2 CPU processes vs 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
import yaml

from maskdiff.config import Config
from maskdiff.data.contracts import blocks_schema, shard_name
from maskdiff.data.loader import BatchLoader, BlockSource, LoaderSpec, host_batches
from maskdiff.launch import LaunchSpec, run_training, torchrun_command, train_arguments
from maskdiff.model import build_model, flops_per_token
from maskdiff.runtime import memory_gb, peak_flops, resolve_runtime
from maskdiff.schedule import make_schedule
from maskdiff.train import train


def write_random_blocks(root: Path, n_blocks: int, seq_len: int, vocab: int) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = 8192
    for shard, lo in enumerate(range(0, n_blocks, rows)):
        n = min(rows, n_blocks - lo)
        ids = rng.integers(0, vocab, size=n * seq_len, dtype=np.int32)
        table = pa.table(
            {
                "block_id": np.arange(lo, lo + n, dtype=np.int64),
                "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids), seq_len),
                "n_bytes": np.full(n, seq_len, dtype=np.int32),
            },
            schema=blocks_schema(seq_len),
        )
        pq.write_table(table, root / shard_name("train", shard))
    return root


def make_config(args: argparse.Namespace, steps: int) -> Config:
    model = {"preset": args.config, "kind": args.kind, "max_seq_len": max(1024, args.seq_len)}
    return Config.model_validate(
        {
            "data": {"seq_len": args.seq_len},
            "model": model,
            "corruption": {"mode": "online"},
            "runtime": {"device": args.device, "precision": args.precision},
            "train": {"batch_size": args.batch, "max_steps": steps, "warmup_steps": 10,
                      "log_every": steps // 2, "checkpoint_every": 10**9, "compile": args.compile,
                      "lr": 1e-3, "ema": 0.999},
        }
    )  # fmt: skip


def _clocks() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads). On a shared CPU the second is
    the steadier measure of what the work itself costs."""
    return time.perf_counter(), time.process_time()


def run_loop(cfg: Config, blocks: Path, out: Path, vocab: int) -> tuple[float, float]:
    """tokens per wall second and per CPU second of the project's loop, second window."""
    marks: list[tuple[float, float]] = []
    train(cfg, blocks, out, vocab_size=vocab, resume=False,
          log_metrics=lambda step, metrics: marks.append(_clocks()))  # fmt: skip
    tokens = cfg.train.batch_size * cfg.data.seq_len * cfg.train.log_every
    return tokens / (marks[1][0] - marks[0][0]), tokens / (marks[1][1] - marks[0][1])


def run_bare(cfg: Config, vocab: int, warmup: int, steps: int) -> tuple[float, float]:
    """tokens per wall and per CPU second of a bare loop: same model and optimizer recipe, one
    fixed batch already on the device."""
    rt = resolve_runtime(cfg.runtime)
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab).to(rt.device)
    fused = rt.device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused, foreach=not fused)
    sched = make_schedule(cfg.diffusion)
    B, L = cfg.train.batch_size, cfg.data.seq_len
    x0 = torch.randint(0, vocab, (B, L), device=rt.device)
    t = torch.rand(B, device=rt.device).clamp(min=1e-3)
    x_t = torch.where(torch.rand(B, L, device=rt.device) < t[:, None], vocab, x0)
    target = torch.where(x_t == vocab, x0, -100)
    w = sched.weight(t)

    def step_fn() -> torch.Tensor:
        if cfg.model.kind == "ar":
            with rt.autocast():
                logits = model.real_logits(x0)
            return F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), x0[:, 1:].reshape(-1))
        with rt.autocast():
            logits = model.real_logits(x_t, t)
        ce = F.cross_entropy(logits.float().view(B * L, -1), target.view(-1), reduction="none")
        return (ce.view(B, L).sum(1) * w).sum() / (B * L)

    fwd = torch.compile(step_fn) if cfg.train.compile else step_fn
    for i in range(warmup + steps):
        if i == warmup:
            rt.synchronize()
            start = _clocks()
        loss = fwd()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    float(loss.detach())  # the same single host sync the project's loop does per window
    end = _clocks()
    return B * L * steps / (end[0] - start[0]), B * L * steps / (end[1] - start[1])


def loader_rate(blocks: Path, cfg: Config, vocab: int, n: int) -> tuple[float, float]:
    """Steps per second the loader produces: synchronously, and through its thread."""
    spec = LoaderSpec(seq_len=cfg.data.seq_len, global_batch=cfg.train.batch_size, grad_accum=1,
                      seed=0, shuffle_buffer=16384, mode="online", mask_id=vocab, t_min=1e-5,
                      antithetic=True)  # fmt: skip
    sched = make_schedule(cfg.diffusion)
    source = BlockSource(blocks, cfg.data.seq_len)
    gen = host_batches(source, spec, sched, 0)
    next(gen)
    start = time.perf_counter()
    for _ in range(n):
        next(gen)
    sync_rate = n / (time.perf_counter() - start)
    loader = BatchLoader(source, spec, sched, 0, pin_memory=torch.cuda.is_available())
    next(loader)
    start = time.perf_counter()
    for _ in range(n):
        next(loader)
    thread_rate = n / (time.perf_counter() - start)
    loader.close()
    return sync_rate, thread_rate


def parser() -> argparse.ArgumentParser:
    """The command line; also used by ``benchmarks/gpu_check.py`` to build its arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny", choices=["tiny", "small", "medium"])
    parser.add_argument("--kind", default="mdm", choices=["mdm", "ar"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--small", default="12x64",
                        help="B x L of a second, small-batch setting measured after --batch x "
                             "--seq-len on one device ('none': skip it)")  # fmt: skip
    parser.add_argument("--window", type=int, default=10, help="W: warm-up = measured steps")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=1, help="N > 1: N processes against 1")
    return parser


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    """One repeat of the loop and the bare step: tokens/s, MFU against the device's peak, peak
    memory (GB); the figures ``gpu_check`` reports."""
    cfg = make_config(args, 2 * args.window)
    n_blocks = max(4 * args.batch * args.window, 256)
    blocks = write_random_blocks(workdir / "blocks", n_blocks, args.seq_len, args.vocab)
    rt = resolve_runtime(cfg.runtime)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    bare = run_bare(cfg, args.vocab, args.window, args.window)[0]
    loop = run_loop(cfg, blocks, workdir / "run", args.vocab)[0]
    fpt = flops_per_token(cfg.model, args.vocab, args.seq_len)
    peak = peak_flops(rt.device, rt.dtype, cfg.runtime.peak_tflops)
    return {"loop_tokens_per_s": loop, "bare_tokens_per_s": bare, "mfu": fpt * loop / peak,
            "bare_mfu": fpt * bare / peak, "peak_tflops": peak / 1e12,
            "memory_gb": memory_gb(rt.device)}  # fmt: skip


def run_launched(cfg: Config, nproc: int, blocks: Path, out: Path, vocab: int) -> dict:
    """torchrun of ``maskdiff.train`` on ``nproc`` processes: the second window's metrics."""
    out.mkdir(parents=True)
    config = out / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    windows: list[dict[str, float]] = []
    args = train_arguments(config, blocks, out / "run", vocab_size=vocab)
    run_training(torchrun_command(LaunchSpec(nproc), args), lambda s, m: windows.append(m))
    return windows[1]


def scaling(args: argparse.Namespace) -> None:
    """``--nproc N``: global tokens/s of N processes against 1 on the same global batch."""
    cfg = make_config(args, 2 * args.window)
    rt = resolve_runtime(cfg.runtime)
    if rt.device.type == "cpu":  # one thread per process: N processes use N cores
        cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"num_threads": 1})})
    card = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu, 1 thread"
    print(f"device {rt.device.type} ({card}) per process, torch {torch.__version__}, preset "
          f"{args.config} ({args.kind}), global B={args.batch}, L={args.seq_len}, "
          f"V={args.vocab}, window {args.window} steps, {args.repeats} repeats")  # fmt: skip
    runs: dict[int, list[dict]] = {1: [], args.nproc: []}
    with tempfile.TemporaryDirectory() as tmp:
        n_blocks = max(4 * args.batch * args.window, 4096)
        blocks = write_random_blocks(Path(tmp) / "blocks", n_blocks, args.seq_len, args.vocab)
        for r in range(args.repeats):
            for n in runs:
                runs[n].append(run_launched(cfg, n, blocks, Path(tmp) / f"{n}-{r}", args.vocab))
            one, many = runs[1][-1], runs[args.nproc][-1]
            print(f"  repeat {r}: 1 process {one['tokens_per_s']:,.0f} tok/s, {args.nproc} "
                  f"processes {many['tokens_per_s']:,.0f} tok/s (straggler ratio "
                  f"{many['straggler_ratio']:.2f}, step {many['step_time_s'] * 1e3:.1f} ms, "
                  f"slowest rank {many['step_time_max_s'] * 1e3:.1f} ms)")  # fmt: skip
    one = statistics.median(m["tokens_per_s"] for m in runs[1])
    many = statistics.median(m["tokens_per_s"] for m in runs[args.nproc])
    print(f"tokens/s (median, global): 1 process {one:,.0f}, {args.nproc} processes {many:,.0f}; "
          f"ratio {many / one:.2f}, scaling efficiency {many / one / args.nproc:.0%}")  # fmt: skip


def compare(args: argparse.Namespace) -> None:
    """The loop against the bare step at ``args.batch x args.seq_len``, and the loader."""
    cfg = make_config(args, 2 * args.window)
    with tempfile.TemporaryDirectory() as tmp:
        n_blocks = max(4 * args.batch * args.window, 4096)
        blocks = write_random_blocks(Path(tmp) / "blocks", n_blocks, args.seq_len, args.vocab)
        rt = resolve_runtime(cfg.runtime)
        card = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu"
        print(f"device {rt.device} ({card}), autocast {rt.dtype}, threads {rt.num_threads}, "
              f"torch {torch.__version__}, preset {args.config} ({args.kind}), B={args.batch}, "
              f"L={args.seq_len}, V={args.vocab}, compile={args.compile}")  # fmt: skip
        loop, bare = [], []
        for r in range(args.repeats):
            bare.append(run_bare(cfg, args.vocab, args.window, args.window))
            loop.append(run_loop(cfg, blocks, Path(tmp) / f"run{r}", args.vocab))
            print(f"  repeat {r}: bare {bare[-1][0]:,.0f} tok/s ({bare[-1][1]:,.0f} per CPU s), "
                  f"loop {loop[-1][0]:,.0f} tok/s ({loop[-1][1]:,.0f} per CPU s)")  # fmt: skip
        for k, clock in enumerate(("wall", "CPU")):
            ratios = [a[k] / b[k] for a, b in zip(loop, bare, strict=True)]
            best = max(a[k] for a in loop) / max(b[k] for b in bare)
            print(f"B={args.batch} x L={args.seq_len}: loop/bare tokens per {clock} second: "
                  f"{best:.3f} (fastest of {args.repeats} each; goal >= 0.97), "
                  f"median of the adjacent pairs {statistics.median(ratios):.3f}")  # fmt: skip
        loop_tps = statistics.median(x[0] for x in loop)
        bare_tps = statistics.median(x[0] for x in bare)
        fpt = flops_per_token(cfg.model, args.vocab, args.seq_len)
        peak = peak_flops(rt.device, rt.dtype, cfg.runtime.peak_tflops)
        print(f"MFU loop {fpt * loop_tps / peak:.1%}, bare {fpt * bare_tps / peak:.1%} "
              f"(model {fpt / 1e6:.2f} MFLOP/token, peak {peak / 1e12:.2f} TFLOP/s)")  # fmt: skip
        steps_per_s = loop_tps / (args.batch * args.seq_len)
        sync_rate, thread_rate = loader_rate(blocks, cfg, args.vocab, 4 * args.window)
        print(f"loader: {sync_rate:,.1f} batches/s synchronous, {thread_rate:,.1f} threaded; "
              f"training consumes {steps_per_s:,.2f}/s -> {sync_rate / steps_per_s:,.0f}x "
              f"headroom (goal >= 10x)")  # fmt: skip


def main() -> None:
    args = parser().parse_args()
    if args.nproc > 1:
        scaling(args)
        return
    compare(args)
    if args.small != "none":  # per-step overhead weighs most where a step is short
        batch, seq_len = (int(x) for x in args.small.lower().split("x"))
        if (batch, seq_len) != (args.batch, args.seq_len):
            compare(argparse.Namespace(**{**vars(args), "batch": batch, "seq_len": seq_len}))


if __name__ == "__main__":
    main()
