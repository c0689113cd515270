"""Samplers over templates (maskdiff.samplers) against the exact Markov denoiser.

Exact laws: the ancestral sampler with steps >= the gap tokens draws the gaps from the chain's
conditional law given the known tokens (chi-square, with power checks on broken samplers), and
its semi-autoregressive windows draw a longer text from the chain itself. The confidence and
remask samplers are not exact: their invariants are tested (known tokens unchanged, exactly the
gaps filled, calls = steps, determinism), and what each is meant to do.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import chi2_pvalue
from scipy import stats

from maskdiff.oracle import MarkovSource
from maskdiff.samplers import confidence_counts, fill, first_hitting_time
from maskdiff.schedule import CosineSchedule, LinearSchedule

CHAIN = MarkovSource(
    torch.tensor([[0.8, 0.15, 0.05], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]], dtype=torch.float64)
)
M = 3  # [MASK] id of the 3-token chain


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _conditional_law(template: list[int]) -> tuple[list[int], torch.Tensor]:
    """The chain's law of the gap tokens given the known ones, by enumeration: (gap positions,
    probabilities over the completions in itertools.product order)."""
    gaps = [i for i, v in enumerate(template) if v == M]
    rows = []
    for fill_in in itertools.product(range(M), repeat=len(gaps)):
        row = list(template)
        for pos, tok in zip(gaps, fill_in, strict=True):
            row[pos] = tok
        rows.append(row)
    joint = torch.exp(-CHAIN.nll(torch.tensor(rows)))
    return gaps, joint / joint.sum()


def _gap_counts(tokens: torch.Tensor, gaps: list[int]) -> torch.Tensor:
    code = torch.zeros(tokens.shape[0], dtype=torch.long)
    for pos in gaps:
        code = code * M + tokens[:, pos]
    return torch.bincount(code, minlength=M ** len(gaps)).double()


TEMPLATE = [2, M, M, 0, M, 1]  # three gaps between known tokens


def _infill(denoiser, n: int, steps: int, seed: int, **kw) -> torch.Tensor:
    template = torch.tensor(TEMPLATE).expand(n, -1)
    out = fill(denoiser, CosineSchedule(), M, template, block_length=8, steps=steps,
               generator=_gen(seed), **kw)  # fmt: skip
    return out.tokens


def test_ancestral_infill_draws_the_exact_conditional_law() -> None:
    n = 20000
    gaps, law = _conditional_law(TEMPLATE)
    tokens = _infill(CHAIN.denoiser, n, steps=3, seed=0)  # steps = gap tokens: first hitting
    assert torch.equal(tokens[:, [0, 3, 5]], torch.tensor([2, 0, 1]).expand(n, -1))
    assert chi2_pvalue(_gap_counts(tokens, gaps), law) > 1e-3

    # power: the same test rejects samplers with a deliberate error
    # (1) the known tokens are not given to the model: the gaps follow their marginal law
    def blind(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        known = torch.zeros_like(x, dtype=torch.bool)
        known[:, [0, 3, 5]] = True
        logits = CHAIN.denoiser(torch.where(known, M, x), t)
        return torch.where(known[..., None], CHAIN.denoiser(x, t), logits)

    wrong = _infill(blind, n, steps=3, seed=0)
    assert chi2_pvalue(_gap_counts(wrong, gaps), law) < 1e-6
    # (2) every gap unmasked in one step: drawn independently given the known tokens
    one = _infill(CHAIN.denoiser, n, steps=1, seed=0)
    assert chi2_pvalue(_gap_counts(one, gaps), law) < 1e-6


def test_first_hitting_passes_the_exact_event_times() -> None:
    # linear schedule, n masked at t = 1: the first event is the latest of n uniform times,
    # s ~ Beta(n, 1); the next, given s, is s times a Beta(n - 1, 1) draw
    seen: list[torch.Tensor] = []

    def recorder(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t.double().clone())
        return CHAIN.denoiser(x, t)

    n = 4000
    out = fill(recorder, LinearSchedule(), M, torch.full((n, 4), M), block_length=4, steps=4,
               generator=_gen(1))  # fmt: skip
    assert out.network_calls == 4 and len(seen) == 4
    assert stats.kstest(seen[0].numpy(), stats.beta(4, 1).cdf).pvalue > 1e-3
    ratio = (seen[1] / seen[0]).numpy()
    assert stats.kstest(ratio, stats.beta(3, 1).cdf).pvalue > 1e-3
    assert bool((seen[3] < seen[2]).all() and (seen[2] < seen[1]).all())
    # cosine: 1 - alpha(s) = (1 - alpha(t)) u^(1/n), solved to float64 precision
    sched = CosineSchedule()
    t, k, u = torch.tensor([1.0, 0.5]), torch.tensor([3, 1]), torch.tensor([0.3, 0.7])
    s = first_hitting_time(sched, t, k, u)
    target = sched.one_minus_alpha(t.double()) * u.double() ** (1.0 / k.double())
    torch.testing.assert_close(sched.one_minus_alpha(s), target, rtol=1e-12, atol=0)


def test_semi_autoregressive_windows_draw_the_chain_law() -> None:
    # blocks of 3, texts of 5, one token of context: for a first-order chain the window's
    # left context is all the past that matters, so the whole text follows the chain exactly
    n, P = 20000, 5
    out = fill(CHAIN.denoiser, LinearSchedule(), M, torch.full((n, P), M), block_length=3,
               steps=3, generator=_gen(2), context=1)  # fmt: skip
    assert out.network_calls == 3 + 2  # windows [0, 3) and [2, 5) (2 gaps); a call per gap
    seqs = torch.tensor(list(itertools.product(range(M), repeat=P)))
    law = torch.exp(-CHAIN.nll(seqs))
    assert chi2_pvalue(_gap_counts(out.tokens, list(range(P))), law / law.sum()) > 1e-3
    # no context carried: the windows are independent and the law is wrong
    cut = fill(CHAIN.denoiser, LinearSchedule(), M, torch.full((n, 6), M), block_length=3,
               steps=3, generator=_gen(2), context=0)  # fmt: skip
    law6 = torch.exp(-CHAIN.nll(torch.tensor(list(itertools.product(range(M), repeat=6)))))
    assert chi2_pvalue(_gap_counts(cut.tokens, list(range(6))), law6 / law6.sum()) < 1e-6


class _Recorder:
    """Wraps a denoiser and keeps every input it was called with."""

    def __init__(self, inner) -> None:
        self.inner, self.seen = inner, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return self.inner(x, t)


@pytest.mark.parametrize("sampler", ["ancestral", "confidence", "remask"])
def test_invariants_known_kept_gaps_filled_calls_deterministic(sampler: str) -> None:
    n, steps = 64, 3
    template = torch.tensor([2, M, M, 0, M, M, 1, M, M, M]).expand(n, -1)  # 6 gaps, a free tail
    free = torch.zeros(n, 10, dtype=torch.bool)
    free[:, 8:] = True  # the last two [M] are context, not gaps
    runs = []
    for _ in range(2):
        rec = _Recorder(CHAIN.denoiser)
        out = fill(rec, CosineSchedule(), M, template, block_length=12, steps=steps,
                   generator=_gen(3), sampler=sampler, remask_eta=0.3, free=free)  # fmt: skip
        runs.append(out)
        known = template != M
        assert torch.equal(out.tokens[known], template[known])
        gaps = (template == M) & ~free
        assert bool((out.tokens[gaps] < M).all()), "a gap left unfilled"
        assert bool((out.tokens[:, 8:] == M).all()), "free context decoded"
        if sampler != "ancestral":
            assert out.network_calls == steps == len(rec.seen)
        for x in rec.seen:  # the model always sees the known tokens, and the block of 12
            assert x.shape == (n, 12) and torch.equal(x[known.nonzero(as_tuple=True)],
                                                       template[known])  # fmt: skip
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    other = fill(CHAIN.denoiser, CosineSchedule(), M, template, block_length=12, steps=steps,
                 generator=_gen(4), sampler=sampler, remask_eta=0.3, free=free)  # fmt: skip
    assert not torch.equal(other.tokens, runs[0].tokens)


def test_confidence_counts_follow_the_schedule() -> None:
    # linear: the share still masked after step j of 4 is 1 - (j + 1) / 4
    counts = confidence_counts(LinearSchedule(), torch.tensor([8, 4, 2, 9]), 4)
    assert counts.tolist() == [[2, 2, 2, 2], [1, 1, 1, 1], [0, 1, 0, 1], [2, 2, 3, 2]]
    # cosine: 1 - cos(pi s / 2) at s = 3/4, 1/2, 1/4 of 100 -> 62 (61.7), 29 (29.3), 8 (7.6)
    c = confidence_counts(CosineSchedule(), torch.tensor([100]), 4)[0]
    assert c.tolist() == [38, 33, 21, 8]
    # at least one a step while the row has as many gaps as steps, even where the schedule is flat
    c = confidence_counts(CosineSchedule(), torch.tensor([10]), 10)[0]
    assert c.tolist() == [1] * 10


def test_confidence_unmasks_the_most_confident_positions_first() -> None:
    # position l predicts token l % 3 with probability 0.4 + 0.05 l: the margin grows with l,
    # so one token a step is unmasked right to left
    L = 8

    def peaks(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        p = torch.zeros(x.shape[0], L, M, dtype=torch.float64)
        for pos in range(L):
            top = 0.4 + 0.05 * pos
            p[:, pos] = (1 - top) / (M - 1)
            p[:, pos, pos % M] = top
        return p.log()

    rec = _Recorder(peaks)
    fill(rec, LinearSchedule(), M, torch.full((5, L), M), block_length=L, steps=L,
         generator=_gen(5), sampler="confidence", confidence="margin")  # fmt: skip
    order = [int((before != after)[0].nonzero()) for before, after in
             itertools.pairwise(rec.seen)]  # fmt: skip
    assert order == [7, 6, 5, 4, 3, 2, 1]


def test_remask_without_remasking_is_the_ancestral_chain_and_with_it_remasks() -> None:
    template = torch.full((200, 6), M)
    template[:, 0] = 1
    kw = dict(block_length=6, steps=8, sampler="remask")
    plain = fill(CHAIN.denoiser, CosineSchedule(), M, template, generator=_gen(6),
                 remask_eta=0.0, **kw)  # fmt: skip
    grid = fill(CHAIN.denoiser, CosineSchedule(), M, template, block_length=6, steps=8,
                generator=_gen(6), first_hitting=False)  # fmt: skip
    assert torch.equal(plain.tokens, grid.tokens)  # same unmasking probabilities, same draws
    rec = _Recorder(CHAIN.denoiser)
    fill(rec, CosineSchedule(), M, template, generator=_gen(6), remask_eta=0.5, **kw)
    remasked = sum(int(((a != M) & (b == M)).sum()) for a, b in itertools.pairwise(rec.seen))
    assert remasked > 0
    assert all(bool((x[:, 0] == 1).all()) for x in rec.seen)  # a known token is never remasked
    # remasking keeps the forward marginals: at the call of time t = i / 8 a gap is masked with
    # probability 1 - alpha(t) (cosine); 200 rows x 5 gaps, within 4 standard errors
    sched = CosineSchedule()
    for call, x in enumerate(rec.seen):
        t = torch.tensor((8 - call) / 8, dtype=torch.float64)
        p = float(sched.one_minus_alpha(t))
        share = float((x[:, 1:] == M).double().mean())
        se = (p * (1 - p) / x[:, 1:].numel()) ** 0.5
        assert abs(share - p) <= 4 * se + 1e-12, (call, share, p)


def test_bad_arguments_name_the_problem() -> None:
    x = torch.full((2, 4), M)
    with pytest.raises(ValueError, match="unknown sampler 'greedy'"):
        fill(CHAIN.denoiser, LinearSchedule(), M, x, block_length=4, steps=2,
             generator=_gen(0), sampler="greedy")  # fmt: skip
    with pytest.raises(ValueError, match=r"template ids must lie in \[0, 3\]"):
        fill(CHAIN.denoiser, LinearSchedule(), M, x + 1, block_length=4, steps=2,
             generator=_gen(0))  # fmt: skip
    with pytest.raises(ValueError, match="context must lie in"):
        fill(CHAIN.denoiser, LinearSchedule(), M, torch.full((2, 9), M), block_length=4,
             steps=2, generator=_gen(0), context=4)  # fmt: skip
