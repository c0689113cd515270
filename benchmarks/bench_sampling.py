"""Sampling benchmark: the frontier of sample quality against network calls, for every sampler.

    .venv/bin/python benchmarks/bench_sampling.py                  # markov, ~ minutes on 2 cores
    .venv/bin/python benchmarks/bench_sampling.py --corpus pydoc   # a text corpus: AR-judged
    .venv/bin/python benchmarks/bench_sampling.py --checkpoint MDM.pt --tokenizer TOK \
        --documents DOCS [--ar-checkpoint AR.pt --blocks BLOCKS]   # a model trained elsewhere

For each sampler (ancestral, confidence, remask) and each number of steps (8, 16, 32, 64, 128
and L) it draws unconditional samples and prints tokens per second (wall clock of the sampling
call), network calls and sample quality (:mod:`maskdiff.frontier`):

* on the built-in ``markov`` corpus, the exact judge: the samples' true NLL per token against the
  chain's entropy rate h (what a perfect sampler gets), their unigram entropy against the chain's,
  their EOS share against the corpus's; and for infilling (a middle gap in windows of held-out
  documents) the true conditional NLL of the filled gaps against the conditional entropy. The
  same samplers driven by the chain's exact denoiser ("exact denoiser" rows) show what each
  sampler costs when the network is perfect; the model's denoiser is compared with the exact one
  (KL per masked token) to show how well it learned the chain;
* on a text corpus, the AR baseline trained in the same run judges the samples (generative
  perplexity and NLL, labelled as such), next to its numbers on held-out blocks.

By default it builds the stages and trains the model itself (markov: a 12-symbol first-order
chain, blocks of 64, 400 steps of 32 blocks with the default preset's tiny model; text: the MDM
and the AR baseline with the same config, as ``bench_quality.py`` does). Everything goes under
``--root``; the rows are also written to ``bench_sampling-<corpus>.json`` there.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from maskdiff.config import Config, load_config
from maskdiff.data.blocks import build_blocks
from maskdiff.data.ingest import ingest_documents
from maskdiff.data.tokenizer import train_tokenizer
from maskdiff.frontier import (
    ARJudge,
    FrontierRow,
    InfillQuality,
    MarkovJudge,
    SampleQuality,
    frontier_markdown,
    infill_frontier,
    infill_templates,
    oracle_model,
    sampler_frontier,
)
from maskdiff.textgen import TextModel
from maskdiff.train import train

# The markov run: small enough to learn the chain in a few minutes on 2 CPU cores.
MARKOV = {
    "data.builtin": "markov",
    "data.max_documents": None,
    "data.val_fraction": 0.05,
    "data.test_fraction": 0.05,
    "data.markov.vocab_size": 12,
    "data.markov.order": 1,
    "data.markov.n_documents": 2000,
    "data.markov.doc_length": 256,
    "data.seq_len": 64,
    "tokenizer.kind": "char",
    "tokenizer.vocab_size": 64,
    "train.max_steps": 400,
    "train.batch_size": 32,
}


def corpus_config(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {"data.root": str(Path(args.root) / "data"), "train.eval_every": 0}
    if args.corpus == "markov":
        overrides.update(MARKOV)
    elif args.corpus != "default":
        overrides["data.builtin"] = args.corpus
    if args.max_steps:
        overrides["train.max_steps"] = args.max_steps
    for item in args.set:  # last: the command line wins
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return load_config(args.preset, overrides)


def build_and_train(cfg: Config, root: Path, kinds: tuple[str, ...]) -> dict[str, Any]:
    """Documents, tokenizer and blocks stages, then each model kind trained on the blocks (in a
    folder named by a hash of its config: a finished run of the same config is reused)."""
    start = time.perf_counter()
    docs = ingest_documents(cfg.data, cfg.data.root)
    tok = train_tokenizer(cfg.tokenizer, docs.path, cfg.data.root)
    blocks = build_blocks(cfg.data, docs.path, tok.path, cfg.data.root)
    stats = blocks.manifest["stats"]
    out: dict[str, Any] = {"documents": docs.path, "tokenizer": tok.path, "blocks": blocks.path,
                           "data_s": time.perf_counter() - start}  # fmt: skip
    for kind in kinds:
        kcfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"kind": kind})})
        start = time.perf_counter()
        tag = hashlib.sha256(kcfg.model_dump_json().encode()).hexdigest()[:10]
        result = train(kcfg, blocks.path, root / f"runs-{cfg.data.builtin}" / f"{kind}-{tag}",
                       vocab_size=int(stats["vocab_size"]),
                       tokenizer_hash=str(stats["tokenizer_hash"]))  # fmt: skip
        seen = result.step * cfg.train.batch_size * cfg.data.seq_len
        out[kind] = {
            "checkpoint": result.checkpoint_path,
            "steps": result.step,
            "train_s": round(time.perf_counter() - start, 1),
            "final_loss": result.metrics.get("loss"),
            "epochs": seen / stats["splits"]["train"]["tokens"],
        }
    return out


def denoiser_kl(model: TextModel, judge: MarkovJudge, windows: list[list[int]], seed: int) -> dict:
    """How far the model's denoiser is from the chain's exact one on held-out windows: masks
    drawn as in training (t ~ U(0, 1), each token masked with probability 1 - alpha(t)), then
    at every masked position KL(exact posterior || model), in nats per masked token (± SE over
    windows), next to the exact posterior's entropy. The windows hold no EOS; the block law the
    model learned also allows a document boundary at a masked position (about 1 / document
    length), which the chain's posterior leaves out: a small floor under this KL."""
    x0 = torch.tensor(windows, dtype=torch.long)
    n, L = x0.shape
    m = model.tokenizer.vocab_size
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=gen, dtype=torch.float64)
    p_mask = model.schedule.one_minus_alpha(t)[:, None]
    masked = torch.rand(n, L, generator=gen, dtype=torch.float64) < p_mask
    x_t = torch.where(masked, torch.full_like(x0, m), x0)
    with torch.inference_mode():
        logits = model.model(x_t.to(model.device), t.float().to(model.device))
    logq = torch.log_softmax(logits[..., :m].double().cpu(), -1)
    p = judge.token_source().posterior(x_t)  # (n, L, m)
    logp = torch.log(torch.where(p > 0, p, torch.ones_like(p)))
    # masked positions only (the model carries unmasked tokens over: -inf elsewhere)
    kl = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)  # (n, L)
    kl, ent = torch.where(masked, kl, 0.0), torch.where(masked, -(p * logp).sum(-1), 0.0)
    counts = masked.sum(1).double().numpy()

    def ratio(values: torch.Tensor) -> tuple[float, float]:
        sums = (values * masked).sum(1).numpy()
        mean = sums.sum() / counts.sum()
        resid = sums - mean * counts
        return float(mean), float(np.sqrt((resid**2).sum() * n / (n - 1)) / counts.sum())

    (kl_m, kl_se), (ent_m, _) = ratio(kl), ratio(ent)
    return {"kl": kl_m, "kl_se": kl_se, "posterior_entropy": ent_m,
            "masked_tokens": int(counts.sum()), "windows": n}  # fmt: skip


def repeat_timing(rows: list[FrontierRow], reruns: list[list[FrontierRow]]) -> list[FrontierRow]:
    """Each row with the median of its seconds over the first run and the reruns."""
    out = []
    for i, row in enumerate(rows):
        seconds = statistics.median([row.seconds] + [r[i].seconds for r in reruns])
        out.append(dataclasses.replace(row, seconds=seconds))
    return out


def run_frontier(fn: Any, repeats: int, *args: Any, **kwargs: Any) -> list[FrontierRow]:
    rows = fn(*args, **kwargs)
    if repeats > 1:
        rows = repeat_timing(rows, [fn(*args, **kwargs) for _ in range(repeats - 1)])
    return rows


def ratio_grid(rows: list[FrontierRow], title: str, value: Any) -> str:
    """A sampler x steps grid of ``value(row)`` (one model's rows of one task)."""
    steps = sorted({r.steps for r in rows})
    samplers = list(dict.fromkeys(r.sampler for r in rows))
    cell = {(r.sampler, r.steps): value(r) for r in rows}
    lines = [f"| {title} | " + " | ".join(str(s) for s in steps) + " |",
             "|---|" + "---|" * len(steps)]  # fmt: skip
    for s in samplers:
        lines.append(f"| {s} | " + " | ".join(cell.get((s, t), "") for t in steps) + " |")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%" if math.isfinite(x) else "-"


def print_markov_summary(rows: list[FrontierRow], judge: MarkovJudge) -> None:
    h, uni = judge.entropy_rate(), judge.unigram_entropy()
    for model in dict.fromkeys(r.model for r in rows):
        sample = [r for r in rows if r.model == model and r.task == "sample"]
        infill = [r for r in rows if r.model == model and r.task == "infill"]

        def excess(r: FrontierRow) -> str:
            q = r.quality
            assert isinstance(q, SampleQuality)
            return f"{_pct(q.nll / h - 1)} ({q.nll_se / h:.1%})"

        def entropy(r: FrontierRow) -> str:
            q = r.quality
            assert isinstance(q, SampleQuality)
            return _pct(q.unigram_entropy / uni - 1)

        def gap(r: FrontierRow) -> str:
            q = r.quality
            assert isinstance(q, InfillQuality)
            ent = q.conditional_entropy
            return f"{_pct(q.excess / ent)} ({q.excess_se / ent:.1%})"

        print(f"\n### {model}: NLL / h - 1 (SE), by steps\n")
        print(ratio_grid(sample, "sampler", excess))
        print(f"\n### {model}: unigram entropy / the chain's - 1, by steps\n")
        print(ratio_grid(sample, "sampler", entropy))
        if infill:
            print(f"\n### {model}: infill gap NLL / conditional entropy - 1 (SE), by steps\n")
            print(ratio_grid(infill, "sampler", gap))


def parse_steps(text: str) -> list[int | str]:
    return [s if s == "L" else int(s) for s in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="markov",
                        help="markov (exact judge), or a built-in text corpus: pydoc, stdlib; "
                             "default: the preset's own corpus")  # fmt: skip
    parser.add_argument("--root", default="runs/bench_sampling")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--max-steps", type=int, default=None, help="training steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable)")  # fmt: skip
    parser.add_argument("--checkpoint", help="an MDM checkpoint (skips training)")
    parser.add_argument("--tokenizer", help="its tokenizer stage folder (with --checkpoint)")
    parser.add_argument("--documents", help="its documents stage folder (with --checkpoint)")
    parser.add_argument("--ar-checkpoint", help="the AR judge for a text corpus")
    parser.add_argument("--blocks", help="blocks stage: the AR judge's first-token model")
    parser.add_argument("--samplers", default="ancestral,confidence,remask")
    parser.add_argument("--steps", default="8,16,32,64,128,L", help="L: the block length")
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--n-templates", type=int, default=128, help="markov infill windows")
    parser.add_argument("--gap", type=int, default=None, help="infill gap (default L / 2)")
    parser.add_argument("--no-oracle", action="store_true", help="skip the exact-denoiser rows")
    parser.add_argument("--repeats", type=int, default=1, help="timing: median of the runs")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"$ {shlex.join(['python', *sys.argv])}")
    print(
        f"date {datetime.date.today().isoformat()}; {os.cpu_count()} cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{args.threads} threads; timings are wall clock, noisy on a shared machine"
    )

    info: dict[str, Any] = {}
    if args.checkpoint:
        if not (args.tokenizer and args.documents):
            raise SystemExit("--checkpoint needs --tokenizer and --documents")
        stages = {"documents": Path(args.documents), "tokenizer": Path(args.tokenizer),
                  "blocks": Path(args.blocks) if args.blocks else None}  # fmt: skip
        mdm_ckpt, ar_ckpt = args.checkpoint, args.ar_checkpoint
    else:
        cfg = corpus_config(args)
        kinds = ("mdm",) if args.corpus == "markov" else ("mdm", "ar")
        stages = build_and_train(cfg, root, kinds)
        mdm_ckpt = stages["mdm"]["checkpoint"]
        ar_ckpt = stages["ar"]["checkpoint"] if "ar" in stages else None
        for kind in kinds:
            run = stages[kind]
            info[kind] = {k: str(v) if isinstance(v, Path) else v for k, v in run.items()}
            print(f"{kind.upper()}: {run['steps']} steps of {cfg.train.batch_size} x "
                  f"{cfg.data.seq_len} tokens in {run['train_s']:.0f} s ({run['epochs']:.2f} "
                  f"epochs), last training loss {run['final_loss']:.4f}")  # fmt: skip

    model = TextModel.load(mdm_ckpt, stages["tokenizer"], device="cpu")
    L = model.block_length
    judge: MarkovJudge | ARJudge | None = None
    if (Path(stages["documents"]) / "manifest.json").is_file():
        try:
            judge = MarkovJudge.from_stages(stages["documents"], model.tokenizer)
        except ValueError as exc:
            print(f"no exact judge: {exc}")
    if judge is None:
        if ar_ckpt is None:
            raise SystemExit("a text corpus needs the AR judge: --ar-checkpoint (and --blocks)")
        judge = ARJudge.load(ar_ckpt, stages["blocks"], model.tokenizer)
    samplers = tuple(args.samplers.split(","))
    steps = parse_steps(args.steps)
    common = {"samplers": samplers, "steps": steps, "seed": args.seed}

    rows: list[FrontierRow] = []
    if isinstance(judge, MarkovJudge):
        h = judge.entropy_rate()
        print(f"\nchain: {judge.n_symbols} symbols, order {judge.order}; entropy rate h = "
              f"{h:.4f} nats/symbol; stationary unigram entropy {judge.unigram_entropy():.4f}; "
              f"corpus EOS share {judge.reference_eos_share:.4f}")  # fmt: skip
        gap = args.gap or L // 2
        templates = infill_templates(judge, model.tokenizer, args.n_templates, L, gap)
        if judge.order == 1:
            windows = judge.heldout_windows(args.n_templates, L, seed=1)
            kl = denoiser_kl(model, judge, windows, args.seed)
            info["denoiser_kl"] = kl
            print(
                f"model's denoiser vs the exact one on {kl['windows']} held-out windows, "
                f"{kl['masked_tokens']} masked tokens: KL {kl['kl']:.4f} ± {kl['kl_se']:.4f} "
                f"nats per masked token (exact posterior entropy {kl['posterior_entropy']:.4f})"
            )
        models = [(model, "model")]
        if judge.order == 1 and not args.no_oracle:
            models.append((oracle_model(judge, model), "exact denoiser"))
        for m, label in models:
            rows += run_frontier(sampler_frontier, args.repeats, m, judge,
                                 n_samples=args.n_samples, label=label, **common)  # fmt: skip
        for m, label in models:
            rows += run_frontier(infill_frontier, args.repeats, m, judge, templates=templates,
                                 label=label, **common)  # fmt: skip
    else:
        rows += run_frontier(sampler_frontier, args.repeats, model, judge,
                             n_samples=args.n_samples, **common)  # fmt: skip

    print("\n## Frontier\n")
    print(frontier_markdown(rows))
    if isinstance(judge, MarkovJudge):
        print_markov_summary(rows, judge)
    elapsed = time.perf_counter() - started
    out = root / f"bench_sampling-{args.corpus}.json"
    record = {"args": vars(args), "info": info, "seconds": elapsed,
              "rows": [r.to_dict() for r in rows]}  # fmt: skip
    out.write_text(json.dumps(record, indent=1, default=str))
    print(f"\nwritten {out}; {elapsed:.0f} s in all")


if __name__ == "__main__":
    main()
