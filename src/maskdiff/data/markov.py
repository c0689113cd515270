"""A seeded random Markov chain over printable symbols, with its exact entropy rate.

The chain has ``V`` symbols and order ``k``: the next symbol depends on the previous ``k``.
Its state is the tuple of the last ``k`` symbols, encoded as the integer
``s = x_1 V^(k-1) + ... + x_k`` (``V^k`` states). Each state's row of next-symbol
probabilities is an independent Dirichlet(concentration) draw, so every transition has positive
probability and the chain on states is irreducible and aperiodic: it has one stationary
distribution pi over states and the entropy rate

    H = sum_s pi(s) * H(P[s, :])            (nats per symbol),

the lowest NLL per symbol any model can reach on long samples. A document of ``n >= k``
symbols starts from pi, so its exact entropy is ``H(pi) + (n - k) H`` (``H(pi)`` covers the first
``k`` symbols); :meth:`MarkovChain.document_entropy` returns it.

Symbols are single printable, non-space characters (ASCII first), so the character tokenizer
maps one symbol to one token.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from maskdiff.config import MarkovConfig

__all__ = ["MAX_TABLE", "MarkovChain", "make_chain", "symbol_alphabet"]

MAX_TABLE = 1 << 24  # entries V^(k+1) of the float64 transition table (128 MiB)


@lru_cache(maxsize=4)
def symbol_alphabet(size: int) -> str:
    """``size`` distinct printable, non-space, non-combining characters, ASCII first."""
    chars: list[str] = []
    code = 0x21
    while len(chars) < size:
        ch = chr(code)
        if ch.isprintable() and not ch.isspace() and unicodedata.category(ch)[0] in "LNPS":
            chars.append(ch)
        code += 1
    return "".join(chars)


@dataclass(frozen=True)
class MarkovChain:
    """``transition``: (V^k, V) rows of next-symbol probabilities; ``order``: k."""

    transition: np.ndarray
    order: int
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def vocab_size(self) -> int:
        return self.transition.shape[1]

    def stationary(self, tol: float = 1e-14, max_iter: int = 100_000) -> np.ndarray:
        """Stationary distribution over the V^k states, shape (V^k,), by power iteration."""
        if "pi" not in self._cache:
            self._cache["pi"] = self._power_iteration(tol, max_iter)
        return self._cache["pi"]

    def _power_iteration(self, tol: float, max_iter: int) -> np.ndarray:
        V, n_states = self.vocab_size, self.transition.shape[0]
        pi = np.full(n_states, 1.0 / n_states)
        for _ in range(max_iter):
            joint = pi[:, None] * self.transition  # (V^k, V): P(state, next symbol)
            # the next state drops the oldest symbol: sum over it, keep (x_2..x_k, y)
            new = joint.reshape(V, n_states // V, V).sum(axis=0).reshape(-1)
            if np.abs(new - pi).sum() < tol:
                return new / new.sum()
            pi = new
        raise RuntimeError("Markov chain stationary distribution did not converge")

    def entropy_rate(self) -> float:
        """H = sum_s pi(s) H(P[s]) in nats per symbol (exact up to float64 rounding)."""
        p = self.transition
        row_entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)  # (V^k,)
        return float(self.stationary() @ row_entropy)

    def initial_entropy(self) -> float:
        """Entropy in nats of the first k symbols of a document, drawn from pi."""
        pi = self.stationary()
        return float(-(pi * np.log(np.where(pi > 0, pi, 1.0))).sum())

    def document_entropy(self, length: int) -> float:
        """Exact entropy in nats of a document of ``length >= k`` symbols."""
        return self.initial_entropy() + (length - self.order) * self.entropy_rate()

    def sample(self, n_docs: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """(n_docs, length) int symbols, each document started from the stationary law.

        Vectorised over documents: one inverse-CDF lookup per position.
        """
        V, k = self.vocab_size, self.order
        n_states = self.transition.shape[0]
        out = np.empty((n_docs, length), dtype=np.int64)
        state = rng.choice(n_states, size=n_docs, p=self.stationary())
        for j in range(k):  # unpack the initial state into its k symbols
            out[:, j] = (state // V ** (k - 1 - j)) % V
        cdf = np.cumsum(self.transition, axis=1)  # (V^k, V)
        cdf[:, -1] = 1.0
        for pos in range(k, length):
            u = rng.random(n_docs)
            nxt = (u[:, None] > cdf[state]).sum(axis=1)  # (n_docs,)
            out[:, pos] = nxt
            state = (state % (n_states // V)) * V + nxt
        return out

    def render(self, symbols: np.ndarray) -> list[str]:
        """(n_docs, length) symbols -> one string per document, one character per symbol."""
        alphabet = np.array(list(symbol_alphabet(self.vocab_size)))
        return ["".join(row) for row in alphabet[symbols]]


def make_chain(cfg: MarkovConfig) -> MarkovChain:
    """The chain of ``cfg``: rows ~ Dirichlet(concentration), from ``cfg.seed``."""
    n_states = cfg.vocab_size**cfg.order
    if n_states * cfg.vocab_size > MAX_TABLE:
        raise ValueError(
            f"data.markov: a transition table of {n_states * cfg.vocab_size} entries exceeds "
            f"{MAX_TABLE}; lower data.markov.vocab_size or data.markov.order"
        )
    rng = np.random.Generator(np.random.Philox(key=cfg.seed))
    alpha = np.full(cfg.vocab_size, cfg.concentration)
    transition = rng.dirichlet(alpha, size=n_states)
    # Dirichlet draws with tiny concentration can underflow to exact zeros; keep rows positive
    transition = np.maximum(transition, 1e-300)
    transition /= transition.sum(axis=1, keepdims=True)
    return MarkovChain(transition, cfg.order)
