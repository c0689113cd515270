"""Sample quality against sampling cost: the sampler frontier, with an exact judge on markov.

A sampler trades network calls for quality. To read that trade-off one needs a judge of the
samples. Two judges are provided:

:class:`MarkovJudge` (the built-in ``markov`` corpus, exact)
    The corpus is drawn from a known chain of order k over V symbols (:mod:`maskdiff.data.markov`),
    one symbol one token (char tokenizer), documents joined by EOS. Each document starts from the
    stationary law, so every window of a document is a stationary stretch of the chain: the state
    (previous k symbols) before any position of a document is distributed as pi, and where the
    EOS tokens fall does not depend on the symbols. Hence, for samples drawn from the data's own
    block law, every position that has k preceding symbols in the same EOS-free run has
    expected true NLL ``E[-log P(x_l | x_{l-k..l-1})] = sum_s pi(s) H(P[s]) = h``, the entropy
    rate, whichever positions are scored. The judge scores exactly those positions under the true
    chain and reports their mean NLL next to h: a perfect sampler's mean has expectation h. Lower
    is not better: a sampler that collapses onto the likeliest continuations scores below h, and
    then also shows a unigram entropy below the chain's stationary one. Both are reported, with
    the shares of EOS (the data's share alongside) and [UNK] tokens. (The samples' unigram
    entropy is a plug-in estimate, low by about (V - 1) / (2 N) nats for N symbols.)

    For infilling, templates are cut from held-out documents (gaps and known tokens in one
    EOS-free window of a document, a stationary stretch of the chain), and the judge returns the
    true conditional NLL of the filled gaps given the known tokens, ``-log P(gaps | known)``, by
    the forward algorithm on the chain's states (gaps summed out). What a perfect sampler gets in
    expectation is the conditional entropy ``H(gaps | known)``; it is computed exactly per
    template (the chain conditioned on the known tokens is again a Markov chain on states, whose
    entropy follows from the backward messages), so its only uncertainty is over which templates
    were drawn, reported as a standard error over templates. Fills that put EOS or [UNK] in a
    gap are counted apart (:meth:`MarkovJudge.score_infill` says why a block model does so).

    :func:`oracle_model` drives the same samplers with the chain's exact denoiser (order 1): the
    sampler's own error, without the network's.

:class:`ARJudge` (any corpus)
    The AR baseline trained in the same run scores the samples: NLL per token and generative
    perplexity, labelled :data:`maskdiff.sampling.GEN_PPL_LABEL` (a judge of the same size as
    the sampler, not a large pretrained model). With a blocks folder it also scores held-out
    blocks the same way, as the reference a sampler as good as the data would reach.

:func:`sampler_frontier` and :func:`infill_frontier` run every sampler at every number of
steps through a :class:`maskdiff.textgen.TextModel`, timing the sampling call;
:func:`frontier_markdown` prints the rows as tables, :func:`frontier_metrics` flattens them for
MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from maskdiff.checkpoint import load_model
from maskdiff.config import MarkovConfig
from maskdiff.data.contracts import read_blocks
from maskdiff.data.markov import MarkovChain, make_chain, symbol_alphabet
from maskdiff.data.stage import list_shards, read_manifest
from maskdiff.data.tokenizer import Tokenizer, load_tokenizer
from maskdiff.elbo import ar_token_nll
from maskdiff.infill import Template, continuation_template
from maskdiff.oracle import MarkovSource
from maskdiff.runtime import inference_context
from maskdiff.sampling import GEN_PPL_LABEL, unigram_entropy
from maskdiff.scoring import first_token_model
from maskdiff.textgen import TextModel, heldout_templates

__all__ = [
    "ARJudge",
    "FrontierRow",
    "InfillQuality",
    "MarkovJudge",
    "NotMarkovError",
    "SampleQuality",
    "frontier_markdown",
    "frontier_metrics",
    "infill_frontier",
    "infill_templates",
    "make_judge",
    "markov_judge",
    "oracle_model",
    "sampler_frontier",
]

MARKOV_LABEL = "exact: the markov chain the corpus was drawn from"
INFILL_METHOD = "exact (forward-backward on the chain's states)"


class NotMarkovError(ValueError):
    """The corpus or tokenizer does not allow the exact markov judge; the message says why."""


def _ratio_se(sums: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """sum(sums) / sum(counts) and its standard error over the independent rows (delta method
    for a ratio of means; with equal counts it is the usual std / sqrt(n))."""
    total = float(counts.sum())
    if total == 0:
        return math.nan, math.nan
    mean = float(sums.sum()) / total
    n = len(sums)
    if n < 2:
        return mean, math.nan
    resid = sums - mean * counts
    return mean, math.sqrt(float((resid**2).sum()) * n / (n - 1)) / total


def _array(x: Tensor | np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """Token ids as an int64 numpy array."""
    return np.asarray(x.cpu() if isinstance(x, Tensor) else x, dtype=np.int64)


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _rows_entropy(q: np.ndarray) -> np.ndarray:
    """Entropy of each distribution along the last axis (0 log 0 = 0)."""
    safe = np.where(q > 0, q, 1.0)
    return -(q * np.log(safe)).sum(-1)


# ----------------------------------------------------------------------------- quality records


@dataclass(frozen=True)
class SampleQuality:
    """How good unconditional samples are, by one judge. ``nll``: nats per scored token.

    ``reference_*``: what samples as good as the data get (markov: exact, the entropy rate, the
    chain's stationary unigram entropy and the corpus's EOS share; AR: the judge on held-out
    blocks, when it was given them)."""

    judge: str
    nll: float
    nll_se: float
    n_scored: int
    n_tokens: int
    unigram_entropy: float  # nats, of the samples' symbols (markov) or tokens (AR)
    eos_share: float
    unk_share: float
    reference_nll: float | None = None
    reference_unigram_entropy: float | None = None
    reference_eos_share: float | None = None

    @property
    def gen_ppl(self) -> float:
        return math.exp(self.nll) if math.isfinite(self.nll) else math.nan

    @property
    def excess(self) -> float | None:
        """nll - reference_nll: 0 for a perfect sampler (in expectation), < 0 when collapsed."""
        return None if self.reference_nll is None else self.nll - self.reference_nll

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gen_ppl": self.gen_ppl, "excess": self.excess}


@dataclass(frozen=True)
class InfillQuality:
    """True conditional NLL of filled gaps, per gap token, against the conditional entropy."""

    judge: str
    n_templates: int
    n_gap_tokens: int
    nll: float  # -log P(gaps | known) per gap token
    nll_se: float
    conditional_entropy: float  # H(gaps | known) per gap token: a perfect sampler's expectation
    conditional_entropy_se: float  # over the templates drawn (each one's entropy is exact)
    excess: float  # nll - conditional_entropy, paired by template
    excess_se: float
    n_invalid: int = 0  # templates whose fill put EOS or [UNK] in a gap (not scored above)
    invalid_token_share: float = 0.0  # share of gap tokens that are not chain symbols
    method: str = INFILL_METHOD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- the markov judge


@dataclass(eq=False)
class MarkovJudge:
    """The exact judge of the markov corpus (module docstring).

    ``token_symbol``: (m,) the chain symbol of each real token id, -1 for EOS, [UNK] and any
    other non-symbol; ``mask_id`` (= m) marks gaps in templates. ``documents``: the documents
    stage folder (held-out windows for infilling), when built from one."""

    chain: MarkovChain
    token_symbol: np.ndarray
    eos_id: int
    unk_id: int | None
    mask_id: int
    reference_eos_share: float | None = None
    documents: Path | None = None
    label: str = MARKOV_LABEL
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    # -------------------------------------------------------------- construction

    @classmethod
    def from_stages(cls, documents: str | Path, tokenizer: Tokenizer | str | Path) -> MarkovJudge:
        """From a documents stage folder (its manifest records the chain's config) and the
        tokenizer (a :class:`Tokenizer` or its stage folder). Raises :class:`NotMarkovError`
        for another corpus or a tokenizer that does not map one symbol to one token."""
        documents = Path(documents)
        manifest = read_manifest(documents)
        source = manifest.get("config", {})
        if source.get("source") != "builtin" or source.get("builtin") != "markov":
            where = source.get("builtin") or source.get("source") or "unknown"
            raise NotMarkovError(
                f"{documents}: the corpus is {where!r}, not the built-in markov chain; there is no "
                "exact judge (use the AR judge)"
            )
        cfg = MarkovConfig.model_validate(source["markov"])
        chain = make_chain(cfg)
        recorded = manifest.get("stats", {}).get("markov", {}).get("entropy_rate_nats_per_symbol")
        if recorded is not None and not math.isclose(recorded, chain.entropy_rate(), rel_tol=1e-9):
            raise NotMarkovError(
                f"{documents}: the chain rebuilt from the manifest has entropy rate "
                f"{chain.entropy_rate():.6f}, the manifest records {recorded:.6f}; the chain's "
                "code changed since the stage was built"
            )
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
        judge = cls.for_tokenizer(chain, tok)
        counts = manifest.get("stats", {})
        docs, chars = counts.get("documents", {}), counts.get("chars", {})
        if docs.get("train") and chars.get("train") is not None:
            judge.reference_eos_share = docs["train"] / (chars["train"] + docs["train"])
        judge.documents = documents
        return judge

    @classmethod
    def for_tokenizer(cls, chain: MarkovChain, tok: Tokenizer) -> MarkovJudge:
        """Map the tokenizer's ids to the chain's symbols (rendered by ``symbol_alphabet``)."""
        alphabet = symbol_alphabet(chain.vocab_size)
        token_symbol = np.full(tok.vocab_size, -1, dtype=np.int64)
        for sym, ch in enumerate(alphabet):
            ids = tok.encode([ch])[0]
            if len(ids) == 1 and ids[0] not in (tok.eos_id, tok.unk_id):
                token_symbol[ids[0]] = sym
        specials = {tok.eos_id, tok.unk_id}
        stray = [t for t in range(tok.vocab_size) if t not in specials and token_symbol[t] < 0]
        if stray:
            shown = ", ".join(repr(tok.decode([t])) for t in stray[:5])
            raise NotMarkovError(
                f"tokens {shown} ({len(stray)} in all) are not single symbols of the chain; the "
                "exact judge needs the char tokenizer (tokenizer.kind=char)"
            )
        return cls(chain, token_symbol, tok.eos_id, tok.unk_id, tok.mask_id)

    @classmethod
    def for_chain(cls, chain: MarkovChain, eos_id: int = 0, unk_id: int | None = 1) -> MarkovJudge:
        """The char tokenizer's layout without a tokenizer: EOS, [UNK], then symbol i at id
        i + 2 (every symbol seen in training); [MASK] last."""
        first = 1 + (unk_id is not None)
        m = first + chain.vocab_size
        token_symbol = np.full(m, -1, dtype=np.int64)
        token_symbol[first:] = np.arange(chain.vocab_size)
        return cls(chain, token_symbol, eos_id, unk_id, m)

    # -------------------------------------------------------------- the chain's numbers

    @property
    def order(self) -> int:
        return self.chain.order

    @property
    def n_symbols(self) -> int:
        return self.chain.vocab_size

    def entropy_rate(self) -> float:
        """h, nats per symbol: a perfect sampler's expected NLL per scored token."""
        return self.chain.entropy_rate()

    def symbol_marginal(self) -> np.ndarray:
        """(V,) the stationary law of one symbol (the last symbol of a state under pi)."""
        V = self.n_symbols
        return self.chain.stationary().reshape(-1, V).sum(axis=0)

    def unigram_entropy(self) -> float:
        """Entropy of the stationary single-symbol law, nats."""
        return _entropy(self.symbol_marginal())

    def _symbols(self, tokens: Tensor | np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
        ids = _array(tokens)
        if ids.ndim != 2:
            raise ValueError(f"tokens must be (n, P), got shape {ids.shape}")
        known = (ids >= 0) & (ids < len(self.token_symbol))
        return np.where(known, self.token_symbol[np.clip(ids, 0, len(self.token_symbol) - 1)], -1)

    # -------------------------------------------------------------- unconditional samples

    def token_nll(self, tokens: Tensor | np.ndarray) -> np.ndarray:
        """(n, P) float64: -log P(x_l | previous k symbols) at every position whose k
        predecessors are symbols of the same EOS-free run (and which is itself a symbol); NaN
        elsewhere (EOS, [UNK], a run's first k symbols)."""
        sym = self._symbols(tokens)
        n, P = sym.shape
        k, V = self.order, self.n_symbols
        out = np.full((n, P), np.nan)
        if k >= P:
            return out
        is_sym = sym >= 0
        scored = is_sym[:, k:].copy()
        state = np.zeros((n, P - k), dtype=np.int64)
        for j in range(k):  # the symbol j + 1 places back of each scored position
            back = sym[:, k - 1 - j : P - 1 - j]
            scored &= back >= 0
            state += np.clip(back, 0, None) * V**j
        logp = np.log(self.chain.transition[state, np.clip(sym[:, k:], 0, None)])
        out[:, k:] = np.where(scored, -logp, np.nan)
        return out

    def score(self, tokens: Tensor | np.ndarray) -> SampleQuality:
        """The samples' true NLL per scored token (± SE over samples) next to the entropy rate,
        their symbols' unigram entropy next to the chain's, and the EOS and [UNK] shares."""
        ids = _array(tokens)
        nll = self.token_nll(ids)
        scored = ~np.isnan(nll)
        mean, se = _ratio_se(np.where(scored, nll, 0.0).sum(1), scored.sum(1).astype(float))
        sym = self._symbols(ids)
        counts = np.bincount(sym[sym >= 0], minlength=self.n_symbols).astype(float)
        uni = _entropy(counts / counts.sum()) if counts.sum() else math.nan
        unk = float((ids == self.unk_id).mean()) if self.unk_id is not None else 0.0
        return SampleQuality(
            judge=self.label,
            nll=mean,
            nll_se=se,
            n_scored=int(scored.sum()),
            n_tokens=int(ids.size),
            unigram_entropy=uni,
            eos_share=float((ids == self.eos_id).mean()),
            unk_share=unk,
            reference_nll=self.entropy_rate(),
            reference_unigram_entropy=self.unigram_entropy(),
            reference_eos_share=self.reference_eos_share,
        )

    # -------------------------------------------------------------- infilling

    def _evidence(self, template: np.ndarray) -> np.ndarray:
        """(n, P, V) 0/1: which symbols each position allows (all at a gap, one if known)."""
        ids = _array(template)
        gap = ids == self.mask_id
        sym = self._symbols(np.where(gap, 0, ids))
        if bool(((sym < 0) & ~gap).any()):
            raise ValueError(
                "a template's known tokens must all be symbols of the chain (one EOS-free run)"
            )
        ev = np.zeros((*ids.shape, self.n_symbols))
        np.put_along_axis(ev, np.clip(sym, 0, None)[..., None], 1.0, axis=-1)
        ev[gap] = 1.0
        return ev

    def _state_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """``nxt`` (S, V): the state after s and symbol y; ``digits`` (S, k): s's symbols."""
        if "tables" not in self._cache:
            V, k = self.n_symbols, self.order
            S = V**k
            s = np.arange(S)
            nxt = (s % (S // V))[:, None] * V + np.arange(V)[None, :]
            digits = np.stack([(s // V ** (k - 1 - j)) % V for j in range(k)], axis=1)
            self._cache["tables"] = (nxt, digits)
        return self._cache["tables"]

    def _initial(self, ev: np.ndarray) -> np.ndarray:
        """(n, S): pi(s) times the evidence on the first k positions."""
        _, digits = self._state_tables()
        w = np.broadcast_to(self.chain.stationary(), (ev.shape[0], digits.shape[0])).copy()
        for j in range(self.order):
            w *= ev[:, j, digits[:, j]]
        return w

    def log_marginal(self, template: Tensor | np.ndarray) -> np.ndarray:
        """(n,) log P(known tokens) of each window, gaps summed out (forward algorithm on the
        chain's states); a window without gaps gets its log-probability. Windows are stationary
        stretches of the chain, at least k tokens long."""
        ev = self._evidence(template)
        n, P, V = ev.shape
        if self.order > P:
            raise ValueError(f"a window needs at least k = {self.order} tokens, got {P}")
        S = V**self.order
        a = self._initial(ev)
        log_z = np.zeros(n)
        for pos in range(self.order, P + 1):
            z = a.sum(-1)
            log_z += np.log(z)
            a = a / z[:, None]
            if pos == P:
                break
            joint = a[:, :, None] * self.chain.transition[None]  # (n, S, V)
            a = joint.reshape(n, V, S // V, V).sum(1).reshape(n, S)  # drop the oldest symbol
            a = a * np.tile(ev[:, pos], S // V)  # the state's last symbol is the new one
        return log_z

    def conditional_nll(
        self, template: Tensor | np.ndarray, filled: Tensor | np.ndarray
    ) -> np.ndarray:
        """(n,) -log P(gaps as filled | known tokens), nats per template."""
        filled, template = _array(filled), _array(template)
        known = template != self.mask_id
        if bool((filled[known] != template[known]).any()):
            raise ValueError("the filled rows changed known tokens of their templates")
        return self.log_marginal(template) - self.log_marginal(filled)

    def conditional_entropy(self, template: Tensor | np.ndarray) -> np.ndarray:
        """(n,) H(gaps | known tokens) in nats, exactly: the chain given the known tokens is a
        Markov chain on states with transitions Q_l(s, y) proportional to
        P[s, y] e_l(y) beta_l(next(s, y)) (beta: backward messages), started from the posterior
        of the first state; its entropy is H(first state) + sum_l E[H(Q_l(S_{l-1}, .))]."""
        ev = self._evidence(template)
        n, P, V = ev.shape
        k, S = self.order, V**self.order
        nxt, _ = self._state_tables()
        T = self.chain.transition
        beta = np.ones((n, P, S))  # beta[:, l]: P(evidence after l | state at l), rescaled
        for pos in range(P - 1, k - 1, -1):
            w = T[None] * ev[:, pos, None, :] * beta[:, pos][:, nxt]  # (n, S, V)
            b = w.sum(-1)
            beta[:, pos - 1] = b / b.max(-1, keepdims=True)
        g = self._initial(ev) * beta[:, k - 1]
        g /= g.sum(-1, keepdims=True)
        total = _rows_entropy(g)
        for pos in range(k, P):
            w = T[None] * ev[:, pos, None, :] * beta[:, pos][:, nxt]  # (n, S, V)
            z = w.sum(-1, keepdims=True)
            q = w / np.where(z > 0, z, 1.0)
            total += (g * _rows_entropy(q)).sum(-1)
            flow = g[:, :, None] * q  # (n, S, V): P(S_{l-1} = s, x_l = y | evidence)
            g = np.zeros((n, S))
            np.add.at(g, (slice(None), nxt.reshape(-1)), flow.reshape(n, -1))
        return total

    def score_infill(
        self, templates: Tensor | np.ndarray, filled: Tensor | np.ndarray
    ) -> InfillQuality:
        """The filled gaps' true conditional NLL per gap token against the conditional entropy
        (both summed per template; standard errors over templates).

        A fill that puts EOS or [UNK] in a gap has probability 0 under the chain (the window is
        one document); such templates are counted in ``n_invalid`` and left out of both means.
        A model of the block law is right to do so at times: nothing in the template says the
        window is one document, and a document boundary falls in a gap of g tokens with
        probability about g / (document length + 1). Given no boundary in the gap, the block
        law's fill is the chain's conditional law, so the paired comparison on the kept
        templates stays exact."""
        tpl, out = _array(templates), _array(filled)
        gap = tpl == self.mask_id
        bad = gap & (self._symbols(out) < 0)
        ok = ~bad.any(1)
        gaps = gap[ok].sum(1).astype(float)
        nll = self.conditional_nll(tpl[ok], out[ok])
        ent = self.conditional_entropy(tpl[ok])
        m_nll, se_nll = _ratio_se(nll, gaps)
        m_ent, se_ent = _ratio_se(ent, gaps)
        m_exc, se_exc = _ratio_se(nll - ent, gaps)
        share = float(bad.sum() / max(int(gap.sum()), 1))
        return InfillQuality(self.label, len(tpl), int(gaps.sum()), m_nll, se_nll, m_ent, se_ent,
                             m_exc, se_exc, int((~ok).sum()), share)  # fmt: skip

    def sample_posterior(
        self, template: Tensor | np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """One exact draw of the gaps given the known tokens per template (forward filtering,
        backward sampling): the filled (n, P) token ids. For Monte Carlo checks."""
        tpl = _array(template)
        ev = self._evidence(tpl)
        n, P, V = ev.shape
        k, S = self.order, V**self.order
        nxt, digits = self._state_tables()
        T = self.chain.transition
        beta = np.ones((n, P, S))
        for pos in range(P - 1, k - 1, -1):
            b = (T[None] * ev[:, pos, None, :] * beta[:, pos][:, nxt]).sum(-1)
            beta[:, pos - 1] = b / b.max(-1, keepdims=True)
        g = self._initial(ev) * beta[:, k - 1]
        rows = np.arange(n)
        state = _draw(g, rng)
        sym = np.empty((n, P), dtype=np.int64)
        sym[:, :k] = digits[state]
        for pos in range(k, P):
            w = T[state] * ev[:, pos] * beta[rows, pos][rows[:, None], nxt[state]]  # (n, V)
            y = _draw(w, rng)
            sym[:, pos] = y
            state = nxt[state, y]
        symbol_token = np.full(V, -1, dtype=np.int64)
        present = self.token_symbol >= 0
        symbol_token[self.token_symbol[present]] = np.nonzero(present)[0]
        return np.where(tpl == self.mask_id, symbol_token[sym], tpl)

    def heldout_windows(
        self, n: int, length: int, split: str = "validation", seed: int = 0
    ) -> list[list[int]]:
        """Up to ``n`` windows of ``length`` token ids inside held-out documents of ``split``:
        stationary stretches of the chain. A document gives windows every ``2 * length``
        symbols from a random offset (a window's length apart, so that windows of one document
        are nearly independent for a chain that mixes within a window)."""
        if self.documents is None:
            raise ValueError("this judge was not built from a documents stage")
        symbol_token = np.full(self.n_symbols, -1, dtype=np.int64)
        present = self.token_symbol >= 0
        symbol_token[self.token_symbol[present]] = np.nonzero(present)[0]
        alphabet = {ch: i for i, ch in enumerate(symbol_alphabet(self.n_symbols))}
        rng = np.random.default_rng(seed)
        out: list[list[int]] = []
        for shard in list_shards(self.documents, split):
            for text in pq.read_table(shard, columns=["text"]).column("text").to_pylist():
                if len(text) < length:
                    continue
                slack = (len(text) - length) % (2 * length)
                for start in range(int(rng.integers(0, slack + 1)), len(text) - length + 1,
                                   2 * length):  # fmt: skip
                    sym = [alphabet.get(ch, -1) for ch in text[start : start + length]]
                    ids = [int(symbol_token[s]) if s >= 0 else -1 for s in sym]
                    if min(ids) < 0:
                        continue  # a character the tokenizer or the chain does not know
                    out.append(ids)
                    if len(out) == n:
                        return out
        return out

    # -------------------------------------------------------------- an exact denoiser

    def token_source(self) -> MarkovSource:
        """The chain on token ids as a :class:`maskdiff.oracle.MarkovSource` (order 1 only):
        its ``denoiser`` is the exact p(x0 | x_t) for an EOS-free block (EOS, [UNK] never
        drawn). A sampler driven by it isolates the sampler's own error from the model's."""
        if self.order != 1:
            raise ValueError("the exact token-level denoiser is implemented for order 1 only")
        m, V = len(self.token_symbol), self.n_symbols
        present = self.token_symbol >= 0
        if int(present.sum()) != V:
            raise ValueError("every symbol must have a token for the exact denoiser")
        A = np.zeros((m, m))
        sym_ids = np.nonzero(present)[0]
        order = self.token_symbol[sym_ids]
        A[np.ix_(sym_ids, sym_ids)] = self.chain.transition[np.ix_(order, order)]
        others = np.nonzero(~present)[0]
        A[np.ix_(others, sym_ids)] = 1.0 / V  # never reached: EOS and [UNK] have no inflow
        return MarkovSource(torch.from_numpy(A))


def _draw(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One index per row of (n, K) non-negative weights."""
    cdf = np.cumsum(weights, axis=-1)
    u = rng.random(len(weights)) * cdf[:, -1]
    return np.minimum((cdf <= u[:, None]).sum(-1), weights.shape[-1] - 1)


def markov_judge(documents: str | Path, tokenizer: Tokenizer | str | Path) -> MarkovJudge | None:
    """:meth:`MarkovJudge.from_stages`, or None where the corpus or tokenizer does not allow it."""
    try:
        return MarkovJudge.from_stages(documents, tokenizer)
    except NotMarkovError:
        return None


# ----------------------------------------------------------------------------- the AR judge


class ARJudge:
    """The AR baseline of the run as a judge of samples (:data:`GEN_PPL_LABEL`).

    Tokens are scored given their left context within windows of the AR model's block length;
    each window's first token by ``first_log_probs`` (the training unigram) when given, else
    left out. ``reference``: the same numbers on held-out blocks."""

    label = GEN_PPL_LABEL

    def __init__(
        self,
        model: torch.nn.Module,
        vocab_size: int,
        block_length: int,
        first_log_probs: Tensor | None = None,
        eos_id: int | None = None,
        unk_id: int | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
    ) -> None:
        self.model, self.vocab_size, self.block_length = model, vocab_size, block_length
        self.first_log_probs, self.eos_id, self.unk_id = first_log_probs, eos_id, unk_id
        self.device, self.batch_size = torch.device(device), batch_size
        self.reference: SampleQuality | None = None

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        blocks: str | Path | None = None,
        tokenizer: Tokenizer | str | Path | None = None,
        *,
        device: torch.device | str = "cpu",
        use_ema: bool = True,
        reference_split: str = "validation",
        reference_blocks: int = 64,
    ) -> ARJudge:
        """The AR checkpoint; with ``blocks`` (the run's blocks stage) its first-token unigram
        and, on ``reference_blocks`` held-out blocks, the reference numbers."""
        model, cfg = load_model(checkpoint, use_ema=use_ema, device=device)
        if cfg.model.kind != "ar":
            raise ValueError(f"{checkpoint}: a {cfg.model.kind} checkpoint cannot judge as AR")
        vocab = int(model.vocab_size)
        first = first_token_model(blocks, vocab) if blocks is not None else None
        tok = None
        if tokenizer is not None:
            tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
        judge = cls(model, vocab, cfg.data.seq_len, first,
                    eos_id=tok.eos_id if tok else None, unk_id=tok.unk_id if tok else None,
                    device=device)  # fmt: skip
        if blocks is not None and reference_blocks > 0:
            held = read_blocks(list_shards(blocks, reference_split), max_blocks=reference_blocks)
            if len(held.input_ids):
                judge.reference = judge.score(torch.from_numpy(held.input_ids).long())
        return judge

    def token_nll(self, tokens: Tensor) -> Tensor:
        """(n, P) float64 -log p(x_l | left context in its window); NaN where not scored."""
        x_all = torch.as_tensor(tokens).long().cpu()
        out = torch.full(x_all.shape, math.nan, dtype=torch.float64)
        L = self.block_length
        with inference_context(self.model):
            for lo in range(0, x_all.shape[1], L):
                for start in range(0, x_all.shape[0], self.batch_size):
                    x = x_all[start : start + self.batch_size, lo : lo + L]
                    logits = self.model(x.to(self.device)).cpu()
                    nll = ar_token_nll(logits, x, self.vocab_size, self.first_log_probs)
                    out[start : start + self.batch_size, lo : lo + L] = nll
        return out

    def score(self, tokens: Tensor | np.ndarray) -> SampleQuality:
        x = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, Tensor) else tokens)
        x = x.long().cpu()
        nll = self.token_nll(x).numpy()
        scored = ~np.isnan(nll)
        mean, se = _ratio_se(np.where(scored, nll, 0.0).sum(1), scored.sum(1).astype(float))
        ref = self.reference
        return SampleQuality(
            judge=self.label,
            nll=mean,
            nll_se=se,
            n_scored=int(scored.sum()),
            n_tokens=int(x.numel()),
            unigram_entropy=unigram_entropy(x),
            eos_share=float((x == self.eos_id).double().mean())
            if self.eos_id is not None
            else math.nan,
            unk_share=float((x == self.unk_id).double().mean()) if self.unk_id is not None else 0.0,
            reference_nll=ref.nll if ref else None,
            reference_unigram_entropy=ref.unigram_entropy if ref else None,
            reference_eos_share=ref.eos_share if ref else None,
        )


def make_judge(
    documents: str | Path,
    tokenizer: Tokenizer | str | Path,
    *,
    blocks: str | Path | None = None,
    ar_checkpoint: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> MarkovJudge | ARJudge | None:
    """The exact markov judge where the corpus allows it, else the AR judge when an AR
    checkpoint is given, else None."""
    judge = markov_judge(documents, tokenizer)
    if judge is not None:
        return judge
    if ar_checkpoint is not None:
        return ARJudge.load(ar_checkpoint, blocks, tokenizer, device=device)
    return None


# ----------------------------------------------------------------------------- the frontier


@dataclass(frozen=True)
class FrontierRow:
    """One sampler at one number of steps: cost (network calls, wall clock of the sampling
    call) and quality (``quality``) of ``n_samples`` rows of ``length`` tokens."""

    task: str  # "sample" (unconditional) or "infill"
    sampler: str
    steps: int
    n_samples: int
    length: int
    generated_tokens: int  # gap tokens filled, all rows
    network_calls: int
    seconds: float
    quality: SampleQuality | InfillQuality
    settings: dict[str, Any] = field(default_factory=dict)
    model: str = "model"  # or "exact denoiser" for oracle rows

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "quality"}
        out["tokens_per_second"] = self.tokens_per_second
        out["quality"] = self.quality.to_dict()
        return out


def _steps_list(steps: Sequence[int | str | None], L: int) -> list[int]:
    out: list[int] = []
    for s in steps:
        value = L if s is None or s == "L" else int(s)
        if value < 1:
            raise ValueError(f"steps must be at least 1, got {value}")
        if value not in out:
            out.append(value)
    return sorted(out)


def _settings(model: TextModel, sampler: str, steps: int, seed: int, overrides: dict) -> Any:
    return model.settings(sampler=sampler, steps=steps, seed=seed, **overrides)


def _kept_settings(cfg: Any, model: TextModel) -> dict[str, Any]:
    out = cfg.model_dump(include={"top_p", "cached", "confidence", "remask_eta"})
    out["cached"] = bool(cfg.cached and not model.cfg.model.time_conditioning)
    return out


def sampler_frontier(
    model: TextModel,
    judge: MarkovJudge | ARJudge,
    *,
    samplers: Sequence[str] = ("ancestral", "confidence", "remask"),
    steps: Sequence[int | str | None] = (8, 16, 32, 64, 128, "L"),
    n_samples: int = 16,
    seed: int = 0,
    length: int | None = None,
    label: str = "model",
    **overrides: Any,
) -> list[FrontierRow]:
    """Unconditional samples from every sampler at every number of steps ("L" or None: the
    block length), each judged by ``judge``. The same ``seed`` for every run; ``length``
    default L (longer: semi-autoregressive); ``overrides`` as :meth:`TextModel.settings`
    (``top_p``, ``remask_eta``, ...). Seconds: the sampling call's wall clock."""
    L = model.block_length
    n = length or L
    template = continuation_template("", model.tokenizer, n)
    rows = []
    for sampler in samplers:
        for T in _steps_list(steps, L):
            cfg = _settings(model, sampler, T, seed, overrides)
            out = model.fill_templates([template] * n_samples, cfg)
            tokens = torch.tensor([f.tokens for f in out.filled], dtype=torch.long)
            rows.append(FrontierRow("sample", sampler, T, n_samples, n, tokens.numel(),
                                    out.network_calls, out.seconds, judge.score(tokens),
                                    _kept_settings(cfg, model), label))  # fmt: skip
    return rows


def infill_templates(
    judge: MarkovJudge,
    tokenizer: Tokenizer,
    n: int,
    length: int,
    gap: int,
    split: str = "validation",
    seed: int = 0,
) -> list[Template]:
    """``n`` templates of ``length`` tokens from held-out documents, each a window inside one
    document with a middle gap of ``gap`` tokens (:func:`maskdiff.textgen.heldout_templates`)."""
    windows = judge.heldout_windows(n, length, split, seed)
    if not windows:
        raise ValueError(f"no held-out document of {split!r} holds {length} symbols")
    return [t for t, _ in heldout_templates(windows, tokenizer, len(windows), gap)]


def infill_frontier(
    model: TextModel,
    judge: MarkovJudge,
    *,
    samplers: Sequence[str] = ("ancestral", "confidence", "remask"),
    steps: Sequence[int | str | None] = (8, 16, 32, 64, 128, "L"),
    n_templates: int = 16,
    gap: int | None = None,
    templates: Sequence[Template] | None = None,
    seed: int = 0,
    label: str = "model",
    **overrides: Any,
) -> list[FrontierRow]:
    """Fill a middle gap (default half the block) of ``n_templates`` held-out windows with every
    sampler at every number of steps; the true conditional NLL of the gaps next to the
    conditional entropy (:meth:`MarkovJudge.score_infill`). ``templates`` overrides the
    held-out ones (known tokens must be chain symbols)."""
    L = model.block_length
    if templates is None:
        gap = gap or max(1, L // 2)
        templates = infill_templates(judge, model.tokenizer, n_templates, L, gap, seed=seed)
    P = max(len(t) for t in templates)
    if any(len(t) != P for t in templates):
        raise ValueError("infill templates must all have the same length")
    ids = torch.tensor([t.ids for t in templates], dtype=torch.long)
    n_gaps = int((ids == judge.mask_id).sum())
    rows = []
    for sampler in samplers:
        for T in _steps_list(steps, L):
            cfg = _settings(model, sampler, T, seed, overrides)
            out = model.fill_templates(templates, cfg)
            filled = torch.tensor([f.tokens for f in out.filled], dtype=torch.long)
            rows.append(FrontierRow("infill", sampler, T, len(templates), P, n_gaps,
                                    out.network_calls, out.seconds,
                                    judge.score_infill(ids, filled),
                                    _kept_settings(cfg, model), label))  # fmt: skip
    return rows


def oracle_model(judge: MarkovJudge, like: TextModel) -> TextModel:
    """``like`` (its config, schedule, tokenizer) with the chain's exact denoiser in place of the
    network (order 1): the samplers' own error, without the model's."""
    denoiser = judge.token_source().denoiser
    return TextModel(denoiser, like.cfg, like.tokenizer, torch.device("cpu"))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- output


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _sample_table(judge: str, group: list[FrontierRow]) -> str:
    q0 = group[0].quality
    assert isinstance(q0, SampleQuality)
    exact = judge == MARKOV_LABEL
    ref = ""
    if q0.reference_nll is not None:
        what = "the chain: NLL = entropy rate h" if exact else "held-out blocks"
        ref = (
            f" Reference ({what}): NLL {_f(q0.reference_nll)}, unigram entropy "
            f"{_f(q0.reference_unigram_entropy)}, EOS share {_f(q0.reference_eos_share, 4)}."
        )
    first = group[0]
    head = (
        f"Samples, {first.n_samples} x {first.length} tokens; judge: {judge}; NLL in nats per "
        f"scored token, ± one standard error over samples.{ref}"
    )
    middle = "NLL − h" if exact else "gen. PPL"
    lines = [
        f"| model | sampler | steps | calls | tokens/s | NLL ± SE | {middle} | unigram H | EOS "
        "| UNK |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in group:
        q = r.quality
        assert isinstance(q, SampleQuality)
        mid = f"{q.excess:+.3f}" if exact and q.excess is not None else _f(q.gen_ppl, 2)
        lines.append(
            f"| {r.model} | {r.sampler} | {r.steps} | {r.network_calls} | "
            f"{r.tokens_per_second:,.0f} | {_f(q.nll)} ± {_f(q.nll_se)} | {mid} | "
            f"{_f(q.unigram_entropy)} | {_f(q.eos_share, 4)} | {_f(q.unk_share, 4)} |"
        )
    return head + "\n\n" + "\n".join(lines)


def _infill_table(judge: str, group: list[FrontierRow]) -> str:
    q0 = group[0].quality
    assert isinstance(q0, InfillQuality)
    first = group[0]
    head = (
        f"Infill, {first.n_samples} held-out windows of {first.length} tokens, "
        f"{q0.n_gap_tokens} gap tokens; judge: {judge}; nats per gap token, ± one standard "
        f"error over templates; conditional entropy {q0.method}; 'EOS/UNK fills': templates "
        "whose fill put a non-symbol in the gap (left out of the means)."
    )
    lines = [
        "| model | sampler | steps | calls | tokens/s | gap NLL ± SE | cond. entropy | "
        "NLL − entropy ± SE | EOS/UNK fills |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in group:
        q = r.quality
        assert isinstance(q, InfillQuality)
        lines.append(
            f"| {r.model} | {r.sampler} | {r.steps} | {r.network_calls} | "
            f"{r.tokens_per_second:,.0f} | {_f(q.nll)} ± {_f(q.nll_se)} | "
            f"{_f(q.conditional_entropy)} | {q.excess:+.3f} ± {_f(q.excess_se)} | "
            f"{q.n_invalid} |"
        )
    return head + "\n\n" + "\n".join(lines)


def frontier_markdown(rows: Sequence[FrontierRow]) -> str:
    """The rows as compact markdown tables, one per task and judge, in the rows' order; each
    table's first line names the judge and the reference numbers."""
    groups: dict[tuple[str, str], list[FrontierRow]] = {}
    for row in rows:
        groups.setdefault((row.task, row.quality.judge), []).append(row)
    return "\n\n".join(
        _infill_table(judge, group) if task == "infill" else _sample_table(judge, group)
        for (task, judge), group in groups.items()
    )


def frontier_metrics(rows: Sequence[FrontierRow], prefix: str = "frontier") -> dict[str, float]:
    """Finite numbers keyed ``{prefix}.{task}.{sampler}.{steps}.{name}`` (valid MLflow metric
    names); rows of the exact denoiser under ``{prefix}.exact_denoiser.{task}...``."""
    out: dict[str, float] = {}
    for r in rows:
        model = "" if r.model == "model" else r.model.replace(" ", "_") + "."
        key = f"{prefix}.{model}{r.task}.{r.sampler}.{r.steps}"
        values = {"network_calls": r.network_calls, "tokens_per_second": r.tokens_per_second}
        values.update(r.quality.to_dict())
        for name, value in values.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and math.isfinite(float(value)):
                out[f"{key}.{name}"] = float(value)
    return out
