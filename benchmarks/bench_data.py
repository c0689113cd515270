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

Usage: ``.venv/bin/python benchmarks/bench_data.py [--max-documents N] [--repeats R] [--root DIR]``.
numpy work is single-threaded, so "per core" is per process; the tokenizer uses every core
(``TOKENIZERS_PARALLELISM``), for both the stage and the raw baseline.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-documents", type=int, default=None)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="maskdiff-bench-"))
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
