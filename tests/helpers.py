"""Helpers shared by several test modules (pytest puts ``tests/`` on ``sys.path``).

* :func:`write_corpus`: blocks and corruptions of a learnable pattern, written as the contracts say;
* :func:`tiny_config`: a 2-layer model on CPU for the training tests;
* :func:`train_yaml` and :func:`cli_command`: a small ``maskdiff run`` on the markov corpus;
* :func:`markov_block_floor`: the least NLL any model can score on markov blocks, and
  :func:`check_markov_scores`: the evaluator's numbers against it.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from maskdiff.config import Config
from maskdiff.data.contracts import blocks_schema, corruptions_schema, pack_mask, shard_name

L, V = 16, 8  # the block length and real vocabulary of write_corpus and tiny_config


def write_corpus(
    root: Path,
    n_blocks: int = 96,
    seq_len: int = L,
    vocab: int = V,
    shard_rows: int = 32,
    draws: int = 2,
    seed: int = 0,
    strides: tuple[int, ...] = (1, 2),
) -> tuple[Path, Path]:
    """Blocks of a learnable pattern (x_{l+1} = x_l + s mod m, one stride s per block, the first
    stride 80% of the time) and continuous-time corruptions (T = 0, ``draws`` draws per block),
    written as the stages' contracts say. Returns (blocks folder, corruptions folder)."""
    rng = np.random.default_rng(seed)
    p = [0.8] + [0.2 / (len(strides) - 1)] * (len(strides) - 1) if len(strides) > 1 else [1.0]
    steps = rng.choice(strides, size=(n_blocks, 1), p=p)
    start = rng.integers(0, vocab, size=(n_blocks, 1))
    ids = ((start + steps * np.arange(seq_len)[None, :]) % vocab).astype(np.int32)
    blocks_dir, corr_dir = root / "blocks", root / "corruptions"
    blocks_dir.mkdir(parents=True, exist_ok=True)
    corr_dir.mkdir(parents=True, exist_ok=True)
    for shard, lo in enumerate(range(0, n_blocks, shard_rows)):
        hi = min(n_blocks, lo + shard_rows)
        bid = np.arange(lo, hi, dtype=np.int64)
        table = pa.table(
            {
                "block_id": bid,
                "input_ids": pa.FixedSizeListArray.from_arrays(
                    pa.array(ids[lo:hi].ravel()), seq_len
                ),
                "n_bytes": np.full(hi - lo, seq_len, dtype=np.int32),
            },
            schema=blocks_schema(seq_len),
        )
        pq.write_table(table, blocks_dir / shard_name("train", shard))
        n = (hi - lo) * draws
        t = rng.uniform(0.01, 1.0, size=n).astype(np.float32)
        mask = rng.random((n, seq_len)) < t[:, None]
        packed = pack_mask(mask)
        corr = pa.table(
            {
                "block_id": np.tile(bid, draws),
                "t": t,
                "T": np.zeros(n, dtype=np.int32),
                "step": np.zeros(n, dtype=np.int32),
                "draw": np.repeat(np.arange(draws, dtype=np.int32), hi - lo),
                "mask": pa.array([bytes(r) for r in packed], type=pa.binary(packed.shape[1])),
            },
            schema=corruptions_schema(seq_len),
        )
        pq.write_table(corr, corr_dir / shard_name("train", shard))
    return blocks_dir, corr_dir


def tiny_config(**train: object) -> Config:
    """A 2-layer, d=32 model on CPU (1 thread) with online masks; ``train`` overrides the
    ``train`` section (defaults: batch 16, 50 steps, lr 1e-2, a log every step)."""
    return Config.model_validate(
        {
            "data": {"seq_len": L},
            "model": {"preset": "custom", "n_layers": 2, "d_model": 32, "n_heads": 2,
                      "max_seq_len": 32},
            "corruption": {"mode": "online"},
            "runtime": {"device": "cpu", "num_threads": 1, "peak_tflops": 0.1},
            "train": {"batch_size": 16, "max_steps": 50, "lr": 1e-2, "warmup_steps": 5,
                      "log_every": 1, "checkpoint_every": 1000, "ema": 0.9, **train},
        }
    )  # fmt: skip


# A pipeline run of a few seconds a stage (the crash and concurrency tests).
TRAIN_YAML = """\
name: {name}
ar_baseline: false
data:
  source: builtin
  builtin: markov
  seq_len: 32
  shard_rows: 64
  val_fraction: 0.1
  test_fraction: 0.1
  root: {root}
  markov: {{vocab_size: 8, order: 1, n_documents: 120, doc_length: 64}}
tokenizer: {{kind: char}}
corruption: {{eval_draws: 2}}
diffusion: {{T: [4, 16]}}
model: {{preset: custom, n_layers: 2, d_model: 32, n_heads: 2, max_seq_len: 64}}
train: {{batch_size: 8, max_steps: {max_steps}, warmup_steps: 2, log_every: 10,
        checkpoint_every: 20}}
runtime: {{device: cpu, num_threads: 1, peak_tflops: 0.1}}
tracking: {{system_metrics: false}}
"""


def train_yaml(root: Path, name: str = "crash-train", max_steps: int = 600) -> str:
    """The small training run's config (YAML text) with its data root at ``root``."""
    return TRAIN_YAML.format(root=root, name=name, max_steps=max_steps)


def cli_command(config: Path) -> list[str]:
    """``maskdiff run`` of the train stage on ``config``, without progress bars."""
    return [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "--config",
        str(config),
        "--stage",
        "train",
        "--no-progress",
    ]


def markov_block_floor(documents: Path, blocks: Path, split: str, n_blocks: int) -> float:
    """The least expected NLL, in nats per token, that any model scoring each block on its own
    can reach on the first ``n_blocks`` blocks of ``split`` of the builtin markov corpus
    (order 1, whole documents, one symbol one token, an EOS after each document).

    Given where a block's EOS tokens are, its other tokens are runs of the chain, each started
    from the stationary law pi (a document's first symbol, or a block's first token inside a
    document: the chain is stationary). A run of s symbols has entropy h0 + (s - 1) h, with
    h0 = H(pi) and h the entropy rate, both from the documents manifest; an EOS has none. So

        H(block | EOS positions) = h0 * (runs) + h * (symbols - runs),

    and by Gibbs' inequality E[-log q(block)] >= H(block | EOS positions) for every model q;
    an upper bound on -log q (the MDM's NELBO) is at least as large. The floor is the sum over
    the blocks divided by the tokens, n L (EOS counted, as the evaluator counts it).

    For a single block it can lie below the manifest's stream floor
    ``nll_floor_nats_per_token`` = (h0 + (n - 1) h) / (n + 1) (a block holding an EOS pays no
    h0 for the run it cuts short), and averaged over the n + 1 phases it lies above it.
    """
    manifest = json.loads((documents / "manifest.json").read_text())
    source, stats = manifest["config"], manifest["stats"]["markov"]
    assert source["builtin"] == "markov" and source["markov"]["order"] == 1, source
    assert source.get("chunk_chars") is None, "chunked documents do not start from pi"
    h, h0 = stats["entropy_rate_nats_per_symbol"], stats["initial_entropy_nats"]
    n = stats["doc_length"]
    assert np.isclose(stats["doc_entropy_nats"], h0 + (n - 1) * h, rtol=1e-12), stats
    eos = json.loads((blocks / "manifest.json").read_text())["stats"]["eos_id"]
    shards = sorted(blocks.glob(f"{split}-*.parquet"))
    column = pa.concat_tables([pq.read_table(s, columns=["input_ids"]) for s in shards])
    col = column.column("input_ids").combine_chunks()
    ids = col.flatten().to_numpy().reshape(-1, col.type.list_size)[:n_blocks]  # (n_blocks, L)
    assert len(ids) == n_blocks, (len(ids), n_blocks)
    is_eos = ids == eos
    run_start = np.ones_like(is_eos)
    run_start[:, 1:] = is_eos[:, :-1]  # the block's first token, or the token after an EOS
    cost = np.where(is_eos, 0.0, np.where(run_start, h0, h))
    return float(cost.sum() / ids.size)


def check_markov_scores(
    documents: Path, blocks: Path, scores: Mapping[str, float], split: str = "validation"
) -> dict[str, tuple[float, float, float]]:
    """Every MDM bound row and the AR NLL of ``scores`` (keys as the evaluator's ``to_dict``:
    ``nelbo.<row>.nats_per_token``, ``..._se``, ``ar.nats_per_token``...) is at least the
    :func:`markov_block_floor` of the blocks it covers minus 3 standard errors, and below 10.

    Returns ``{row: (value, floor, se)}`` for the rows checked (``nelbo.continuous``, ...,
    ``ar``).
    """
    seq_len = json.loads((blocks / "manifest.json").read_text())["stats"]["seq_len"]
    covered = {
        key.removesuffix(".nats_per_token"): int(scores[key.replace("nats_per_token", "n_blocks")])
        for key in scores
        if key.startswith("nelbo.") and key.endswith(".nats_per_token")
    }
    if "ar.nats_per_token" in scores:
        covered["ar"] = int(scores["ar.n_tokens"]) // seq_len
    out, wrong = {}, []
    for row, n_blocks in covered.items():
        floor = markov_block_floor(documents, blocks, split, n_blocks)
        value, se = scores[f"{row}.nats_per_token"], scores[f"{row}.nats_per_token_se"]
        out[row] = (value, floor, se)
        if not (floor - 3 * se <= value < 10 and math.isfinite(se) and se > 0):
            wrong.append(f"{row}: {value:.4f} ± {se:.4f} nats/token, floor {floor:.4f}")
    assert not wrong, "below the entropy floor (or no SE):\n" + "\n".join(wrong)
    return out
