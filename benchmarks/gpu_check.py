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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train

from maskdiff.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("prefect", "mlflow", "pandera", "datasets")
LIBRARY = ["config", "model", "loss", "train", "checkpoint", "evaluate", "sampling", "heldout",
           "runtime", "scoring", "data.loader", "data.contracts", "data.evalset", "data.stage",
           "data.tokenizer"]  # fmt: skip
# The CPU dry run: conf/gpu.yaml shrunk to seconds (same code paths, tiny sizes).
CPU_OVERRIDES = [
    "data.max_documents=24", "data.val_fraction=0.25", "data.seq_len=64",
    "tokenizer.vocab_size=320", "model.preset=tiny", "model.max_seq_len=64",
    "runtime.device=cpu", "runtime.precision=fp32", "train.batch_size=8", "train.max_steps=12",
    "train.warmup_steps=2", "train.log_every=4", "train.compile=false", "eval.max_blocks=8",
    "sample.steps=8",
]  # fmt: skip
MFU_GOAL = 0.50


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


def gpu_config(device: str, stages: Path | None = None) -> Config:
    """conf/gpu.yaml, shrunk to the dry run on a CPU."""
    return load_config(ROOT / "conf" / "gpu.yaml", CPU_OVERRIDES if device == "cpu" else [])


# ----------------------------------------------------------------------------- stages


def prepare_stages(cfg: Config, dest: Path) -> dict[str, str]:
    """Build documents -> tokenizer -> blocks -> corruptions from the built-in corpus and copy
    the three stages training needs to ``dest/{tokenizer,blocks,corruptions}`` (needs the whole
    package: run it on the workstation)."""
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
    return {name: str(dest / name) for name in ("tokenizer", "blocks", "corruptions")}


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
    """``pytest -m gpu``: skipped (with the reason) when there is no CUDA device."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "--noconftest", "-p",
           "no:cacheprovider", "-rs", str(ROOT / "tests" / "test_gpu.py")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    (out / "pytest-gpu.txt").write_text(proc.stdout + proc.stderr)
    tail = [s for s in proc.stdout.strip().splitlines() if s.strip()]
    summary = tail[-1].strip("= ") if tail else "no output"
    if proc.returncode != 0:
        return Line("pytest -m gpu", "fail", summary + " (see pytest-gpu.txt)")
    if "passed" not in summary and not torch.cuda.is_available():
        return Line("pytest -m gpu", "skipped", summary, reason="no CUDA")
    if "skipped" in summary:
        return Line("pytest -m gpu", "fail", summary + ": a GPU test skipped on a GPU")
    return Line("pytest -m gpu", "pass", summary)


def check_sdpa_kernel(device: str) -> Line:
    """The attention kernel SDPA runs in bf16, read from the profiler: ``small`` at L = 1024 on
    a GPU; ``tiny`` at L = 64 on a CPU (the same reading, of the CPU's kernels)."""
    from torch.profiler import ProfilerActivity, profile

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


def _short_train(cfg: Config, blocks: Path, out: Path, vocab: int, window: int,
                 on_first: Callable[[], None], on_second: Callable[[], None]) -> None:  # fmt: skip
    """``maskdiff.train.train`` for 2 windows: ``on_first`` after the first metric window,
    ``on_second`` as the second is reported (before its sync)."""
    from maskdiff import train as train_mod

    cfg = cfg.model_copy(deep=True)
    cfg.train.max_steps, cfg.train.log_every, cfg.train.compile = 3 * window, window, False
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
        train_mod.train(cfg, blocks, out, vocab_size=vocab, resume=False)
    finally:
        train_mod._Meter.report = report  # type: ignore[method-assign]
        on_second() if len(seen) < 2 else None


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


def check_sync_and_idle(cfg: Config, stages: Path, work: Path, vocab: int) -> list[Line]:
    """No host sync between two metric windows (``set_sync_debug_mode("error")``), and the GPU
    idle share of that stretch from the profiler's kernel timeline."""
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

    window = 10
    try:
        _short_train(cfg, stages / "blocks", work / "sync-run", vocab, window, first, second)
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


def check_bench(device: str, compiled: bool, work: Path) -> Line:
    """bench_train's loop and bare step: small at L=1024 in bf16 on a GPU, tiny on a CPU."""
    name = f"bench {'compiled' if compiled else 'eager'}"
    if device == "cpu":
        if compiled:
            return _skip(name, "no CUDA: compile is timed on the GPU only")
        argv = ["--config", "tiny", "--device", "cpu", "--precision", "fp32", "--batch", "4",
                "--seq-len", "32", "--vocab", "256", "--window", "3"]  # fmt: skip
    else:
        argv = ["--config", "small", "--device", "cuda", "--precision", "bf16", "--batch", "32",
                "--seq-len", "1024", "--vocab", "50257", "--window", "10"]  # fmt: skip
    args = bench_train.parser().parse_args(argv + (["--compile"] if compiled else []))
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        fig = bench_train.measure(args, Path(tmp))
    text = (f"{fig['loop_tokens_per_s']:,.0f} tok/s, MFU {fig['mfu']:.1%} of "
            f"{fig['peak_tflops']:.3g} TFLOP/s, peak {fig['memory_gb']:.1f} GB")  # fmt: skip
    if device == "cuda":
        text += f", gap to {MFU_GOAL:.0%}: {max(0.0, MFU_GOAL - fig['mfu']) * 100:.1f} points"
    return Line(name, "pass", text, data=fig)


def _fits(preset: str, batch: int, vocab: int = 50257, L: int = 1024) -> float | None:
    """tokens/s of 3 bare bf16 steps at this batch, or None when it runs out of memory."""
    argv = ["--config", preset, "--device", "cuda", "--precision", "bf16", "--batch", str(batch),
            "--seq-len", str(L), "--vocab", str(vocab)]  # fmt: skip
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


def check_largest_batch(preset: str) -> Line:
    """The largest batch of ``preset`` at L = 1024 in bf16 (3 bare steps per try)."""
    lo, rate = largest_fitting(lambda b: _fits(preset, b))
    if not lo or rate is None:
        return Line(f"largest batch {preset}", "fail", "batch 8 does not fit at L=1024")
    return Line(f"largest batch {preset}", "pass", f"B={lo} at L=1024, {rate:,.0f} tok/s",
                data={"batch": lo, "tokens_per_s": rate})  # fmt: skip


def check_train_run(device: str, stages: Path, out: Path, work: Path) -> tuple[Line, Path | None]:
    """``python -m maskdiff.train`` on the carried stages with conf/gpu.yaml (tiny on a CPU); the
    log goes to ``out``, the checkpoints (GBs for ``small``) to ``work``."""
    sets = CPU_OVERRIDES if device == "cpu" else []
    run_dir = work / "train-run"
    cmd = [sys.executable, "-m", "maskdiff.train", "--config", str(ROOT / "conf" / "gpu.yaml"),
           "--blocks", str(stages / "blocks"), "--corruptions", str(stages / "corruptions"),
           "--out", str(run_dir), "--no-resume"]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (out / "train-run.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Line("train entry point", "fail", last[:160] + " (see train-run.log)"), None
    rows = [json.loads(s) for s in proc.stdout.splitlines() if s.startswith("{")]
    metrics = [r for r in rows if "loss" in r]
    first, last = metrics[0], metrics[-1]
    ckpt = Path(rows[-1]["checkpoint"])
    ok = last["loss"] < first["loss"]
    text = (f"{last['step']} steps in {wall:.0f} s, loss {first['loss']:.2f} -> "
            f"{last['loss']:.2f}, {last['tokens_per_s']:,.0f} tok/s, MFU {last['mfu']:.1%}, "
            f"peak {last['memory_gb']:.1f} GB")  # fmt: skip
    data = {"wall_s": wall, "first": first, "last": last}
    return Line("train entry point", "pass" if ok else "fail", text, data=data), ckpt


def check_eval_and_samples(device: str, stages: Path, ckpt: Path) -> list[Line]:
    """The evaluator's continuous bound on the validation split, and decoded samples."""
    from maskdiff.checkpoint import load_model
    from maskdiff.data.tokenizer import load_tokenizer
    from maskdiff.evaluate import evaluate_stage
    from maskdiff.sampling import generate
    from maskdiff.schedule import make_schedule

    model, cfg = load_model(ckpt, device=device)
    start = time.perf_counter()
    res = evaluate_stage(model, stages / "blocks", stages / "corruptions", "validation", cfg.eval,
                         device=device)  # fmt: skip
    est = res.estimates[0]
    bound = Line("evaluator bound", "pass" if est.nats_per_token == est.nats_per_token else "fail",
                 f"{est.nats_per_token:.3f} +- {est.se:.3f} nats/token on {est.n_blocks} blocks "
                 f"({time.perf_counter() - start:.1f} s)",
                 data={"nats_per_token": est.nats_per_token, "se": est.se})  # fmt: skip
    tok = load_tokenizer(stages / "tokenizer")
    sched = make_schedule(cfg.diffusion)
    start = time.perf_counter()
    out = generate(model, sched, model.vocab_size, cfg.sample, cfg.data.seq_len, device=device)
    text = tok.decode(out.tokens[0].tolist())
    fine = out.tokens.shape[0] == cfg.sample.n_samples and not (out.tokens >= model.mask_id).any()
    sample = Line("samples", "pass" if fine else "fail",
                  f"{out.tokens.shape[0]} x {out.tokens.shape[1]} tokens in "
                  f"{time.perf_counter() - start:.1f} s: {text[:60]!a}",
                  data={"first": text[:400]})  # fmt: skip
    return [bound, sample]


# ----------------------------------------------------------------------------- driver


def _guard(name: str, fn: Callable[[], Line | list[Line]]) -> list[Line]:
    """Run one check; an exception is that check's fail line, never the end of the report."""
    try:
        got = fn()
    except Exception as exc:  # every failure becomes a report line
        traceback.print_exc()
        return [Line(name, "fail", f"{type(exc).__name__}: {str(exc)[:160]}")]
    return got if isinstance(got, list) else [got]


def _stage_facts(stages: Path, how: str) -> str:
    """``how`` (built here / carried), and the training blocks the manifest counts."""
    try:
        stats = json.loads((stages / "blocks" / "manifest.json").read_text())["stats"]
    except (OSError, KeyError, ValueError):
        return f"{how}: no readable blocks manifest in {stages}"
    train = stats["splits"]["train"]
    return (f"{how}: {train['blocks']} train blocks of L={stats['seq_len']}, "
            f"{train['tokens']:,} tokens, m={stats['vocab_size']}")  # fmt: skip


def run_checks(device: str, stages: Path | None, out: Path, work: Path) -> list[Line]:
    """Every check in order; reports and logs in ``out``, bulky files (stages built here,
    checkpoints, benchmark blocks) in ``work``."""
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    lines: list[Line] = []

    started = time.perf_counter()

    def add(name: str, fn: Callable[[], Line | list[Line]]) -> None:
        t0 = time.perf_counter()
        got = _guard(name, fn)
        for line in got:
            line.seconds = (time.perf_counter() - t0) / len(got)
            print(line.text(), flush=True)
            lines.append(line)
        # rewritten after every check: a run stopped by a timeout still leaves its lines
        write_report(lines, out, time.perf_counter() - started, complete=False)

    cuda = device == "cuda" and torch.cuda.is_available()
    cfg = gpu_config("cuda" if cuda else "cpu")
    add("environment", lambda: check_environment(device))
    if device == "cuda" and not cuda:
        return lines  # asked for the GPU, none here: the report says so and nothing else runs
    add("imports", check_imports)
    build = stages is None or not (stages / "blocks").is_dir()
    stages = stages or work / "stages"

    def stage_line() -> Line:
        if build:
            prepare_stages(cfg, stages)
        return Line("stages", "pass", _stage_facts(stages, "built here" if build else "carried"))

    add("stages", stage_line)
    add("pytest -m gpu", lambda: check_pytest(device, out))
    add("sdpa kernel", lambda: check_sdpa_kernel("cuda" if cuda else "cpu"))
    manifest = stages / "blocks" / "manifest.json"
    if not manifest.is_file():
        lines.append(Line("stages", "fail", f"no blocks stage in {stages}: nothing to train on"))
        return lines
    vocab = int(json.loads(manifest.read_text())["stats"]["vocab_size"])
    if cuda:
        add("no host sync", lambda: check_sync_and_idle(cfg, stages, work, vocab))
    else:
        add("no host sync", lambda: [_skip("no host sync"), _skip("gpu idle")])
    add("bench eager", lambda: check_bench(device if cuda else "cpu", False, work))
    add("bench compiled", lambda: check_bench(device if cuda else "cpu", True, work))
    for preset in ("small", "medium"):
        name = f"largest batch {preset}"
        add(name, (lambda p=preset: check_largest_batch(p)) if cuda else lambda n=name: _skip(n))
    got: dict[str, Path | None] = {}

    def train_line() -> Line:
        line, got["ckpt"] = check_train_run(device if cuda else "cpu", stages, out, work)
        return line

    add("train entry point", train_line)
    if got.get("ckpt") is not None:
        dev = device if cuda else "cpu"
        add("evaluator bound", lambda: check_eval_and_samples(dev, stages, got["ckpt"]))
    else:
        add("evaluator bound", lambda: [Line("evaluator bound", "fail", "no checkpoint")])
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
