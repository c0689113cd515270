"""The synthetic Markov corpus: exact entropy rate vs brute force, sampler, symbols."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from maskdiff.config import MarkovConfig
from maskdiff.data.markov import MAX_TABLE, make_chain, symbol_alphabet


def _block_entropy(chain, n: int) -> float:
    """H(X_1..X_n) by enumerating all V^n sequences, started from the stationary law."""
    V, k = chain.vocab_size, chain.order
    pi = chain.stationary()
    total = 0.0
    for seq in itertools.product(range(V), repeat=n):
        state = 0
        for x in seq[:k]:
            state = state * V + x
        p = pi[state]
        for x in seq[k:]:
            p *= chain.transition[state, x]
            state = (state % (V ** (k - 1))) * V + x
        total -= p * np.log(p)
    return total


@pytest.mark.parametrize(("vocab", "order", "n"), [(3, 1, 6), (3, 2, 7), (4, 1, 5)])
def test_entropy_rate_matches_brute_force(vocab: int, order: int, n: int) -> None:
    chain = make_chain(MarkovConfig(vocab_size=vocab, order=order, concentration=0.5, seed=7))
    h_n, h_prev = _block_entropy(chain, n), _block_entropy(chain, n - 1)
    # a stationary order-k chain: H(X_n | X_1..X_{n-1}) is exactly the entropy rate for n > k
    assert h_n - h_prev == pytest.approx(chain.entropy_rate(), rel=1e-9)
    assert chain.document_entropy(n) == pytest.approx(h_n, rel=1e-9)


def test_sampler_matches_entropy_rate() -> None:
    chain = make_chain(MarkovConfig(vocab_size=6, order=2, concentration=0.3, seed=3))
    rng = np.random.Generator(np.random.Philox(key=5))
    x = chain.sample(400, 200, rng)  # (400, 200)
    V = chain.vocab_size
    state = x[:, 0] * V + x[:, 1]
    nll = []
    for pos in range(2, x.shape[1]):
        nll.append(-np.log(chain.transition[state, x[:, pos]]))
        state = (state % V) * V + x[:, pos]
    nll = np.concatenate(nll)
    se = nll.std() / np.sqrt(len(nll))
    assert abs(nll.mean() - chain.entropy_rate()) < 4 * se
    # empirical first-symbol frequencies match the stationary marginal
    marginal = chain.stationary().reshape(V, V).sum(axis=1)
    freq = np.bincount(x[:, 0], minlength=V) / len(x)
    assert np.abs(freq - marginal).max() < 0.08


def test_chain_is_seeded_and_rows_are_distributions() -> None:
    cfg = MarkovConfig(vocab_size=8, order=1, seed=11)
    a, b = make_chain(cfg), make_chain(cfg)
    np.testing.assert_array_equal(a.transition, b.transition)
    np.testing.assert_allclose(a.transition.sum(axis=1), 1.0)
    other = make_chain(MarkovConfig(vocab_size=8, order=1, seed=12))
    assert not np.array_equal(a.transition, other.transition)
    assert 0 < a.entropy_rate() < np.log(8)


def test_symbols_are_single_printable_characters() -> None:
    alphabet = symbol_alphabet(4096)
    assert len(set(alphabet)) == 4096
    assert all(ch.isprintable() and not ch.isspace() for ch in alphabet)
    assert symbol_alphabet(10) == "!\"#$%&'()*"
    chain = make_chain(MarkovConfig(vocab_size=5, order=1))
    docs = chain.render(chain.sample(3, 9, np.random.default_rng(0)))
    assert [len(d) for d in docs] == [9, 9, 9]
    assert set("".join(docs)) <= set(symbol_alphabet(5))


def test_too_many_states_is_an_error() -> None:
    with pytest.raises(ValueError, match="data.markov"):
        MarkovConfig(vocab_size=64, order=4)
    cfg = MarkovConfig(vocab_size=64, order=3)  # exactly 2**24 table entries: allowed
    assert cfg.vocab_size ** (cfg.order + 1) == MAX_TABLE
