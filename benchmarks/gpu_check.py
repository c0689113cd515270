"""The GPU acceptance in one command: every check of the CUDA path, one line each, one report.

    python benchmarks/gpu_check.py --device cuda --stages .gpu/stages --out runs/gpu-check
    python benchmarks/gpu_check.py --device cpu --out /tmp/dry     # the CPU dry run (tiny sizes)
    python benchmarks/gpu_check.py --prepare-only --stages .gpu/stages  # build the carried stages

Each check prints ``pass``, ``fail`` or ``skipped (reason)`` with its figure; ``report.json`` and
``report.md`` (card, torch, CUDA, every figure) go to ``--out``. On a CPU the GPU-only checks are
skipped and the rest run at tiny sizes. Needs only torch, numpy, pyarrow, pyyaml, tokenizers and
pydantic on the GPU side; building the stages (``--prepare-only``) needs the whole package.
See docs/gpu-check.md for what each line means.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

# bench_train and maskdiff (hence pydantic, from the carried wheels) are imported where they are
# used: a machine without them still writes the environment line and the report.
sys.path.insert(0, str(Path(__file__).resolve().parent))

if TYPE_CHECKING:
    from maskdiff.config import Config
    from maskdiff.evaluate import NelboEstimate
    from maskdiff.frontier import SampleQuality

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("prefect", "mlflow", "pandera", "datasets")
LIBRARY = ["config", "model", "loss", "train", "checkpoint", "evaluate", "sampling", "heldout",
           "runtime", "scoring", "frontier", "data.loader", "data.contracts", "data.evalset",
           "data.markov", "data.stage", "data.tokenizer"]  # fmt: skip
# The CPU dry run: conf/gpu.yaml shrunk to seconds (same code paths and thresholds, tiny sizes:
# a chain of 8 symbols, which a 2 x 64 model learns in 300 steps: 7 s of one core against 25 s
# for the 4 x 128 `tiny` preset, its samples 1.73 nats/token against the 1.98 to beat), no EMA:
# at 0.99 the EMA of 200 steps still holds 13% of the initial weights, and its samples score
# worse than context-free ones (2.45 nats against a unigram entropy of 1.98 here, the raw
# weights 1.65), which the samples line reports as a fail).
CPU_OVERRIDES = [
    "data.markov.vocab_size=8", "data.markov.n_documents=96", "data.markov.doc_length=256",
    "data.val_fraction=0.25", "data.seq_len=64", "model.preset=custom", "model.n_layers=2",
    "model.d_model=64", "model.n_heads=2", "model.max_seq_len=64", "train.lr=3e-3",
    "runtime.device=cpu", "runtime.precision=fp32", "runtime.num_threads=1",
    "train.batch_size=16", "train.max_steps=300", "train.warmup_steps=10", "train.log_every=20",
    "train.ema=0", "train.compile=false", "train.max_minutes=null", "eval.max_blocks=32",
    "sample.steps=64", "sample.n_samples=16",
]  # fmt: skip

# ---- thresholds: each line's, stated in docs/gpu-check.md (a broken GPU path misses them)
MFU_GOAL = 0.50  # reported beside the figure
MFU_FLOOR = 0.20  # bench eager, small, bf16, B=32, L=1024: fp32 matmuls, math attention miss it
COMPILED_LOSS_REL = (1e-2, 3e-2)  # the first metric window, then the next two
COMPILED_SPEED = 0.97  # compiled tokens/s at least this share of eager's (3% timing noise)
# device float32 (TF32 off) against CPU float64, every estimate: measured 2e-8 on a CPU; bf16
# logits are off by 3e-5 even on the 2-layer test model (tests/test_gpu_check.py)
EVAL_MATCH_REL = 1e-5
EVAL_MATCH_BLOCKS = 8  # validation blocks of that comparison (the CPU side is the slow one)
BATCH_FLOOR = {"small": 32, "medium": 16}  # largest batch at L=1024 in bf16 on an 80 GB card
SAMPLE_SE = 3.0  # samples' NLL may sit this many standard errors below the entropy rate


@dataclass
class Line:
    """One check: status is pass, fail or skipped; figure is what was measured."""

    name: str
    status: str
    figure: str = ""
    reason: str = ""
    data: dict = field(default_factory=dict)
    seconds: float = 0.0

    def text(self) -> str:
        status = f"skipped ({self.reason})" if self.status == "skipped" else self.status
        return f"{self.name:<24} {status:<8} {self.figure}"


def _skip(name: str, reason: str = "no CUDA") -> Line:
    return Line(name, "skipped", reason=reason)


def gpu_config(device: str) -> Config:
    """conf/gpu.yaml, shrunk to the dry run on a CPU (imports the config: pydantic)."""
    from maskdiff.config import load_config

    return load_config(ROOT / "conf" / "gpu.yaml", CPU_OVERRIDES if device == "cpu" else [])


# ----------------------------------------------------------------------------- stages

SOURCE_FILE = "source.json"  # beside the carried stages: the config sections that built them


def stage_source(cfg: Config) -> dict:
    """What the stages depend on: the data section (its root aside) and the tokenizer's."""
    data = cfg.data.model_dump(mode="json")
    data.pop("root", None)
    return {"data": data, "tokenizer": cfg.tokenizer.model_dump(mode="json")}


def prepare_stages(cfg: Config, dest: Path) -> dict[str, str]:
    """Build documents -> tokenizer -> blocks -> corruptions from the built-in corpus and copy
    the three stages training needs to ``dest/{tokenizer,blocks,corruptions}``, with
    ``source.json`` (needs the whole package: run it on the workstation)."""
    from maskdiff.data import blocks, corrupt, ingest, tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        docs = ingest.ingest_documents(cfg.data, tmp)
        tok = tokenizer.train_tokenizer(cfg.tokenizer, docs.path, tmp)
        blk = blocks.build_blocks(cfg.data, docs.path, tok.path, tmp)
        cor = corrupt.build_corruptions(cfg.corruption, cfg.diffusion, blk.path, tmp)
        dest.mkdir(parents=True, exist_ok=True)
        for name, stage in (("tokenizer", tok), ("blocks", blk), ("corruptions", cor)):
            shutil.rmtree(dest / name, ignore_errors=True)
            shutil.copytree(stage.path, dest / name)
    (dest / SOURCE_FILE).write_text(json.dumps(stage_source(cfg), indent=2, sort_keys=True))
    return {name: str(dest / name) for name in ("tokenizer", "blocks", "corruptions")}


def _differences(got: object, want: object, key: str = "") -> list[str]:
    """Dotted keys where two JSON trees differ."""
    if isinstance(got, dict) and isinstance(want, dict):
        keys = sorted(set(got) | set(want))
        return [d for k in keys for d in _differences(got.get(k), want.get(k), f"{key}.{k}")]
    return [] if got == want else [f"{key.lstrip('.')} {got!r} vs {want!r}"]


def judge_stages(recorded: dict | None, expected: dict, stats: dict | None, how: str) -> Line:
    """The stages were built from the config this run trains with: ``source.json`` equals
    ``stage_source(cfg)`` and the blocks have its block length (a stale carry fails)."""
    if stats is None:
        return Line("stages", "fail", f"{how}: no readable blocks manifest")
    if recorded is None:
        return Line("stages", "fail", f"{how}: no {SOURCE_FILE}: run `make gpu-prepare` again")
    diff = _differences(recorded, expected)
    if stats.get("seq_len") != expected["data"]["seq_len"]:
        diff.append(f"blocks seq_len {stats.get('seq_len')} vs {expected['data']['seq_len']}")
    train = stats["splits"]["train"]
    fig = (f"{how}: {train['blocks']} train blocks of L={stats['seq_len']}, "
           f"{train['tokens']:,} tokens, m={stats['vocab_size']}")  # fmt: skip
    if diff:
        return Line("stages", "fail", f"{how}, built from another config: " + "; ".join(diff[:3]))
    return Line("stages", "pass", fig + ", built from this config", data={"stats": stats})


def check_stages(cfg: Config, stages: Path, how: str) -> Line:
    try:
        stats = json.loads((stages / "blocks" / "manifest.json").read_text())["stats"]
    except (OSError, KeyError, ValueError):
        stats = None
    src = stages / SOURCE_FILE
    recorded = json.loads(src.read_text()) if src.is_file() else None
    return judge_stages(recorded, stage_source(cfg), stats, how)


def train_unigram_entropy(blocks: Path, max_tokens: int = 4_000_000) -> float:
    """Plug-in entropy (nats) of the train split's tokens, EOS included: what a model of token
    frequencies alone scores per token, the line any trained model must be below."""
    import numpy as np
    import pyarrow.parquet as pq

    from maskdiff.data.stage import list_shards

    counts, seen = np.zeros(0, dtype=np.int64), 0
    for shard in list_shards(blocks, "train"):
        ids = pq.read_table(shard, columns=["input_ids"]).column(0).combine_chunks()
        flat = ids.flatten().to_numpy().astype(np.int64)
        grown = np.bincount(flat)
        counts = np.pad(counts, (0, max(0, len(grown) - len(counts))))
        counts[: len(grown)] += grown
        seen += len(flat)
        if seen >= max_tokens:
            break
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ----------------------------------------------------------------------------- checks


def check_environment(device: str) -> Line:
    cuda = torch.cuda.is_available()
    card = torch.cuda.get_device_name(0) if cuda else "none"
    info = {"card": card, "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "python": platform.python_version(), "device": device}  # fmt: skip
    if device == "cuda" and not cuda:
        return Line(
            "environment", "fail", f"torch {torch.__version__} has no CUDA device", data=info
        )
    fig = f"card {card}, torch {info['torch']}, CUDA {info['cuda']}, Python {info['python']}"
    return Line("environment", "pass", fig, data=info)


_BLOCKER = """
import importlib, importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
for m in {modules!r}:
    importlib.import_module('maskdiff.' + m)
print(sorted(k for k in sys.modules if k.split('.')[0] in {blocked!r}))
"""


def check_imports() -> Line:
    """The library modules the GPU side needs import with prefect/mlflow/pandera/datasets
    made unimportable (a meta-path finder that raises)."""
    code = _BLOCKER.format(blocked=BLOCKED, modules=LIBRARY)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return Line("imports", "fail", proc.stderr.strip().splitlines()[-1])
    return Line("imports", "pass", f"{len(LIBRARY)} modules without {', '.join(BLOCKED)}")


def check_pytest(device: str, out: Path) -> Line:
    """``pytest -m gpu`` on CUDA (``MASKDIFF_TEST_DEVICE=cuda``: skipped, with the reason, when
    there is none; CI runs the same tests on the CPU). Their compile test is left to the
    ``compiled vs eager`` line, which judges compile at full size: one compile per check."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "--noconftest", "-p",
           "no:cacheprovider", "-rs", "-k", "not compile",
           str(ROOT / "tests" / "test_gpu.py")]  # fmt: skip
    env = dict(os.environ, MASKDIFF_TEST_DEVICE="cuda")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    (out / "pytest-gpu.txt").write_text(proc.stdout + proc.stderr)
    tail = [s for s in proc.stdout.strip().splitlines() if s.strip()]
    summary = tail[-1].strip("= ") if tail else "no output"
    if proc.returncode != 0:
        return Line("pytest -m gpu", "fail", summary + " (see pytest-gpu.txt)")
    if "passed" not in summary and not torch.cuda.is_available():
        return Line("pytest -m gpu", "skipped", summary, reason="no CUDA")
    if "skipped" in summary:
        return Line("pytest -m gpu", "fail", summary + ": a GPU test skipped on a GPU")
    return Line("pytest -m gpu", "pass", summary + " (every test passes on CUDA)")


def check_sdpa_kernel(device: str) -> Line:
    """The attention kernel SDPA runs in bf16, read from the profiler: ``small`` at L = 1024 on
    a GPU; ``tiny`` at L = 64 on a CPU (the same reading, of the CPU's kernels)."""
    from torch.profiler import ProfilerActivity, profile

    from maskdiff.config import Config
    from maskdiff.model import build_model

    cuda = device == "cuda"
    preset, L, B = ("small", 1024, 4) if cuda else ("tiny", 64, 2)
    cfg = Config.model_validate(
        {"data": {"seq_len": L}, "model": {"preset": preset, "max_seq_len": L}}
    )
    model = build_model(cfg.model, 8192).to(device)
    x = torch.randint(0, 8192, (B, L), device=device)
    t = torch.rand(B, device=device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.autocast(device, dtype=torch.bfloat16):
        model.real_logits(x, t).float().mean().backward()  # warm-up
        with profile(activities=acts) as prof:
            model.real_logits(x, t).float().mean().backward()
            if cuda:
                torch.cuda.synchronize()
    ops = sorted({e.key for e in prof.key_averages() if "scaled_dot_product_" in e.key})
    kinds = ("flash", "efficient", "cudnn")
    fused = [n.removeprefix("aten::_scaled_dot_product_") for n in ops
             if "math" not in n and any(k in n for k in kinds)]  # fmt: skip
    ok = bool(fused) and not any("math" in n for n in ops)
    kernel = ", ".join(fused) if fused else "math fallback: " + ", ".join(ops)
    kernel = f"{preset}, L={L}, bf16: {kernel}"
    return Line("sdpa kernel", "pass" if ok else "fail", kernel, data={"ops": ops})


def _short_train(
    cfg: Config,
    blocks: Path,
    out: Path,
    vocab: int,
    window: int,
    on_first: Callable[[], None],
    on_second: Callable[[], None],
) -> list[dict]:
    """``maskdiff.train.train`` eager for 3 windows: ``on_first`` after the first metric window,
    ``on_second`` as the second is reported (before its sync). Returns the windows' metrics
    (with ``step``)."""
    from maskdiff import train as train_mod

    cfg = cfg.model_copy(deep=True)
    # max_steps stays: the learning rate after warmup depends on it, and the windows are
    # compared with the compiled run's at the same steps
    cfg.train.log_every, cfg.train.compile = window, False
    cfg.train.checkpoint_every, cfg.train.eval_every, cfg.train.max_minutes = 10**9, 0, None
    seen: list[int] = []
    report = train_mod._Meter.report

    def wrapped(meter: train_mod._Meter, lr: float) -> dict[str, float]:
        seen.append(1)
        if len(seen) == 2:
            on_second()  # before the window's one sync
        metrics = report(meter, lr)
        if len(seen) == 1:
            on_first()
        return metrics

    train_mod._Meter.report = wrapped  # type: ignore[method-assign]
    try:
        res = train_mod.train(cfg, blocks, out, vocab_size=vocab, resume=False,
                              stop_at_step=3 * window)  # fmt: skip
    finally:
        train_mod._Meter.report = report  # type: ignore[method-assign]
        on_second() if len(seen) < 2 else None
    return [{"step": step, **m} for step, m in res.history]


def idle_share(spans: list[tuple[float, float]]) -> tuple[float, float]:
    """(share of [first start, last end] that no interval covers, that length) of kernel
    intervals (start, end): idle = 1 - |union of intervals| / (max end - min start)."""
    busy, end, first = 0.0, None, None
    for lo, hi in sorted(spans):
        first = lo if first is None else first
        if end is None or lo > end:
            busy, end = busy + hi - lo, hi
        elif hi > end:
            busy, end = busy + hi - end, hi
    if first is None or end is None or end <= first:
        return float("nan"), 0.0
    return 1.0 - busy / (end - first), end - first


def check_sync_and_idle(cfg: Config, stages: Path, work: Path, vocab: int,
                        eager: list[dict]) -> list[Line]:  # fmt: skip
    """No host sync between two metric windows (``set_sync_debug_mode("error")``), and the GPU
    idle share of that stretch from the profiler's kernel timeline, in an eager run of 3
    windows of conf/gpu.yaml's training (its windows go to ``eager``)."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CUDA])
    state = {"on": False}

    def first() -> None:
        torch.cuda.synchronize()
        prof.start()
        torch.cuda.set_sync_debug_mode("error")
        state["on"] = True

    def second() -> None:
        if state["on"]:
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            prof.stop()
            state["on"] = False

    window = cfg.train.log_every
    try:
        eager += _short_train(cfg, stages / "blocks", work / "sync-run", vocab, window, first,
                              second)  # fmt: skip
        sync = Line("no host sync", "pass", f"0 syncs in {window} steps between metric windows")
    except RuntimeError as exc:
        torch.cuda.set_sync_debug_mode(0)
        msg = str(exc).strip().splitlines()[0][:120]
        return [Line("no host sync", "fail", msg), _skip("gpu idle", "the sync check failed")]
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)  # fmt: skip
    idle, total = idle_share(spans)
    status = "pass" if idle < 0.02 else "fail"
    idle_line = Line("gpu idle", status, f"{idle:.2%} of {total / 1e3:.1f} ms (goal < 2%)",
                     data={"idle_share": idle})  # fmt: skip
    return [sync, idle_line]


def judge_compiled(eager: list[dict], compiled: list[dict]) -> Line:
    """The compiled run's window losses equal the eager run's at the same steps (same weights,
    batches and masks; bf16 rounding differs): COMPILED_LOSS_REL[0] on the first window,
    [1] on the next; and its tokens/s (median of its windows after the first, past the compile)
    at least COMPILED_SPEED of eager's last window (the first two carry the start and the
    profiler)."""
    name = "compiled vs eager"
    by_step = {w["step"]: w for w in compiled}
    pairs = [(w, by_step.get(w["step"])) for w in eager]
    if not eager or any(c is None for _, c in pairs):
        return Line(name, "fail", f"steps differ: eager {[w['step'] for w in eager]}, compiled "
                    f"{sorted(by_step)[:4]}")  # fmt: skip
    gaps = [abs(c["loss"] / e["loss"] - 1) for e, c in pairs]  # type: ignore[index]
    limits = [COMPILED_LOSS_REL[0]] + [COMPILED_LOSS_REL[1]] * (len(gaps) - 1)
    losses_ok = all(math.isfinite(g) and g <= lim for g, lim in zip(gaps, limits, strict=True))
    later = sorted(w["tokens_per_s"] for w in compiled[1:]) or [0.0]
    fast, slow = later[len(later) // 2], eager[-1]["tokens_per_s"]
    ok = losses_ok and fast >= COMPILED_SPEED * slow
    fig = (f"loss gaps {', '.join(f'{g:.2%}' for g in gaps)} at steps "
           f"{', '.join(str(e['step']) for e, _ in pairs)} (at most {limits[0]:.0%}, then "
           f"{COMPILED_LOSS_REL[1]:.0%}); {fast:,.0f} tok/s compiled vs {slow:,.0f} eager "
           f"({fast / slow if slow else math.nan:.2f}x, at least {COMPILED_SPEED})")  # fmt: skip
    return Line(name, "pass" if ok else "fail", fig, data={"gaps": gaps, "compiled_tps": fast,
                                                           "eager_tps": slow})  # fmt: skip


def judge_mfu(fig: dict, floor: float | None) -> Line:
    """MFU of the eager loop at least ``floor`` (None: the CPU, where it is not judged)."""
    text = (f"{fig['loop_tokens_per_s']:,.0f} tok/s, MFU {fig['mfu']:.1%} of "
            f"{fig['peak_tflops']:.3g} TFLOP/s, peak {fig['memory_gb']:.1f} GB")  # fmt: skip
    if floor is None:
        return Line("bench eager", "skipped", text, reason="no CUDA: the MFU floor is a GPU's",
                    data=fig)  # fmt: skip
    text += f" (floor {floor:.0%}; goal {MFU_GOAL:.0%}, gap {max(0.0, MFU_GOAL - fig['mfu']):.1%})"
    ok = math.isfinite(fig["mfu"]) and fig["mfu"] >= floor
    return Line("bench eager", "pass" if ok else "fail", text, data=fig)


def check_bench(device: str, work: Path) -> Line:
    """bench_train's loop and bare step, eager: small at L=1024 in bf16 on a GPU, tiny on a
    CPU (compile is judged by ``compiled vs eager`` on the training run)."""
    import bench_train

    if device == "cpu":
        argv = ["--config", "tiny", "--device", "cpu", "--precision", "fp32", "--batch", "4",
                "--seq-len", "32", "--vocab", "256", "--window", "3"]  # fmt: skip
    else:
        argv = ["--config", "small", "--device", "cuda", "--precision", "bf16", "--batch", "32",
                "--seq-len", "1024", "--vocab", "50257", "--window", "10"]  # fmt: skip
    args = bench_train.parser().parse_args(argv)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        fig = bench_train.measure(args, Path(tmp))
    return judge_mfu(fig, MFU_FLOOR if device == "cuda" else None)


def _fits(preset: str, batch: int, vocab: int = 50257, L: int = 1024) -> float | None:
    """tokens/s of 3 bare bf16 steps at this batch, or None when it runs out of memory."""
    argv = ["--config", preset, "--device", "cuda", "--precision", "bf16", "--batch", str(batch),
            "--seq-len", str(L), "--vocab", str(vocab)]  # fmt: skip
    import bench_train

    args = bench_train.parser().parse_args(argv)
    try:
        return bench_train.run_bare(bench_train.make_config(args, 4), vocab, 1, 2)[0]
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        gc.collect()  # the failed try's model and optimizer, before the next size
        torch.cuda.empty_cache()


def largest_fitting(fits: Callable[[int], float | None], start: int = 8, cap: int = 1024,
                    bisections: int = 4) -> tuple[int, float | None]:  # fmt: skip
    """(largest batch found to fit, its tokens/s): double from ``start`` until ``fits`` returns
    None (out of memory) or ``cap`` is passed, then bisect ``bisections`` times (to within 8).
    (0, None) when ``start`` does not fit."""
    lo, hi, rate, b = 0, None, None, start
    while b <= cap:
        r = fits(b)
        if r is None:
            hi = b
            break
        lo, rate, b = b, r, 2 * b
    for _ in range(bisections):
        if hi is None or hi - lo <= 8:
            break
        mid = (lo + hi) // 2
        r = fits(mid)
        lo, rate, hi = (mid, r, hi) if r is not None else (lo, rate, mid)
    return lo, rate


def judge_largest_batch(preset: str, batch: int, rate: float | None, floor: int) -> Line:
    """The largest batch that fits at L = 1024 is at least ``floor`` (a memory regression, an
    activation or fp32 copy kept too long, halves it)."""
    name = f"largest batch {preset}"
    if not batch or rate is None:
        return Line(name, "fail", f"batch 8 does not fit at L=1024 (at least {floor})")
    return Line(name, "pass" if batch >= floor else "fail",
                f"B={batch} at L=1024 (at least {floor}), {rate:,.0f} tok/s",
                data={"batch": batch, "tokens_per_s": rate})  # fmt: skip


def check_largest_batch(preset: str) -> Line:
    """The largest batch of ``preset`` at L = 1024 in bf16 (3 bare steps per try)."""
    batch, rate = largest_fitting(lambda b: _fits(preset, b), bisections=3)
    return judge_largest_batch(preset, batch, rate, BATCH_FLOOR[preset])


def judge_train(losses: list[float], unigram: float, wall: float, last: dict) -> Line:
    """Every window's loss finite, and the last window below the unigram entropy of the train
    tokens (a model of token frequencies alone scores that; a step that does not learn stays
    above it)."""
    fig = (f"{last.get('step')} steps in {wall:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f} "
           f"nats/token (must end below the unigram entropy {unigram:.3f}), "
           f"{last.get('tokens_per_s', 0):,.0f} tok/s, MFU {last.get('mfu', 0):.1%}, "
           f"peak {last.get('memory_gb', 0):.1f} GB")  # fmt: skip
    ok = all(math.isfinite(x) for x in losses) and losses[-1] < unigram
    return Line("train entry point", "pass" if ok else "fail", fig)


def check_train_run(
    device: str, stages: Path, out: Path, work: Path, unigram: float
) -> tuple[Line, Path | None, list[dict]]:
    """``python -m maskdiff.train`` on the stages with conf/gpu.yaml (2 x 64 on a CPU); the log
    goes to ``out``, the checkpoints (GBs for ``small``) to ``work``. Returns the line, the
    last checkpoint and the metric windows."""
    sets = CPU_OVERRIDES if device == "cpu" else []
    run_dir = work / "train-run"
    from maskdiff.worker_args import TRAIN_FLAGS, arguments  # the standard library only

    cmd = [sys.executable, "-m", "maskdiff.train",
           *arguments(TRAIN_FLAGS, config=ROOT / "conf" / "gpu.yaml", set=sets,
                      blocks=stages / "blocks", corruptions=stages / "corruptions", out=run_dir,
                      no_resume=True)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (out / "train-run.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Line("train entry point", "fail", last[:160] + " (see train-run.log)"), None, []
    rows = [json.loads(s) for s in proc.stdout.splitlines() if s.startswith("{")]
    windows = [r for r in rows if "loss" in r]
    line = judge_train([r["loss"] for r in windows], unigram, wall, windows[-1])
    line.data = {"wall_s": wall, "first": windows[0], "last": windows[-1], "unigram": unigram}
    return line, Path(rows[-1]["checkpoint"]), windows


def bound_floor(cfg: Config) -> float | None:
    """The least nats per token any model can score on markov blocks (None for another
    corpus): h per symbol token, EOS free; doc_length symbols for each EOS."""
    if cfg.data.source != "builtin" or cfg.data.builtin != "markov":
        return None
    from maskdiff.data.markov import make_chain

    n = cfg.data.markov.doc_length
    return make_chain(cfg.data.markov).entropy_rate() * n / (n + 1)


def judge_bound(nats: float, se: float, unigram: float, floor: float | None) -> Line:
    """The validation bound is below the unigram entropy of the train tokens (the model learned
    more than token frequencies) and, on markov, not below the chain's exact floor by more than
    3 standard errors (a bound under the source's entropy is an evaluator error)."""
    ok = math.isfinite(nats) and math.isfinite(se) and nats < unigram
    fig = f"{nats:.4f} +- {se:.4f} nats/token, below the unigram entropy {unigram:.4f}"
    if floor is not None:
        ok = ok and nats > floor - 3 * se
        fig += f" and above the chain's floor {floor:.4f} - 3 SE"
    data = {"nats_per_token": nats, "se": se, "unigram": unigram, "floor": floor}
    return Line("evaluator bound", "pass" if ok else "fail", fig, data=data)


def check_bound(device: str, stages: Path, ckpt: Path, unigram: float) -> Line:
    """The continuous NELBO of the trained checkpoint on the validation split."""
    from maskdiff.checkpoint import load_model
    from maskdiff.evaluate import evaluate_stage

    model, cfg = load_model(ckpt, device=device)
    start = time.perf_counter()
    res = evaluate_stage(model, stages / "blocks", stages / "corruptions", "validation", cfg.eval,
                         device=device)  # fmt: skip
    est = res.estimates[0]
    line = judge_bound(est.nats_per_token, est.se, unigram, bound_floor(cfg))
    line.figure += f" ({est.n_blocks} blocks, {time.perf_counter() - start:.1f} s)"
    return line


def judge_match(got: list[NelboEstimate], ref: list[NelboEstimate], rel: float) -> Line:
    """Every estimate of the device's evaluator equals the CPU reference's within ``rel``."""
    name = "evaluator gpu = cpu"
    if [e.T for e in got] != [e.T for e in ref] or not got:
        return Line(name, "fail", f"rows differ: T {[e.T for e in got]} vs {[e.T for e in ref]}")
    gaps = [abs(a.nats_per_token / b.nats_per_token - 1) for a, b in zip(got, ref, strict=True)]
    worst = max(gaps) if all(math.isfinite(g) for g in gaps) else math.inf
    rows = ", ".join(f"{a.label} {a.nats_per_token:.6f} vs {b.nats_per_token:.6f}"
                     for a, b in zip(got, ref, strict=True))  # fmt: skip
    return Line(name, "pass" if worst <= rel else "fail",
                f"{rows}: largest gap {worst:.1e} (at most {rel:.0e})",
                data={"gaps": gaps, "rel": rel})  # fmt: skip


def check_eval_match(device: str, stages: Path, ckpt: Path) -> Line:
    """The evaluator on ``device`` in float32 (TF32 off) against the CPU's in float64, on the
    same checkpoint, blocks and corruptions: every estimate of the first validation blocks."""
    from maskdiff.checkpoint import load_model
    from maskdiff.evaluate import evaluate_stage

    model, cfg = load_model(ckpt, device=device)
    reference, _ = load_model(ckpt, device="cpu")
    ecfg = cfg.eval.model_copy(update={"max_blocks": EVAL_MATCH_BLOCKS})
    args = (stages / "blocks", stages / "corruptions", "validation", ecfg)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        got = evaluate_stage(model, *args, device=device).estimates
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    ref = evaluate_stage(reference.double(), *args, device="cpu").estimates
    return judge_match(got, ref, EVAL_MATCH_REL)


def judge_samples(q: SampleQuality, mask_left: int, text: str) -> Line:
    """The samples' true NLL per token under the chain (exact judge) is below the chain's
    unigram entropy (no sampler that ignores context gets there: its expected NLL is the
    unigram entropy plus a KL term) and not below the entropy rate by more than SAMPLE_SE
    standard errors (collapse onto likely strings); no [MASK] left."""
    h, uni = q.reference_nll or math.nan, q.reference_unigram_entropy or math.nan
    ok = mask_left == 0 and math.isfinite(q.nll) and h - SAMPLE_SE * q.nll_se < q.nll < uni
    fig = (f"true NLL {q.nll:.4f} +- {q.nll_se:.4f} nats/token over {q.n_scored} tokens: "
           f"entropy rate {h:.4f} (excess {q.nll - h:+.4f}), must be below the unigram entropy "
           f"{uni:.4f}; {mask_left} masks left: {text[:40]!a}")  # fmt: skip
    return Line("samples", "pass" if ok else "fail", fig, data={"quality": q.to_dict()})


def check_samples(device: str, stages: Path, ckpt: Path) -> Line:
    """Unconditional samples of the trained checkpoint, judged exactly on the markov chain."""
    from maskdiff.checkpoint import load_model
    from maskdiff.data.markov import make_chain
    from maskdiff.data.tokenizer import load_tokenizer
    from maskdiff.frontier import MarkovJudge
    from maskdiff.sampling import generate
    from maskdiff.schedule import make_schedule

    model, cfg = load_model(ckpt, device=device)
    if bound_floor(cfg) is None:
        return Line("samples", "fail", "no exact judge: conf/gpu.yaml must use the markov corpus")
    tok = load_tokenizer(stages / "tokenizer")
    judge = MarkovJudge.for_tokenizer(make_chain(cfg.data.markov), tok)
    start = time.perf_counter()
    out = generate(model, make_schedule(cfg.diffusion), model.vocab_size, cfg.sample,
                   cfg.data.seq_len, time_conditioning=cfg.model.time_conditioning,
                   device=device)  # fmt: skip
    seconds = time.perf_counter() - start
    left = int((out.tokens >= model.mask_id).sum())
    line = judge_samples(judge.score(out.tokens), left, tok.decode(out.tokens[0].tolist()))
    shape = f"{out.tokens.shape[0]} x {out.tokens.shape[1]}"
    line.figure = f"{shape} in {seconds:.1f} s, {line.figure}"
    return line


# ----------------------------------------------------------------------------- driver


def _guard(name: str, fn: Callable[[], Line | list[Line]]) -> list[Line]:
    """Run one check; an exception is that check's fail line, never the end of the report."""
    try:
        got = fn()
    except Exception as exc:  # every failure becomes a report line
        traceback.print_exc()
        return [Line(name, "fail", f"{type(exc).__name__}: {str(exc)[:160]}")]
    return got if isinstance(got, list) else [got]


def run_checks(device: str, stages: Path | None, out: Path, work: Path) -> list[Line]:
    """Every check in order, the end-to-end ones first; reports and logs in ``out``, bulky
    files (stages built here, checkpoints, benchmark blocks) in ``work``."""
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    lines: list[Line] = []

    started = time.perf_counter()

    def add(name: str, fn: Callable[[], Line | list[Line]]) -> list[Line]:
        t0 = time.perf_counter()
        got = _guard(name, fn)
        for line in got:
            line.seconds = (time.perf_counter() - t0) / len(got)
            print(line.text(), flush=True)
            lines.append(line)
        # rewritten after every check: a run stopped by a timeout still leaves its lines
        write_report(lines, out, time.perf_counter() - started, complete=False)
        return got

    cuda = device == "cuda" and torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    add("environment", lambda: check_environment(device))
    if device == "cuda" and not cuda:
        return lines  # asked for the GPU, none here: the report says so and nothing else runs
    add("imports", check_imports)
    got: dict = {}

    def config_line() -> Line:
        got["cfg"] = gpu_config(dev)
        return Line("config", "pass", f"conf/gpu.yaml{' + CPU_OVERRIDES' if not cuda else ''}")

    if add("config", config_line)[0].status != "pass":
        return lines  # no pydantic (carried wheels missing?) or a bad preset: nothing can run
    lines.pop()  # the config loaded: no line of its own
    cfg = got["cfg"]
    build = stages is None or not (stages / "blocks").is_dir()
    stages = stages or work / "stages"

    def stage_line() -> Line:
        if build:
            prepare_stages(cfg, stages)
        return check_stages(cfg, stages, "built here" if build else "carried")

    if add("stages", stage_line)[0].status != "pass":
        return lines  # nothing to train on, or stale stages: every later figure would mislead
    manifest = json.loads((stages / "blocks" / "manifest.json").read_text())
    vocab = int(manifest["stats"]["vocab_size"])
    unigram = train_unigram_entropy(stages / "blocks")

    def train_line() -> Line:
        line, got["ckpt"], got["windows"] = check_train_run(dev, stages, out, work, unigram)
        return line

    add("train entry point", train_line)
    ckpt = got.get("ckpt")
    for name, fn in (("evaluator bound", lambda: check_bound(dev, stages, ckpt, unigram)),
                     ("evaluator gpu = cpu", lambda: check_eval_match(dev, stages, ckpt)),
                     ("samples", lambda: check_samples(dev, stages, ckpt))):  # fmt: skip
        add(name, fn if ckpt is not None else lambda n=name: Line(n, "fail", "no checkpoint"))
    eager: list[dict] = []
    if cuda:
        add("no host sync", lambda: check_sync_and_idle(cfg, stages, work, vocab, eager))
        add("compiled vs eager", lambda: judge_compiled(eager, got.get("windows") or []))
    else:
        add("no host sync", lambda: [_skip("no host sync"), _skip("gpu idle"),
                                     _skip("compiled vs eager", "no CUDA: compile is "
                                           "judged on the GPU only")])  # fmt: skip
    add("pytest -m gpu", lambda: check_pytest(device, out))
    add("sdpa kernel", lambda: check_sdpa_kernel(dev))
    add("bench eager", lambda: check_bench(dev, work))
    for preset in ("small", "medium"):
        name = f"largest batch {preset}"
        add(name, (lambda p=preset: check_largest_batch(p)) if cuda else lambda n=name: _skip(n))
    return lines


def write_report(lines: list[Line], out: Path, wall: float, complete: bool = True) -> None:
    """``report.json`` and ``report.md`` in ``out``; ``complete`` is False while checks run."""
    env = next((ln.data for ln in lines if ln.name == "environment"), {})
    report = {"environment": env, "wall_s": wall, "complete": complete,
              "lines": [asdict(ln) for ln in lines],
              "ok": complete and all(ln.status != "fail" for ln in lines)}  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    head = (f"GPU check: card {env.get('card')}, torch {env.get('torch')}, "
            f"CUDA {env.get('cuda')}, Python {env.get('python')}, "
            f"device {env.get('device')}, {wall:.0f} s\n\n")  # fmt: skip
    if env.get("device") != "cuda":
        head += "CPU dry run: tiny sizes, no figure here is a GPU measurement.\n\n"
    if not complete:
        head += f"INCOMPLETE: stopped (or still running) after {len(lines)} lines.\n\n"
    rows = ["| check | result | figure | s |", "|---|---|---|---|"]
    for ln in lines:
        status = f"skipped ({ln.reason})" if ln.status == "skipped" else ln.status
        rows.append(f"| {ln.name} | {status} | {ln.figure.replace('|', '/')} | {ln.seconds:.0f} |")
    (out / "report.md").write_text(head + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--stages", type=Path, default=None, help="carried stages (built if absent)")
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    p.add_argument("--prepare-only", action="store_true", help="build --stages for conf/gpu.yaml")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.prepare_only:
        dest = args.stages or Path(".gpu/stages")
        print(json.dumps(prepare_stages(gpu_config("cuda"), dest)))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"torch {torch.__version__} sees no CUDA device: the GPU check cannot run here "
              "(use --device cpu for the dry run)")  # fmt: skip
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        lines = run_checks(args.device, args.stages, args.out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_report(lines, args.out, time.perf_counter() - start)
    print(f"report: {args.out / 'report.md'}, {args.out / 'report.json'}")
    return 1 if any(ln.status == "fail" for ln in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
