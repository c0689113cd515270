"""The exact judge of the built-in markov corpus: samples and infills scored under the chain
the corpus was drawn from (derivations: :mod:`maskdiff.frontier`, docs/maths.md section 11)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from maskdiff.config import MarkovConfig
from maskdiff.data.markov import MarkovChain, make_chain, symbol_alphabet
from maskdiff.data.stage import list_shards, read_manifest
from maskdiff.data.tokenizer import Tokenizer, load_tokenizer
from maskdiff.judges import (
    INFILL_METHOD,
    MARKOV_LABEL,
    InfillQuality,
    SampleQuality,
    _array,
    _entropy,
    _ratio_se,
    _rows_entropy,
)
from maskdiff.oracle import MarkovSource

__all__ = ["INFILL_METHOD", "MARKOV_LABEL", "MarkovJudge", "NotMarkovError", "markov_judge"]


class NotMarkovError(ValueError):
    """The corpus or tokenizer does not allow the exact markov judge; the message says why."""


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
