"""The exact sources: posteriors against brute-force enumeration, likelihoods, entropies."""

from __future__ import annotations

import itertools
import math

import torch

from maskdiff.oracle import IIDSource, MarkovSource, carry_over_logits, random_markov


def _joint(src: MarkovSource, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sequence of the chain's vocabulary (S, L) and its exact probability (S,)."""
    seqs = torch.tensor(list(itertools.product(range(src.vocab_size), repeat=length)))
    return seqs, torch.exp(-src.nll(seqs))


def _brute_posterior(src: MarkovSource, x_t: torch.Tensor) -> torch.Tensor:
    """p(x0_l = k | unmasked tokens) by summing the joint over all consistent sequences."""
    m = src.vocab_size
    seqs, prob = _joint(src, x_t.shape[1])
    out = torch.zeros(*x_t.shape, m, dtype=torch.float64)
    for b, row in enumerate(x_t):
        seen = row != m
        consistent = (seqs[:, seen] == row[seen]).all(-1)  # (S,)
        w = prob * consistent
        for pos in range(x_t.shape[1]):
            out[b, pos] = torch.bincount(seqs[:, pos], weights=w, minlength=m)
        out[b] /= w.sum()
    return out


def test_markov_posterior_matches_enumeration() -> None:
    g = torch.Generator().manual_seed(3)
    src = random_markov(3, 0.7, g)
    m, L = 3, 5
    x0 = src.sample(40, L, g)
    mask = torch.rand(40, L, generator=g) < 0.6
    mask[0] = True  # all masked: the posterior is the stationary law
    mask[1] = False  # nothing masked: the posterior is the one-hot of x0
    x_t = torch.where(mask, torch.full_like(x0, m), x0)
    fb = src.posterior(x_t)
    assert torch.allclose(fb, _brute_posterior(src, x_t), atol=1e-12)
    assert torch.allclose(fb[0], src.stationary.expand(L, m), atol=1e-12)
    assert torch.equal(fb[1].argmax(-1), x0[1])


def test_markov_likelihood_sums_to_one_and_stationary() -> None:
    src = random_markov(3, 0.5, torch.Generator().manual_seed(0))
    _, prob = _joint(src, 4)
    assert math.isclose(float(prob.sum()), 1.0, abs_tol=1e-12)
    pi = src.stationary
    assert torch.allclose(pi @ src.transition, pi, atol=1e-12)
    # the exact block entropy is the expected NLL per token
    seqs, prob = _joint(src, 4)
    expected = float((prob * src.nll(seqs)).sum()) / 4
    assert math.isclose(src.block_entropy(4), expected, rel_tol=1e-10)


def test_denoiser_logits_are_subs() -> None:
    src = random_markov(4, 1.0, torch.Generator().manual_seed(1))
    x_t = torch.tensor([[4, 1, 4, 2]])
    logits = src.denoiser(x_t, torch.tensor([0.5]))
    assert logits.shape == (1, 4, 5)
    assert torch.isinf(logits[..., 4]).all()  # [M] never predicted
    assert logits[0, 1].argmax() == 1 and torch.isinf(logits[0, 1, [0, 2, 3]]).all()
    assert torch.allclose(torch.logsumexp(logits[0, 0], -1), torch.tensor(0.0, dtype=torch.float64))


def test_iid_source_entropy_and_nll() -> None:
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    src = IIDSource(probs)
    assert math.isclose(src.entropy(), 1.75 * math.log(2), rel_tol=1e-12)
    x = src.sample(20000, 4, torch.Generator().manual_seed(0))
    freq = torch.bincount(x.reshape(-1), minlength=4).double() / x.numel()
    assert torch.allclose(freq, probs, atol=0.01)
    nll = src.nll(x) / 4
    se = float(nll.std()) / math.sqrt(len(nll))
    assert abs(float(nll.mean()) - src.entropy()) < 3 * se
    logits = carry_over_logits(torch.tensor([[4, 0]]), torch.log(probs).expand(1, 2, 4), 4)
    assert torch.allclose(logits[0, 0, :4], torch.log(probs))
