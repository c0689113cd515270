"""The workers' command lines: what a launcher writes, the worker's own parser reads back, for
every flag, given or left out."""

from __future__ import annotations

import pytest

from maskdiff import scoring
from maskdiff import train as train_lib
from maskdiff.launch import train_arguments
from maskdiff.worker_args import SCORE_FLAGS, TRAIN_FLAGS, arguments


def test_train_arguments_read_back_by_the_train_worker() -> None:
    full = train_arguments("c.yaml", "blocks", "out", vocab_size=260, tokenizer_hash="abc",
                           corruptions="corr", validation="val")  # fmt: skip
    args = train_lib._parse_args(full)
    assert (args.config, args.blocks, args.out, args.vocab_size, args.tokenizer_hash) == (
        "c.yaml", "blocks", "out", 260, "abc"
    )  # fmt: skip
    assert (args.corruptions, args.validation, args.no_resume, args.set) == (
        "corr", "val", False, []
    )  # fmt: skip

    bare = train_lib._parse_args(train_arguments("c.yaml", "blocks", "out", vocab_size=8))
    assert (bare.corruptions, bare.validation, bare.tokenizer_hash) == (None, None, "")

    every = arguments(TRAIN_FLAGS, config="x", set=["a=1", "b=2"], blocks="b", out="o",
                      no_resume=True, vocab_size=3)  # fmt: skip
    args = train_lib._parse_args(every)
    assert (args.set, args.no_resume, args.vocab_size) == (["a=1", "b=2"], True, 3)


def test_score_arguments_read_back_by_the_scoring_worker() -> None:
    full = scoring.score_arguments("c.yaml", "blocks", "corr", "mdm.pt", "ar.pt", "out.json")
    args = scoring._parse_args(full)
    assert (args.config, args.blocks, args.corruptions, args.mdm, args.ar, args.out) == (
        "c.yaml", "blocks", "corr", "mdm.pt", "ar.pt", "out.json"
    )  # fmt: skip
    assert (
        scoring._parse_args(
            scoring.score_arguments("c.yaml", "blocks", "corr", "mdm.pt", None, "out.json")
        ).ar
        is None
    )


def test_a_value_no_flag_takes_is_refused() -> None:
    with pytest.raises(TypeError, match="no worker flag for vocab_size"):
        arguments(SCORE_FLAGS, blocks="b", corruptions="c", mdm="m", out="o", vocab_size=3)
    with pytest.raises(TypeError, match="--blocks is required"):
        arguments(TRAIN_FLAGS, out="o")
