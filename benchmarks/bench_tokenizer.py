"""Tokenizer training on a sample: what a smaller ``tokenizer.train_max_mb`` costs in compression.

Ingests the whole built-in ``stdlib`` corpus once, then trains the byte-level BPE of the
tokenizer stage on samples of its train split of growing size (``--sizes``, MB; ``all`` = no
limit) and measures each tokenizer on the same held-out text (the validation split, up to
``--heldout-mb``):

* ``train s``: the tokenizer stage's wall time (the sampling pass included);
* ``bytes/token``: held-out UTF-8 bytes per token (compression, higher is better);
* ``unigram bpb``: bits per byte of the held-out text under a unigram model of its own tokens
  (plug-in entropy of the token counts x tokens / bytes): the best a context-free model could do
  with this tokenizer, a tokenizer-quality figure in the units the project reports;
* ``vs all``: both figures relative to the tokenizer trained on everything.

Prints a markdown table; asserts nothing. Usage (about 1 minute on 2 cores)::

    .venv/bin/python benchmarks/bench_tokenizer.py [--sizes 0.5,1,2,4,8,16,all] [--vocab 8192]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from maskdiff.config import DataConfig, TokenizerConfig
from maskdiff.data.ingest import ingest_documents
from maskdiff.data.stage import list_shards, read_manifest
from maskdiff.data.tokenizer import load_tokenizer, train_tokenizer


def heldout_texts(documents: Path, max_mb: float) -> list[str]:
    """Validation documents, in stage order, up to ``max_mb`` MB of UTF-8."""
    out: list[str] = []
    total = 0
    for shard in list_shards(documents, "validation"):
        for text in pq.read_table(shard, columns=["text"]).column(0).to_pylist():
            out.append(text)
            total += len(text.encode("utf-8", "surrogatepass"))
            if total >= max_mb * 1e6:
                return out
    return out


def compression(tokenizer: Path, texts: list[str]) -> tuple[float, float]:
    """(bytes per token, unigram bits per byte) of ``texts`` under the tokenizer."""
    tok = load_tokenizer(tokenizer)
    ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in tok.encode(texts)])
    n_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    counts = np.bincount(ids).astype(float)
    p = counts[counts > 0] / len(ids)
    bits_per_token = float(-(p * np.log2(p)).sum())
    return n_bytes / len(ids), bits_per_token * len(ids) / n_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="0.5,1,2,4,8,16,all")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--heldout-mb", type=float, default=4.0)
    p.add_argument("--root", type=Path, default=None, help="keep the stages here (default: temp)")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = args.root or Path(tempfile.mkdtemp(prefix="bench-tok-"))
    data = DataConfig(source="builtin", builtin="stdlib")  # every file; 5% validation
    start = time.perf_counter()
    docs = ingest_documents(data, root).path
    stats = read_manifest(docs)["stats"]
    print(f"corpus: stdlib, every file; ingest {time.perf_counter() - start:.0f} s; {stats}")
    texts = heldout_texts(docs, args.heldout_mb)
    n_held = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    print(f"held out: {len(texts)} validation documents, {n_held / 1e6:.1f} MB; "
          f"vocab {args.vocab}\n")  # fmt: skip
    rows = []
    whole: tuple = ()
    for size in args.sizes.split(","):
        limit = None if size == "all" else float(size)
        cfg = TokenizerConfig(kind="bpe", vocab_size=args.vocab, train_max_mb=limit)
        t0 = time.perf_counter()
        res = train_tokenizer(cfg, docs, root / f"tok-{size}")
        seconds = time.perf_counter() - t0
        manifest = read_manifest(res.path)["stats"]
        sample = manifest.get("train_sample", {})
        whole = whole or (sample.get("of_bytes"), sample.get("of_documents"))
        mb = sample["bytes"] / 1e6 if sample else (whole[0] or math.nan) / 1e6
        bpt, bpb = compression(res.path, texts)
        rows.append((size, mb, sample.get("documents", whole[1]), seconds, bpt, bpb))
        print(f"  {size}: {mb:.1f} MB in {seconds:.1f} s, {bpt:.3f} bytes/token, {bpb:.4f} bpb",
              flush=True)  # fmt: skip
    ref = rows[-1]
    print("\n| train_max_mb | sample MB | documents | train s | bytes/token | unigram bpb | "
          "bytes/token vs all | bpb vs all |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for size, mb, n, seconds, bpt, bpb in rows:
        print(f"| {size} | {mb:.1f} | {n} | {seconds:.1f} | {bpt:.3f} | {bpb:.4f} | "
              f"{bpt / ref[4] - 1:+.2%} | {bpb / ref[5] - 1:+.2%} |")  # fmt: skip


if __name__ == "__main__":
    main()
