"""The sampler frontier's judges (maskdiff.frontier) against hand computations and enumeration.

* the markov judge's NLL per token is the hand-written sum over the positions it should score
  (runs cut at EOS and [UNK], the first k symbols of a run left out), for orders 1 and 2;
* samples of the data's own law (documents of the chain joined by EOS, cut into blocks; and the
  exact denoiser through the ancestral sampler) score the entropy rate within 3 standard errors,
  a collapsed sampler (always the likeliest next symbol) clearly below it, with a lower unigram
  entropy;
* the infill judge's conditional NLL and conditional entropy equal enumeration over every
  completion of a small template, and exact posterior draws score the conditional entropy;
* the AR judge is the AR model's own NLL; the frontier runs every sampler and prints its table.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from maskdiff.config import Config, DataConfig, MarkovConfig, TokenizerConfig
from maskdiff.data.ingest import ingest_documents
from maskdiff.data.markov import MarkovChain, make_chain
from maskdiff.data.tokenizer import load_tokenizer, train_tokenizer
from maskdiff.frontier import (
    ARJudge,
    MarkovJudge,
    NotMarkovError,
    frontier_markdown,
    frontier_metrics,
    infill_frontier,
    make_judge,
    markov_judge,
    oracle_model,
    sampler_frontier,
)
from maskdiff.model import build_model
from maskdiff.oracle import MarkovSource
from maskdiff.sampling import GEN_PPL_LABEL
from maskdiff.textgen import TextModel

TINY = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.3, 0.3, 0.4]])  # 3 symbols, order 1


def _tiny(order: int = 1, seed: int = 0) -> MarkovChain:
    if order == 1:
        return MarkovChain(TINY.copy(), 1)
    rows = np.random.default_rng(seed).dirichlet(np.full(3, 0.7), size=3**order)
    return MarkovChain(rows, order)


def test_nll_is_the_hand_computed_sum_over_scored_positions() -> None:
    judge = MarkovJudge.for_chain(_tiny())  # EOS 0, [UNK] 1, symbols a b c = ids 2 3 4
    a, b, c, eos, unk = 2, 3, 4, 0, 1
    rows = np.array([[a, b, b, eos, c, a, unk, b, c], [c, c, c, c, c, c, c, c, c]])
    P = TINY
    hand = [  # row 0: a->b, b->b | EOS | c->a | [UNK] | b->c; row 1: eight c->c
        [-math.log(P[0, 1]), -math.log(P[1, 1]), -math.log(P[2, 0]), -math.log(P[1, 2])],
        [-math.log(P[2, 2])] * 8,
    ]
    nll = judge.token_nll(rows)
    scored = ~np.isnan(nll)
    assert scored[0].tolist() == [0, 1, 1, 0, 0, 1, 0, 0, 1] and scored[1, 1:].all()
    assert np.allclose(nll[0][scored[0]], hand[0]) and np.allclose(nll[1, 1:], hand[1])
    q = judge.score(rows)
    sums, counts = np.array([sum(hand[0]), sum(hand[1])]), np.array([4.0, 8.0])
    mean = sums.sum() / counts.sum()
    assert q.nll == pytest.approx(mean, rel=1e-12) and q.n_scored == 12 and q.n_tokens == 18
    # the SE of a ratio of sums over 2 independent rows: sqrt(2 * sum(resid^2)) / sum(counts)
    resid = sums - mean * counts
    assert q.nll_se == pytest.approx(math.sqrt(2 * (resid**2).sum()) / 12, rel=1e-12)
    assert q.eos_share == pytest.approx(1 / 18) and q.unk_share == pytest.approx(1 / 18)
    assert q.reference_nll == pytest.approx(judge.entropy_rate())
    freq = np.array([2, 3, 11]) / 16  # symbols a, b, c among the 16 symbol tokens
    assert q.unigram_entropy == pytest.approx(-(freq * np.log(freq)).sum())

    two = MarkovJudge.for_chain(_tiny(order=2))  # order 2: the state is the previous 2 symbols
    T2 = two.chain.transition
    row = np.array([[a, b, c, a, eos, b, c, a]])
    want = [-math.log(T2[0 * 3 + 1, 2]), -math.log(T2[1 * 3 + 2, 0]), -math.log(T2[1 * 3 + 2, 0])]
    got = two.token_nll(row)
    assert np.isnan(got[0, [0, 1, 4, 5, 6]]).all()
    assert np.allclose(got[0, [2, 3, 7]], want)


def _blocks(chain: MarkovChain, n_docs: int, doc_length: int, L: int, seed: int) -> np.ndarray:
    """Documents of the chain (ids 2.., stationary starts) joined by EOS (0), cut into blocks of
    L: what the blocks stage writes for the markov corpus."""
    docs = chain.sample(n_docs, doc_length, np.random.default_rng(seed)) + 2
    stream = np.concatenate([np.append(d, 0) for d in docs])
    n = len(stream) // L
    return stream[: n * L].reshape(n, L)


def _greedy(chain: MarkovChain, n: int, L: int, seed: int) -> np.ndarray:
    """The collapsed sampler: a stationary first symbol, then always the likeliest next one."""
    start = np.random.default_rng(seed).choice(chain.vocab_size, size=n, p=chain.stationary())
    out = np.empty((n, L), dtype=np.int64)
    out[:, 0] = start
    for pos in range(1, L):
        out[:, pos] = chain.transition[out[:, pos - 1]].argmax(-1)
    return out + 2


@pytest.mark.parametrize("order", [1, 2])
def test_data_law_scores_the_entropy_rate_and_a_collapsed_sampler_below(order: int) -> None:
    chain = make_chain(MarkovConfig(vocab_size=8, order=order, seed=7))
    judge = MarkovJudge.for_chain(chain)
    h = judge.entropy_rate()
    perfect = judge.score(_blocks(chain, n_docs=300, doc_length=40, L=32, seed=1))
    assert perfect.n_scored > 10_000 and 0 < perfect.nll_se < 0.02
    assert abs(perfect.nll - h) < 3 * perfect.nll_se, (perfect.nll, h, perfect.nll_se)
    assert perfect.eos_share == pytest.approx(1 / 41, abs=2e-3)
    assert abs(perfect.unigram_entropy - judge.unigram_entropy()) < 0.02
    if order == 1:
        collapsed = judge.score(_greedy(chain, n=64, L=32, seed=2))
        assert collapsed.nll < h - 0.3 and collapsed.nll + 10 * collapsed.nll_se < h
        assert collapsed.unigram_entropy < judge.unigram_entropy() - 0.3


def _enumerate(judge: MarkovJudge, template: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Every completion of ``template`` and its conditional probability, by brute force."""
    chain, M, k, V = judge.chain, judge.mask_id, judge.order, judge.n_symbols
    gaps = [i for i, v in enumerate(template) if v == M]
    rows, probs = [], []
    for values in itertools.product(range(V), repeat=len(gaps)):
        row = list(template)
        for pos, v in zip(gaps, values, strict=True):
            row[pos] = v + 2
        sym = [x - 2 for x in row]
        state = sum(s * V ** (k - 1 - j) for j, s in enumerate(sym[:k]))
        p = chain.stationary()[state]
        for x in sym[k:]:
            p *= chain.transition[state, x]
            state = (state % V ** (k - 1)) * V + x
        rows.append(row)
        probs.append(p)
    probs_arr = np.array(probs)
    return np.array(rows), probs_arr / probs_arr.sum()


@pytest.mark.parametrize("order", [1, 2])
def test_infill_nll_and_conditional_entropy_equal_enumeration(order: int) -> None:
    judge = MarkovJudge.for_chain(_tiny(order))
    M = judge.mask_id
    # order 2: the first position is a gap, so the first state is uncertain too
    template = [2, M, M, 4, M, 3] if order == 1 else [M, 3, M, M, 4, M, 2]
    rows, post = _enumerate(judge, template)
    tpl = np.array([template] * len(rows))
    assert np.allclose(judge.conditional_nll(tpl, rows), -np.log(post), atol=1e-12)
    entropy = judge.conditional_entropy(np.array([template]))[0]
    assert entropy == pytest.approx(-(post * np.log(post)).sum(), rel=1e-12)
    # exact posterior draws: their conditional NLL averages the conditional entropy
    draws = judge.sample_posterior(np.array([template] * 4000), np.random.default_rng(0))
    q = judge.score_infill(np.array([template] * 4000), draws)
    n_gaps = template.count(M)
    assert q.conditional_entropy == pytest.approx(entropy / n_gaps, rel=1e-12)
    assert abs(q.excess) < 3 * q.excess_se and q.n_templates == 4000
    # a fill with EOS (0) in a gap is impossible under the chain: counted, left out
    bad = draws[:3].copy()
    bad[0, template.index(M)] = 0
    q3 = judge.score_infill(np.array([template] * 3), bad)
    assert q3.n_invalid == 1 and q3.n_templates == 3 and q3.n_gap_tokens == 2 * n_gaps
    assert q3.invalid_token_share == pytest.approx(1 / (3 * n_gaps))
    want = judge.conditional_nll(np.array([template] * 2), draws[1:3]).sum() / (2 * n_gaps)
    assert q3.nll == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="changed known tokens"):
        judge.conditional_nll(np.array([template]), np.array([[3] * len(template)]))


@pytest.fixture(scope="module")
def markov_stage(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("markov")
    markov = {"vocab_size": 6, "order": 1, "n_documents": 80, "doc_length": 96}
    cfg = DataConfig(builtin="markov", root=str(root), val_fraction=0.2, markov=markov)
    docs = ingest_documents(cfg).path
    tok = train_tokenizer(TokenizerConfig(kind="char", vocab_size=64), docs, root).path
    return docs, tok


def _text_model(tok_dir: Path, L: int = 24) -> TextModel:
    tok = load_tokenizer(tok_dir)
    cfg = Config.model_validate(
        {"data": {"seq_len": L}, "model": {"preset": "custom", "n_layers": 1, "d_model": 16,
                                           "n_heads": 2, "max_seq_len": 32}}
    )  # fmt: skip
    torch.manual_seed(0)
    return TextModel(build_model(cfg.model, tok.vocab_size), cfg, tok, torch.device("cpu"))


def test_judge_from_stages_and_refusals(markov_stage: tuple[Path, Path], tmp_path: Path) -> None:
    docs, tok_dir = markov_stage
    judge = MarkovJudge.from_stages(docs, tok_dir)
    tok = load_tokenizer(tok_dir)
    assert judge.n_symbols == 6 and judge.mask_id == tok.mask_id
    assert judge.token_symbol[tok.eos_id] == -1 and judge.token_symbol[tok.unk_id] == -1
    assert sorted(judge.token_symbol[judge.token_symbol >= 0]) == list(range(6))
    assert judge.reference_eos_share == pytest.approx(1 / 97)
    manifest = json.loads((docs / "manifest.json").read_text())["stats"]["markov"]
    assert judge.entropy_rate() == pytest.approx(manifest["entropy_rate_nats_per_symbol"])
    windows = judge.heldout_windows(50, 24)
    assert len(windows) >= 20 and all(len(w) == 24 and min(w) >= 2 for w in windows)
    other = tmp_path / "pydoc"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"config": {"source": "builtin",
                                                                "builtin": "pydoc"}}))  # fmt: skip
    with pytest.raises(NotMarkovError, match="'pydoc', not the built-in markov"):
        MarkovJudge.from_stages(other, tok_dir)
    assert markov_judge(other, tok_dir) is None
    assert make_judge(other, tok_dir) is None  # no AR checkpoint to fall back on
    assert isinstance(make_judge(docs, tok_dir), MarkovJudge)


def test_frontier_with_the_exact_denoiser(markov_stage: tuple[Path, Path]) -> None:
    docs, tok_dir = markov_stage
    judge = MarkovJudge.from_stages(docs, tok_dir)
    oracle = oracle_model(judge, _text_model(tok_dir))
    rows = sampler_frontier(oracle, judge, samplers=("ancestral", "confidence"), steps=(4, "L"),
                            n_samples=96, label="exact denoiser")  # fmt: skip
    by = {(r.sampler, r.steps): r for r in rows}
    assert sorted(by) == [("ancestral", 4), ("ancestral", 24), ("confidence", 4),
                          ("confidence", 24)]  # fmt: skip
    exact = by["ancestral", 24]  # first hitting: the chain's own law
    q = exact.quality
    assert exact.network_calls == 24 and exact.generated_tokens == 96 * 24
    assert abs(q.nll - judge.entropy_rate()) < 3 * q.nll_se and q.eos_share == 0.0
    greedy = by["confidence", 24].quality  # keeps the likeliest tokens: collapsed
    assert greedy.nll < q.nll - 10 * q.nll_se and greedy.unigram_entropy < q.unigram_entropy
    fills = infill_frontier(oracle, judge, samplers=("ancestral",), steps=("L",),
                            n_templates=30, gap=8, label="exact denoiser")  # fmt: skip
    f = fills[0].quality
    assert fills[0].n_samples == 30 and f.n_gap_tokens == 30 * 8 and fills[0].network_calls == 8
    assert abs(f.excess) < 3 * f.excess_se and f.conditional_entropy > 0
    table = frontier_markdown(rows + fills)
    assert table.count("| exact denoiser |") == 5 and "cond. entropy" in table
    metrics = frontier_metrics(rows + fills)
    assert metrics["frontier.exact_denoiser.sample.ancestral.24.network_calls"] == 24
    assert "frontier.exact_denoiser.infill.ancestral.24.excess_se" in metrics
    json.dumps([r.to_dict() for r in rows + fills])  # JSON-ready


def test_ar_judge_is_the_ar_models_nll() -> None:
    chain = MarkovSource(torch.tensor(TINY))
    x = chain.sample(20, 16, torch.Generator().manual_seed(0))
    first = torch.log(chain.stationary)
    judge = ARJudge(chain.ar_logits, vocab_size=3, block_length=8, first_log_probs=first,
                    eos_id=0)  # fmt: skip
    q = judge.score(x)
    # windows of 8: each half scored on its own, its first token by the unigram
    want = (chain.nll(x[:, :8]) + chain.nll(x[:, 8:])).sum() / x.numel()
    assert q.nll == pytest.approx(float(want), rel=1e-12) and q.n_scored == x.numel()
    assert q.judge == GEN_PPL_LABEL and q.gen_ppl == pytest.approx(math.exp(q.nll))
    assert q.eos_share == pytest.approx(float((x == 0).double().mean()))
    blind = ARJudge(chain.ar_logits, vocab_size=3, block_length=16)  # no first-token model
    assert blind.score(x).n_scored == 20 * 15


def test_frontier_of_an_untrained_model_runs_every_sampler(
    markov_stage: tuple[Path, Path],
) -> None:
    docs, tok_dir = markov_stage
    judge = MarkovJudge.from_stages(docs, tok_dir)
    rows = sampler_frontier(_text_model(tok_dir), judge, steps=(2, "L"), n_samples=4)
    assert [(r.sampler, r.steps) for r in rows] == [
        (s, t) for s in ("ancestral", "confidence", "remask") for t in (2, 24)
    ]
    assert all(r.seconds > 0 and r.tokens_per_second > 0 for r in rows)
    assert [r.network_calls for r in rows] == [2, 24, 2, 24, 2, 24]
    assert "| model | remask | 24 | 24 |" in frontier_markdown(rows)
