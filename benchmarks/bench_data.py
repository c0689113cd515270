"""Data-stage benchmarks: prints figures, asserts nothing.

1. Tokenization: the blocks stage (read documents parquet, encode, join with EOS, pack, write
   zstd shards) against a bare ``Tokenizer.encode_batch`` over the same texts on the same cores,
   as the ratio raw_time / stage_time (target >= 0.9), on the ``stdlib`` corpus.
2. Corruptions: token-corruptions per second per core for the Philox + packbits kernel alone and
   for the whole corruptions stage (target >= 50 million), and bytes on disk per corruption.
3. Validation: each stage's pandera validation time as a fraction of its build time (<= 10%);
   the corruptions stage and every validation run ``--repeats`` times and the best time counts.
   A fresh corruptions stage is validated in memory while it is built (the figure against the
   target); re-validating a published folder (``validate_stage``, run on reused stages) reads
   and decompresses every shard and is printed too.

4. Scaling (``--workers 1,2``, run instead of 1-3): the blocks (tokenization) and corruptions
   stages built by the pipeline's tasks in a flow on the thread runner and on the Dask runner
   (a local cluster) with each number of workers, wall time and speed-up over 1 worker (goal
   >= 1.6x on 2 cores). The corpus is the ``default`` preset's (300 stdlib files, BPE 2048),
   in documents shards of ``--doc-shard-mb`` and blocks shards of ``--shard-rows``, so that
   there are shards to spread; training corruptions are precomputed (1 draw a block). The
   cluster starts before the clock does (its start is printed apart); best of ``--repeats``.

Usage: ``.venv/bin/python benchmarks/bench_data.py [--max-documents N] [--repeats R] [--root DIR]``
and ``... --workers 1,2 [--runners thread,dask]``.
numpy work is single-threaded, so "per core" is per process; the tokenizer uses every core
(``TOKENIZERS_PARALLELISM``), for both the stage and the raw baseline.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from maskdiff.config import CorruptionConfig, DataConfig, DiffusionConfig, TokenizerConfig
from maskdiff.data.blocks import _cached_tokenizer, build_blocks
from maskdiff.data.corrupt import build_corruptions, draw_masks
from maskdiff.data.ingest import ingest_documents
from maskdiff.data.stage import list_shards, read_manifest
from maskdiff.data.tokenizer import load_tokenizer, train_tokenizer
from maskdiff.data.validate import validate_stage


def _raw_encode_seconds(documents: Path, tokenizer: Path, fast: bool) -> tuple[float, int, int]:
    """Time of bare ``encode_batch`` (or ``encode_batch_fast``) over every document.

    Returns (seconds, tokens, UTF-8 bytes). Texts are read before the clock starts.
    """
    texts = [
        t
        for split in ("train", "validation", "test")
        for shard in list_shards(documents, split)
        for t in pq.read_table(shard, columns=["text"]).column(0).to_pylist()
    ]
    inner = load_tokenizer(tokenizer).inner
    encode = inner.encode_batch_fast if fast else inner.encode_batch
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 2048):
        tokens += sum(len(e.ids) for e in encode(texts[i : i + 2048], add_special_tokens=False))
    return time.perf_counter() - start, tokens, sum(len(t.encode()) for t in texts)


def bench_tokenization(
    root: Path, max_documents: int | None, repeats: int
) -> tuple[Path, dict[str, float]]:
    """Blocks stage vs bare encoding, alternated ``repeats`` times; the best time of each counts
    (the machine is shared, so single timings are noisy)."""
    data = DataConfig(builtin="stdlib", max_documents=max_documents, seq_len=128, root=str(root))
    t0 = time.perf_counter()
    docs = ingest_documents(data)
    t1 = time.perf_counter()
    tok = train_tokenizer(TokenizerConfig(vocab_size=8192), docs.path, root)
    t2 = time.perf_counter()
    stage, raw, fast = [], [], []
    for rep in range(repeats):
        _cached_tokenizer.cache_clear()  # a cold tokenizer, as the raw baseline gets
        blocks = build_blocks(data, docs.path, tok.path, root=root / f"rep{rep}", validate=False)
        stage.append(blocks.manifest["timings"]["build_s"])
        raw_s, tokens, n_bytes = _raw_encode_seconds(docs.path, tok.path, fast=False)
        raw.append(raw_s)
        fast.append(_raw_encode_seconds(docs.path, tok.path, fast=True)[0])
    stage_s, raw_s, fast_s = min(stage), min(raw), min(fast)
    print(
        f"stdlib corpus: {n_bytes / 1e6:.1f} MB, {tokens / 1e6:.2f} M tokens "
        f"(ingest {t1 - t0:.1f} s, BPE-8192 training {t2 - t1:.1f} s)"
    )
    print(
        f"tokenization (best of {repeats}): stage {stage_s:.2f} s "
        f"({n_bytes / stage_s / 1e6:.2f} MB/s); raw encode_batch {raw_s:.2f} s -> ratio "
        f"raw/stage = {raw_s / stage_s:.3f}; raw encode_batch_fast {fast_s:.2f} s -> ratio = "
        f"{fast_s / stage_s:.3f} (target >= 0.9)"
    )
    return blocks.path, {"documents": docs.path, "blocks_stage_s": stage_s}


def bench_corruption_kernel(n: int = 8192, seq_len: int = 128, repeats: int = 20) -> None:
    p = np.random.default_rng(0).random(n)
    draw_masks(0, 0, 0, n, seq_len, p)
    start = time.perf_counter()
    for d in range(repeats):
        draw_masks(0, d, 0, n, seq_len, p)
    rate = n * seq_len * repeats / (time.perf_counter() - start)
    print(
        f"corruption kernel (Philox + compare + packbits, L={seq_len}): "
        f"{rate / 1e6:.0f} M token-corruptions/s/core (target >= 50 M)"
    )


def bench_corruption_stage(blocks: Path, root: Path, repeats: int) -> tuple[Path, float]:
    """Build the corruptions stage ``repeats`` times (fresh folders), each validated in memory
    while it is built (as the pipeline does). Returns the folder of the first build and the best
    build time without its validation; prints the validation's share of it."""
    cfg = CorruptionConfig(eval_draws=8, discrete_steps=True, train_epochs=1, train_draws=1)
    diffusion = DiffusionConfig(T=[10, 100])
    builds = [
        build_corruptions(cfg, diffusion, blocks, root / f"corr{rep}") for rep in range(repeats)
    ]
    res = builds[0]
    splits = res.manifest["stats"]["splits"]
    rows = sum(s["rows"] for s in splits.values())
    tokens = sum(s["tokens"] for s in splits.values())
    disk = sum(s["bytes_on_disk"] for s in splits.values())
    timings = [b.manifest["timings"] for b in builds]
    build_s = min(t["build_s"] - t["validate_s"] for t in timings)
    validate_s = min(t["validate_s"] for t in timings)
    print(
        f"corruption stage (best of {repeats}): {rows} rows, {tokens / 1e6:.1f} M "
        "token-corruptions in "
        f"{build_s:.2f} s = {tokens / build_s / 1e6:.0f} M/s/core (incl. parquet writing); "
        f"{disk / rows:.1f} bytes on disk per corruption (L=128, 16 B raw mask)"
    )
    print(
        f"validation of corruptions while building (best of {repeats}): "
        f"{res.manifest['stats']['validated']['rows']} rows in {validate_s:.3f} s = "
        f"{100 * validate_s / build_s:.1f}% of the stage's {build_s:.3f} s (target <= 10%)"
    )
    return res.path, build_s


def bench_validation(
    stage_dirs: dict[str, Path], build_seconds: dict[str, float], repeats: int
) -> None:
    """Each stage's validation, best of ``repeats`` runs, against its (best) build time."""
    for name, folder in stage_dirs.items():
        reports = [validate_stage(folder) for _ in range(repeats)]
        seconds = min(r.seconds for r in reports)
        frac = seconds / build_seconds[name]
        reread = name == "corruptions"  # its build validated in memory (printed above)
        what = "re-validation of the published folder" if reread else "validation"
        note = "reads and decompresses every shard; run on reused stages" if reread else "target"
        print(
            f"{what} of {name} (best of {repeats}): {reports[0].rows} rows in "
            f"{seconds:.3f} s = {100 * frac:.1f}% of the stage's {build_seconds[name]:.3f} s "
            f"({note}{' <= 10%' if not reread else ''})"
        )


def data_stages_flow() -> Any:
    """A flow that builds the blocks and corruptions stages as the pipeline does (tasks mapped
    over its task runner) and returns their wall times and hashes."""
    from prefect import flow, task

    from tasks import data as data_tasks

    @task
    def ready(i: int) -> int:
        return i

    @flow(name="bench-data-stages")
    def data_stages(
        data: DataConfig,
        corruption: CorruptionConfig,
        diffusion: DiffusionConfig,
        documents: str,
        tokenizer: str,
        root: str,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        for future in ready.map(range(4)):  # a local Dask cluster starts at the first task
            future.result()
        t0 = time.perf_counter()
        blocks = data_tasks.build_blocks(data, documents, tokenizer, root)
        t1 = time.perf_counter()
        corr = data_tasks.corrupt(corruption, diffusion, str(blocks.path), root)
        t2 = time.perf_counter()
        return {
            "start": t0 - started,
            "tokenization": t1 - t0,
            "corruption": t2 - t1,
            "both": t2 - t0,
            "hashes": (blocks.content_hash, corr.content_hash),
            "rows": sum(s["rows"] for s in corr.manifest["stats"]["splits"].values()),
        }

    return data_stages


def bench_scaling(args: argparse.Namespace, root: Path) -> None:
    """Wall time of tokenization and corruption per runner and number of workers."""
    from flows.runners import task_runner
    from maskdiff.config import RuntimeConfig
    from maskdiff.data import ingest

    ingest.DOC_SHARD_BYTES = int(args.doc_shard_mb * (1 << 20))  # several shards to spread
    data = DataConfig(builtin="stdlib", max_documents=args.max_documents or 300, seq_len=128,
                      val_fraction=0.02, test_fraction=0.02, shard_rows=args.shard_rows,
                      root=str(root))  # fmt: skip
    docs = ingest_documents(data)
    tok = train_tokenizer(TokenizerConfig(vocab_size=2048), docs.path, root)
    corruption = CorruptionConfig(eval_draws=8, discrete_max_blocks=8)  # precomputed train too
    diffusion = DiffusionConfig(schedule="cosine", T=[10, 100])
    shards = docs.manifest["stats"]["shards"]
    mb = docs.manifest["stats"]["bytes"]["train"] / 1e6
    print(f"corpus: {data.max_documents} stdlib files, {mb:.1f} MB of training text; "
          f"documents shards {shards}; blocks shards of {args.shard_rows} rows; "
          f"{os.cpu_count()} cores")  # fmt: skip
    flow_fn = data_stages_flow()
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for runner in args.runners.split(","):
        for workers in [int(w) for w in args.workers.split(",")]:
            for rep in range(args.repeats):
                runtime = RuntimeConfig(task_runner=runner, max_workers=workers)
                out = flow_fn.with_options(task_runner=task_runner(runtime))(
                    data, corruption, diffusion, str(docs.path), str(tok.path),
                    str(root / f"{runner}-{workers}-{rep}"),
                )  # fmt: skip
                print(f"  {runner} x{workers} run {rep}: start {out['start']:.2f} s, "
                      f"tokenization {out['tokenization']:.2f} s, corruption "
                      f"{out['corruption']:.2f} s ({out['rows']} rows), hashes {out['hashes']}",
                      flush=True)  # fmt: skip
                key = (runner, workers)
                if key not in best or out["both"] < best[key]["both"]:
                    best[key] = out
    hashes = {out["hashes"] for out in best.values()}
    print(f"stages identical across runners and workers: {len(hashes) == 1}")
    print(f"best of {args.repeats} | tokenization s | corruption s | both s | speed-up of both")
    for (runner, workers), out in best.items():
        one = best.get((runner, 1))
        gain = f"{one['both'] / out['both']:.2f}x" if one else "-"
        print(f"{runner} x{workers} | {out['tokenization']:.2f} | {out['corruption']:.2f} | "
              f"{out['both']:.2f} | {gain} (cluster/pool start {out['start']:.2f} s)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-documents", type=int, default=None)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", default=None, help="e.g. 1,2: the scaling benchmark only")
    parser.add_argument("--runners", default="thread,dask")
    parser.add_argument("--doc-shard-mb", type=float, default=0.5)
    parser.add_argument("--shard-rows", type=int, default=1024)
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="maskdiff-bench-"))
    if args.workers:
        # one tokenizer thread per worker; Prefect's store (a temporary server) under the root
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        bench_scaling(args, root)
        print(f"(stage folders under {root})")
        return
    blocks, info = bench_tokenization(root, args.max_documents, args.repeats)
    bench_corruption_kernel()
    corr, corr_s = bench_corruption_stage(blocks, root, args.repeats)
    dirs = {"documents": info["documents"], "blocks": blocks, "corruptions": corr}
    timings = {k: read_manifest(v)["timings"] for k, v in dirs.items()}
    # the documents stage validated itself while building: compare against the rest
    seconds = {k: t["build_s"] - t.get("validate_s", 0.0) for k, t in timings.items()}
    seconds["blocks"], seconds["corruptions"] = info["blocks_stage_s"], corr_s
    bench_validation(dirs, seconds, args.repeats)
    print(f"(stage folders under {root})")


if __name__ == "__main__":
    main()
