"""Samplers against exact oracles: invariants, source frequencies (chi-square), the cache."""

from __future__ import annotations

import itertools
import math

import torch
from scipy import stats

from maskdiff.config import SampleConfig
from maskdiff.oracle import IIDSource, MarkovSource
from maskdiff.sampling import (
    GEN_PPL_LABEL,
    ancestral_sample,
    decode_samples,
    distinct_n,
    generate,
    generative_perplexity,
    sample_statistics,
    top_p_filter,
    unigram_entropy,
)
from maskdiff.schedule import CosineSchedule, LinearSchedule

IID = IIDSource(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
CHAIN = MarkovSource(torch.tensor([[0.9, 0.1], [0.3, 0.7]], dtype=torch.float64))


def _joint_counts(tokens: torch.Tensor, m: int) -> torch.Tensor:
    """Counts of each whole sequence, indexed in itertools.product order."""
    L = tokens.shape[1]
    code = (tokens * (m ** torch.arange(L - 1, -1, -1))).sum(-1)
    return torch.bincount(code, minlength=m**L).double()


def _source_probs(src: IIDSource | MarkovSource, m: int, L: int) -> torch.Tensor:
    seqs = torch.tensor(list(itertools.product(range(m), repeat=L)))
    return torch.exp(-src.nll(seqs))


class _Recorder:
    """A deliberately bad denoiser (large [M] logit, carry-over ignored) that records its inputs."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(x_t.clone())
        logits = torch.zeros(*x_t.shape, 4)
        logits[..., 3] = 50.0  # the [M] class: must never be drawn
        logits[..., 0] = 5.0  # favours token 0 even where a token is already unmasked
        return logits


def test_unmasked_tokens_never_change_and_no_mask_remains() -> None:
    rec = _Recorder()
    prefix = torch.tensor([2, 1, 2])
    out = ancestral_sample(
        rec,
        LinearSchedule(),
        3,
        n_samples=64,
        length=10,
        steps=20,
        generator=torch.Generator().manual_seed(0),
        prefix=prefix,
    )
    assert out.tokens.shape == (64, 10) and int(out.tokens.max()) < 3  # no [M] remains
    assert torch.equal(out.tokens[:, :3], prefix.expand(64, 3))
    history = [*rec.seen, out.tokens]
    assert len(rec.seen) == out.network_calls > 1
    for before, after in itertools.pairwise(history):
        fixed = before != 3
        assert torch.equal(after[fixed], before[fixed])  # once unmasked, never changed


def test_iid_oracle_sample_frequencies_match_source() -> None:
    m, L, n = 3, 3, 6000
    for sched, steps in [(LinearSchedule(), 4), (CosineSchedule(), 1)]:
        out = ancestral_sample(
            IID.denoiser,
            sched,
            m,
            n_samples=n,
            length=L,
            steps=steps,
            generator=torch.Generator().manual_seed(1),
        )
        expected = n * _source_probs(IID, m, L)
        res = stats.chisquare(_joint_counts(out.tokens, m).numpy(), expected.numpy())
        assert res.pvalue > 1e-3, (sched.name, res)


def test_markov_oracle_sampler_with_many_steps_matches_source() -> None:
    m, L, n = 2, 4, 4000
    out = ancestral_sample(
        CHAIN.denoiser,
        LinearSchedule(),
        m,
        n_samples=n,
        length=L,
        steps=1000,
        generator=torch.Generator().manual_seed(2),
        cached=True,
    )
    expected = n * _source_probs(CHAIN, m, L)
    res = stats.chisquare(_joint_counts(out.tokens, m).numpy(), expected.numpy())
    assert res.pvalue > 1e-3, res
    # with one step every token is drawn from its marginal independently: dependence is lost
    one = ancestral_sample(
        CHAIN.denoiser,
        LinearSchedule(),
        m,
        n_samples=n,
        length=L,
        steps=1,
        generator=torch.Generator().manual_seed(2),
    )
    bad = stats.chisquare(_joint_counts(one.tokens, m).numpy(), expected.numpy())
    assert bad.pvalue < 1e-6


def test_cached_sampler_identical_with_fewer_calls() -> None:
    kwargs = dict(n_samples=200, length=8, steps=200, prefix=torch.tensor([1]))
    plain = ancestral_sample(
        CHAIN.denoiser, LinearSchedule(), 2, generator=torch.Generator().manual_seed(3), **kwargs
    )
    cached = ancestral_sample(
        CHAIN.denoiser,
        LinearSchedule(),
        2,
        generator=torch.Generator().manual_seed(3),
        cached=True,
        **kwargs,
    )
    assert torch.equal(plain.tokens, cached.tokens)
    assert plain.network_calls == 200 and plain.rows_evaluated == 200 * 200
    assert cached.rows_evaluated < plain.rows_evaluated / 10  # at most 7 calls per row
    # one sample, many steps: a call only at the few steps where a token changed
    kwargs["n_samples"] = 1
    one = ancestral_sample(
        CHAIN.denoiser,
        LinearSchedule(),
        2,
        generator=torch.Generator().manual_seed(3),
        cached=True,
        **kwargs,
    )
    assert one.network_calls <= 7


def test_top_p() -> None:
    probs = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    assert torch.allclose(top_p_filter(probs, 0.6), torch.tensor([[0.0, 0.625, 0.375]]).double())
    assert torch.allclose(top_p_filter(probs, 0.4), torch.tensor([[0.0, 1.0, 0.0]]).double())
    assert torch.equal(top_p_filter(probs, 1.0), probs)
    n = 4000
    out = ancestral_sample(
        IID.denoiser,
        LinearSchedule(),
        3,
        n_samples=n,
        length=2,
        steps=3,
        top_p=0.6,
        generator=torch.Generator().manual_seed(4),
    )
    counts = torch.bincount(out.tokens.reshape(-1), minlength=3)
    assert counts[2] == 0  # the tail (0.2) is cut
    res = stats.chisquare(counts[:2].numpy(), 2 * n * torch.tensor([0.625, 0.375]).numpy())
    assert res.pvalue > 1e-3


def test_statistics() -> None:
    tokens = torch.tensor([[0, 1, 0, 1], [0, 1, 2, 2]])
    assert distinct_n(tokens, 1) == 3 / 8
    assert distinct_n(tokens, 2) == 4 / 6  # 01 10 01 | 01 12 22
    assert distinct_n(tokens, 3) == 4 / 4
    p = torch.tensor([3, 3, 2], dtype=torch.float64) / 8
    assert math.isclose(unigram_entropy(tokens), float(-(p * p.log()).sum()))
    samples = IID.sample(500, 8, torch.Generator().manual_seed(5))
    ppl, n_scored = generative_perplexity(IID.ar_logits, samples, 3)
    assert n_scored == 500 * 7
    exact = float(IID.nll(samples[:, 1:]).sum()) / n_scored
    assert math.isclose(math.log(ppl), exact, rel_tol=1e-12)
    st = sample_statistics(samples, 3, IID.ar_logits, torch.log(IID.probs))
    assert st.gen_ppl_tokens == 4000 and st.to_dict()["samples.gen_ppl_label"] == GEN_PPL_LABEL
    assert decode_samples(tokens, lambda ids: "".join("abc"[i] for i in ids)) == ["abab", "abcc"]


def test_generate_from_config() -> None:
    cfg = SampleConfig(n_samples=3, steps=5, length=6, seed=9)
    a = generate(IID.denoiser, LinearSchedule(), 3, cfg, length=100, prefix_ids=[2, 2])
    b = generate(IID.denoiser, LinearSchedule(), 3, cfg, length=100, prefix_ids=[2, 2])
    assert a.tokens.shape == (3, 6) and torch.equal(a.tokens, b.tokens)
    assert (a.tokens[:, :2] == 2).all()
