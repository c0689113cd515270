"""Samplers against exact oracles: invariants, source frequencies (chi-square), the cache, and
the few-step law of the ancestral sampler enumerated exactly (the schedule and the times t)."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable

import pytest
import torch
from helpers import chi2_pvalue
from scipy import stats

from maskdiff.config import SampleConfig
from maskdiff.oracle import IIDSource, MarkovSource
from maskdiff.samplers import top_p_filter
from maskdiff.sampling import (
    GEN_PPL_LABEL,
    ancestral_sample,
    decode_samples,
    distinct_n,
    generate,
    generative_perplexity,
    sample_statistics,
    unigram_entropy,
)
from maskdiff.schedule import CosineSchedule, LinearSchedule, Schedule

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


# ----------------------------------------------------------------------------- few-step law

# the schedules' alpha(t), written out here rather than taken from maskdiff.schedule
ALPHA: dict[str, Callable[[float], float]] = {
    "linear": lambda t: 1.0 - t,
    "cosine": lambda t: math.cos(math.pi * t / 2),
}
SKEW = MarkovSource(
    torch.tensor([[0.8, 0.15, 0.05], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]], dtype=torch.float64)
)


class _ClockAndNeighbours:
    """A denoiser whose prediction depends on t and on the unmasked neighbours, so the law of
    the samples depends on which time the sampler passes and on the order of unmasking:

        logit_k(l) = 1.5 t (k - 1) + 1.0 * #{unmasked neighbours l +- 1 holding token k}.
    """

    def __init__(self, vocab_size: int) -> None:
        self.m = vocab_size

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B, L = x_t.shape
        k = torch.arange(self.m, dtype=torch.float64)
        clock = 1.5 * t.double()[:, None, None] * (k - 1)  # (B, 1, m)
        seen = torch.nn.functional.one_hot(x_t, self.m + 1)[..., : self.m].double()  # (B, L, m)
        near = torch.zeros(B, L, self.m, dtype=torch.float64)
        near[:, 1:] += seen[:, :-1]
        near[:, :-1] += seen[:, 1:]
        return clock + near  # (B, L, m): V = m


def _exact_law(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    alpha: Callable[[float], float],
    m: int,
    L: int,
    T: int,
) -> torch.Tensor:
    """The law of the T-step ancestral sampler's output, by enumeration; (m^L,) in product order.

    From x = all [M], step i = T..1 with s = (i-1)/T, t = i/T: each masked position
    independently unmasks with probability p_i = (alpha(s) - alpha(t)) / (1 - alpha(t)) (p_1 = 1),
    to a token drawn from softmax(denoiser(x, t))[l], all from the same call on x (the state
    before step i). So for the set U of positions that unmask at step i,

        P(x -> y) = p_i^|U| (1 - p_i)^(#masked - |U|) prod_{l in U} p_theta(y_l | x, t_i).
    """
    law: dict[tuple[int, ...], float] = {(m,) * L: 1.0}
    for i in range(T, 0, -1):
        s, t = (i - 1) / T, i / T
        p = 1.0 if i == 1 else (alpha(s) - alpha(t)) / (1.0 - alpha(t))
        states = list(law)
        x = torch.tensor(states)
        probs = torch.softmax(denoiser(x, torch.full((len(states),), t))[..., :m].double(), -1)
        nxt: dict[tuple[int, ...], float] = defaultdict(float)
        for row, state in enumerate(states):
            masked = [pos for pos in range(L) if state[pos] == m]
            for k in range(len(masked) + 1):
                p_set = p**k * (1.0 - p) ** (len(masked) - k)
                for chosen in itertools.combinations(masked, k):
                    for tokens in itertools.product(range(m), repeat=k):
                        y, q = list(state), law[state] * p_set
                        for pos, tok in zip(chosen, tokens, strict=True):
                            y[pos] = tok
                            q *= float(probs[row, pos, tok])
                        nxt[tuple(y)] += q
        law = nxt
    seqs = itertools.product(range(m), repeat=L)
    out = torch.tensor([law.get(seq, 0.0) for seq in seqs], dtype=torch.float64)
    return out / out.sum()  # float32 t makes the total 1 only to ~1e-8


@pytest.mark.parametrize(
    ("oracle", "sched", "T", "cached"),
    [
        ("markov", CosineSchedule(), 3, False),
        ("markov", CosineSchedule(), 3, True),
        ("clock", CosineSchedule(), 3, False),
        ("clock", LinearSchedule(), 2, False),
    ],
)
def test_few_step_sampler_matches_enumerated_law(
    oracle: str, sched: Schedule, T: int, cached: bool
) -> None:
    # The Markov oracle unmasking several tokens at once draws them independently from their
    # marginals: the law depends on how many unmask together, i.e. on p_i. The clock
    # denoiser also depends on the t it is given.
    m, L, n = 3, 4, 20000
    den = SKEW.denoiser if oracle == "markov" else _ClockAndNeighbours(m)
    out = ancestral_sample(
        den,
        sched,
        m,
        n_samples=n,
        length=L,
        steps=T,
        cached=cached,
        generator=torch.Generator().manual_seed(6),
    )
    counts = _joint_counts(out.tokens, m)
    assert chi2_pvalue(counts, _exact_law(den, ALPHA[sched.name], m, L, T)) > 1e-3
    # the test has the power to see a wrong schedule: the other schedule's law is rejected
    other = ALPHA["linear" if sched.name == "cosine" else "cosine"]
    assert chi2_pvalue(counts, _exact_law(den, other, m, L, T)) < 1e-6


class _TimeRecorder:
    """Records the t and x_t of every call; predicts the i.i.d. law (t-independent)."""

    def __init__(self) -> None:
        self.t: list[torch.Tensor] = []
        self.x: list[torch.Tensor] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.t.append(t.clone())
        self.x.append(x_t.clone())
        return IID.denoiser(x_t, t)


@pytest.mark.parametrize("sched", [CosineSchedule(), LinearSchedule()], ids=["cosine", "linear"])
def test_sampler_passes_the_grid_times_and_follows_the_forward_marginals(sched: Schedule) -> None:
    m, L, n, T = 3, 8, 4000, 5
    rec = _TimeRecorder()
    ancestral_sample(
        rec,
        sched,
        m,
        n_samples=n,
        length=L,
        steps=T,
        generator=torch.Generator().manual_seed(7),
    )
    # one call per step, every row at t_i = i/T, i = T..1 (float32)
    grid = [i / T for i in range(T, 0, -1)]
    assert len(rec.t) == T
    for got, t in zip(rec.t, grid, strict=True):
        assert got.dtype == torch.float32 and torch.equal(got, torch.full((n,), t))
    # the call at t_i sees the state at t_i: a position is still masked there with probability
    # prod_{j > i} (1 - p_j) = (1 - alpha(t_i)) / (1 - alpha(1)), the forward marginal
    alpha = ALPHA[sched.name]
    for x, t in zip(rec.x, grid, strict=True):
        q = (1.0 - alpha(t)) / (1.0 - alpha(1.0))
        frac = float((x == m).double().mean())
        se = math.sqrt(q * (1.0 - q) / (n * L))
        assert abs(frac - q) < 4 * se + 1e-12, (t, frac, q)
    # the cached variant calls only at some steps, each at its grid time
    rec_cached = _TimeRecorder()
    ancestral_sample(
        rec_cached,
        sched,
        m,
        n_samples=3,
        length=L,
        steps=T,
        cached=True,
        generator=torch.Generator().manual_seed(8),
    )
    times = [float(t[0]) for t in rec_cached.t]
    assert times and all(any(math.isclose(t, g, rel_tol=1e-6) for g in grid) for t in times)
    assert times == sorted(times, reverse=True) and len(set(times)) == len(times)


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
