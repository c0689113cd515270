"""Tokenizers (``tokenizers`` library) with one fixed layout of special tokens.

Ids ``0 .. m-1`` are the real tokens, the model's m output classes; EOS is one of them. The
mask token [MASK] has id ``m`` (``mask_id == vocab_size``): it is added last and is never a
real token, so the denoiser's output classes exclude it.

Kinds (``tokenizer.kind``):

* ``bpe``: byte-level BPE trained on the train split only; EOS is id 0; ``vocab_size`` caps m
  (a small corpus may give fewer merges). ``train_max_mb`` bounds what it trains on: a uniform
  sample of the train documents by a hash of their text (:func:`sample_cutoff`).
* ``char``: one token per character seen in the train split, plus EOS (id 0) and [UNK] (id 1)
  for characters only the other splits contain.
* ``file`` / ``pretrained``: an existing ``tokenizer.json`` or Hub tokenizer; EOS and [MASK] are
  added if missing. A vocabulary larger than ``vocab_size`` is an error.

The tokenizer stage folder holds ``tokenizer.json`` and the manifest; :func:`load_tokenizer`
reads it back.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from maskdiff.config import TokenizerConfig
from maskdiff.data.stage import StageResult, build_stage, list_shards, read_manifest

__all__ = [
    "EOS_TOKEN",
    "MASK_TOKEN",
    "TOKENIZER_FILE",
    "UNK_TOKEN",
    "Tokenizer",
    "TokenizerError",
    "document_key",
    "load_tokenizer",
    "sample_cutoff",
    "train_tokenizer",
]

EOS_TOKEN = "<|eos|>"
MASK_TOKEN = "[MASK]"
UNK_TOKEN = "[UNK]"
TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer that cannot be built or loaded; the message names the file or key."""


class Tokenizer:
    """A ``tokenizers.Tokenizer`` whose last id is [MASK]; ``vocab_size`` = m real tokens."""

    def __init__(self, inner: tokenizers.Tokenizer) -> None:
        # the text "[MASK]" or "<|eos|>" inside a document is text, never the special token
        inner.encode_special_tokens = True
        self.inner = inner
        size = inner.get_vocab_size(with_added_tokens=True)
        mask_id, eos_id = inner.token_to_id(MASK_TOKEN), inner.token_to_id(EOS_TOKEN)
        if mask_id != size - 1:
            raise TokenizerError(f"{MASK_TOKEN} must be the last id {size - 1}, got {mask_id}")
        if eos_id is None:
            raise TokenizerError(f"the tokenizer has no {EOS_TOKEN} token")
        self.vocab_size = size - 1
        self.mask_id = mask_id
        self.eos_id = eos_id
        self.unk_id = inner.token_to_id(UNK_TOKEN)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without EOS (the blocks stage joins documents with it)."""
        return [enc.ids for enc in self.inner.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int] | np.ndarray) -> str:
        """Text of ``ids``; EOS and [MASK] are shown as their token strings."""
        return self.inner.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """(m,) int32: UTF-8 bytes each real token stands for; EOS and [UNK] count 1 byte.

        Byte-level tokens hold one character per byte; other tokens are decoded one by one.
        """
        out = np.ones(self.vocab_size, dtype=np.int32)
        byte_level = isinstance(self.inner.decoder, decoders.ByteLevel)
        specials = {self.eos_id, self.unk_id}
        for token, idx in self.inner.get_vocab(with_added_tokens=True).items():
            if idx >= self.vocab_size or idx in specials:
                continue
            if byte_level:  # one character per byte
                n = len(token)
            else:
                n = len(self.inner.decode([idx]).encode("utf-8", "surrogatepass"))
            out[idx] = max(n, 1)
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        self.inner.save(str(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        return cls(_read_json_tokenizer(Path(path)))


def _read_json_tokenizer(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} does not exist")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({exc})") from exc


def _with_specials(inner: tokenizers.Tokenizer, limit: int, where: str) -> Tokenizer:
    """Add EOS if missing and [MASK] last; refuse more than ``limit`` real tokens."""
    if inner.token_to_id(EOS_TOKEN) is None:
        inner.add_special_tokens([EOS_TOKEN])
    if inner.token_to_id(MASK_TOKEN) is None:
        inner.add_special_tokens([MASK_TOKEN])
    tok = Tokenizer(inner)
    if tok.vocab_size > limit:
        raise TokenizerError(
            f"{where}: {tok.vocab_size} real tokens exceed tokenizer.vocab_size={limit}"
        )
    return tok


# ----------------------------------------------------------------------------- building


def _train_texts(
    documents: Path, batch_rows: int = 1024, below: int | None = None
) -> Iterator[list[str]]:
    """The train split's texts in batches; with ``below``, only those whose
    :func:`document_key` is below it (the sample of :func:`sample_cutoff`)."""
    for shard in list_shards(documents, "train"):
        for batch in pq.ParquetFile(shard).iter_batches(columns=["text"], batch_size=batch_rows):
            texts = batch.column(0).to_pylist()
            yield texts if below is None else [t for t in texts if document_key(t) < below]


def document_key(text: str) -> int:
    """A 64-bit hash of a document's text: its place in the sampling order (the same text has
    the same place whatever its doc_id or shard, so the sample ignores document order)."""
    raw = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(raw, "big")


def sample_cutoff(batches: Iterable[list[str]], max_bytes: int) -> tuple[int | None, dict]:
    """The key below which documents form the training sample, and its sizes.

    Documents are put in the order of :func:`document_key` (a uniformly random order, fixed by
    the texts alone) and the longest prefix of that order whose UTF-8 bytes fit in ``max_bytes``
    is kept: a uniform sample of documents, never over the limit. The key returned is the first
    one left out (documents sharing it, identical texts, are left out together); None when the
    whole split fits, which then trains on everything."""
    keys: list[int] = []
    sizes: list[int] = []
    for texts in batches:
        for text in texts:
            keys.append(document_key(text))
            sizes.append(len(text.encode("utf-8", "surrogatepass")))
    size = np.asarray(sizes, dtype=np.int64)
    stats = {"max_bytes": int(max_bytes), "of_bytes": int(size.sum()), "of_documents": len(keys)}
    if stats["of_bytes"] <= max_bytes:
        return None, {**stats, "bytes": stats["of_bytes"], "documents": len(keys)}
    key = np.asarray(keys, dtype=np.uint64)
    order = np.argsort(key, kind="stable")
    fits = int(np.searchsorted(np.cumsum(size[order]), max_bytes, side="right"))
    cutoff = int(key[order[fits]])
    kept = key < np.uint64(cutoff)
    return cutoff, {**stats, "bytes": int(size[kept].sum()), "documents": int(kept.sum())}


def _train_bpe(cfg: TokenizerConfig, documents: Path, cutoff: int | None = None) -> Tokenizer:
    if cfg.vocab_size < 257:
        raise TokenizerError(
            f"tokenizer.vocab_size={cfg.vocab_size}: byte-level BPE needs at least 257 (256 bytes "
            "and EOS)"
        )
    inner = tokenizers.Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    inner.train_from_iterator(_train_texts(documents, below=cutoff), trainer=trainer)
    return _with_specials(inner, cfg.vocab_size, "bpe")


def _train_char(cfg: TokenizerConfig, documents: Path) -> Tokenizer:
    chars: set[str] = set()
    for texts in _train_texts(documents):
        for text in texts:
            chars.update(text)
    vocab = {EOS_TOKEN: 0, UNK_TOKEN: 1}
    for ch in sorted(chars):
        vocab[ch] = len(vocab)
    if len(vocab) > cfg.vocab_size:
        raise TokenizerError(
            f"char: the train split has {len(chars)} distinct characters; with EOS and [UNK] "
            f"that is {len(vocab)} > tokenizer.vocab_size={cfg.vocab_size}"
        )
    inner = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    inner.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    inner.decoder = decoders.Fuse()
    inner.add_special_tokens([EOS_TOKEN, UNK_TOKEN])
    return _with_specials(inner, cfg.vocab_size, "char")


def _load_pretrained(cfg: TokenizerConfig) -> Tokenizer:
    try:
        inner = tokenizers.Tokenizer.from_pretrained(cfg.name or "")
    except Exception as exc:
        raise TokenizerError(
            f"could not load the Hub tokenizer {cfg.name!r} ({exc}); offline, download its "
            "tokenizer.json and set tokenizer.kind=file with tokenizer.path"
        ) from exc
    return _with_specials(inner, cfg.vocab_size, f"tokenizer.name={cfg.name}")


def _file_hash(path: Path) -> str:
    if not path.is_file():
        raise TokenizerError(f"tokenizer.path={str(path)!r} does not exist")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def train_tokenizer(
    cfg: TokenizerConfig, documents: str | os.PathLike[str], root: str | os.PathLike[str]
) -> StageResult:
    """Build (or reuse) the ``tokenizer`` stage from a finished ``documents`` stage folder.

    The folder holds ``tokenizer.json``; the manifest's ``stats`` record ``vocab_size`` (m),
    ``eos_id``, ``mask_id`` and ``unk_id``.
    """
    documents = Path(documents)
    inputs = {"documents": read_manifest(documents)["content_hash"]}
    if cfg.kind == "file":
        inputs["tokenizer_file"] = _file_hash(Path(cfg.path or ""))

    def build(folder: Path) -> dict[str, Any]:
        sample: dict[str, Any] = {}
        if cfg.kind == "bpe":
            cutoff = None
            if cfg.train_max_mb is not None:
                cutoff, sample = sample_cutoff(_train_texts(documents), int(cfg.train_max_mb * 1e6))
            tok = _train_bpe(cfg, documents, cutoff)
        elif cfg.kind == "char":
            tok = _train_char(cfg, documents)
        elif cfg.kind == "file":
            inner = _read_json_tokenizer(Path(cfg.path or ""))
            tok = _with_specials(inner, cfg.vocab_size, f"tokenizer.path={cfg.path}")
        else:
            tok = _load_pretrained(cfg)
        tok.save(folder / TOKENIZER_FILE)
        Tokenizer.load(folder / TOKENIZER_FILE)  # what is saved must load back
        return {
            "kind": cfg.kind,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "mask_id": tok.mask_id,
            "unk_id": tok.unk_id,
            **({"train_sample": sample} if sample else {}),
        }

    return build_stage("tokenizer", root, cfg.model_dump(mode="json"), inputs, build)


def load_tokenizer(stage_dir: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of a finished tokenizer stage folder."""
    read_manifest(stage_dir)
    return Tokenizer.load(Path(stage_dir) / TOKENIZER_FILE)
