"""The NELBO terms of maskdiff.elbo on hand-checkable inputs."""

from __future__ import annotations

import math

import pytest
import torch

from maskdiff.elbo import (
    ar_token_nll,
    block_means,
    continuous_terms,
    discrete_terms,
    masked_nll,
    ratio_and_se,
    token_log_probs,
    unigram_log_probs,
)
from maskdiff.schedule import CosineSchedule, LinearSchedule


def test_mask_class_is_ignored_and_v_equals_m_accepted() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, generator=g)  # m = 4
    x0 = torch.randint(0, 4, (2, 5), generator=g)
    with_mask = torch.cat([logits, torch.full((2, 5, 1), 7.0)], -1)  # a large [M] logit
    a = token_log_probs(logits, x0, 4)
    b = token_log_probs(with_mask, x0, 4)
    assert a.dtype == torch.float64 and torch.allclose(a, b)
    expected = torch.log_softmax(logits.double(), -1).gather(-1, x0[..., None])[..., 0]
    assert torch.allclose(a, expected)
    with pytest.raises(ValueError):
        token_log_probs(logits[..., :3], x0, 4)


def test_masked_nll_sums_masked_positions_only() -> None:
    # m = 2 real tokens, V = 3 (the [M] class last). Unmasked positions are scored by nothing,
    # whether the denoiser gives them a proper distribution (position 0) or a carry-over
    # (position 3: 0 on the observed token, -inf elsewhere).
    ninf = -math.inf
    logits = torch.tensor(
        [
            [
                [0.0, math.log(3.0), ninf],  # unmasked, p = (1/4, 3/4): must not count
                [0.0, math.log(3.0), 5.0],  # masked, x0 = 0: -log(1/4), the [M] logit ignored
                [0.0, 0.0, ninf],  # masked, x0 = 1: -log(1/2)
                [ninf, 0.0, ninf],  # unmasked carry-over of token 1
            ]
        ],
        dtype=torch.float64,
    )
    x0 = torch.tensor([[1, 0, 1, 1]])
    mask = torch.tensor([[False, True, True, False]])
    nll = masked_nll(logits, x0, mask, 2)
    assert nll.dtype == torch.float64
    assert torch.allclose(nll, torch.tensor([math.log(4.0) + math.log(2.0)], dtype=torch.float64))
    # every position masked: the unmasked one's -log(3/4) now counts
    every = masked_nll(logits, x0, torch.ones_like(mask), 2)
    assert torch.allclose(every, nll + math.log(4.0 / 3.0))


def test_weights() -> None:
    nll = torch.tensor([2.0, 3.0], dtype=torch.float64)
    t = torch.tensor([0.25, 0.5])
    assert torch.allclose(continuous_terms(nll, t, LinearSchedule()), nll / t.double())
    # linear schedule, step i of T: (alpha_s - alpha_t)/(1 - alpha_t) = (1/T) / (i/T) = 1/i
    step = torch.tensor([1, 4])
    assert torch.allclose(discrete_terms(nll, step, 10, LinearSchedule()), nll / step.double())
    # the first step's weight is 1 for every schedule (alpha(0) = 1)
    w = discrete_terms(torch.ones(1, dtype=torch.float64), torch.tensor([1]), 7, CosineSchedule())
    assert torch.allclose(w, torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError):
        discrete_terms(nll, torch.tensor([0, 11]), 10, LinearSchedule())


def test_block_means_and_ratio_se() -> None:
    values = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0, 11.0], dtype=torch.float64)
    idx = torch.tensor([0, 0, 1, 1, 2, 2])
    per_block = block_means(values, idx, 3)
    assert torch.equal(per_block, torch.tensor([2.0, 6.0, 10.0], dtype=torch.float64))
    r, se = ratio_and_se(per_block, torch.full((3,), 4.0))
    assert math.isclose(r, 18.0 / 12.0)
    assert math.isclose(se, float(per_block.std()) / math.sqrt(3) / 4.0, rel_tol=1e-12)
    with pytest.raises(ValueError):
        block_means(values, idx, 4)  # block 3 has no rows


def test_ar_token_nll_and_unigram() -> None:
    m = 3
    logp = torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
    logits = logp.expand(1, 4, m)  # the same prediction at every position
    x = torch.tensor([[2, 0, 1, 2]])
    first = unigram_log_probs(torch.tensor([0, 0, 1, 2]), m, smoothing=1.0)
    assert torch.allclose(first.exp(), torch.tensor([3, 2, 2], dtype=torch.float64) / 7)
    nll = ar_token_nll(logits, x, m, first)
    assert torch.allclose(nll[0, 0], -first[2])
    assert torch.allclose(nll[0, 1:], -logp[x[0, 1:]])
    assert torch.isnan(ar_token_nll(logits, x, m, None)[0, 0])
