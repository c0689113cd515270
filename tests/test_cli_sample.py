"""``maskdiff sample`` as a user runs it (``python -m flows.cli sample`` in a subprocess): infill
templates given inline and in files, prefix continuations, the gaps [[bracketed]] in a pipe and
highlighted on a terminal, one-line errors; on a checkpoint with its tokenizer and on an MLflow
model URI (through the pyfunc). One small model serves the module: a char tokenizer of the
built-in pydoc corpus (it knows line breaks, so templates of code span lines), 30 steps."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, tiny_config

from maskdiff.config import Config, DataConfig, TokenizerConfig
from maskdiff.data.blocks import build_blocks
from maskdiff.data.ingest import ingest_documents
from maskdiff.data.stage import read_manifest
from maskdiff.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from maskdiff.infill import parse_template
from maskdiff.train import train

L = 48  # the model's block length
SEPARATOR = "-" * 40
ANSI_GAP = "\x1b[1;4;32m"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, tokenizer stage folder)."""
    root = tmp_path_factory.mktemp("cli-sample")
    data = DataConfig(builtin="pydoc", root=str(root), seq_len=L)
    documents = ingest_documents(data).path
    tokenizer = train_tokenizer(TokenizerConfig(kind="char", vocab_size=256), documents, root).path
    blocks = build_blocks(data, documents, tokenizer, root).path
    dump = tiny_config(max_steps=30, log_every=10).model_dump()
    dump["data"], dump["model"]["max_seq_len"] = data.model_dump(), 64
    done = train(Config.model_validate(dump), blocks, root / "train",
                 vocab_size=load_tokenizer(tokenizer).vocab_size,
                 tokenizer_hash=read_manifest(tokenizer)["content_hash"])  # fmt: skip
    return done.checkpoint_path, tokenizer


@pytest.fixture(scope="module")
def tok(model: tuple[Path, Path]) -> Tokenizer:
    return load_tokenizer(model[1])


def sample(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "sample", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def texts(out: str) -> list[str]:
    """The printed texts: each is followed by a line of dashes."""
    assert out.endswith(SEPARATOR + "\n"), out
    return [block.removesuffix("\n") for block in out.split(SEPARATOR + "\n")[:-1]]


def n_tokens(text: str, tok: Tokenizer) -> int:
    """Tokens of ``text`` as a char tokenizer decoded it: one a character, or a special token
    (``<|eos|>``, ``[UNK]``; encoding the text again would read those as characters)."""
    specials = sorted({tok.decode([tok.eos_id]), tok.decode([tok.unk_id])}, key=len, reverse=True)
    return len(re.findall("|".join(map(re.escape, specials)) + "|.", text, flags=re.DOTALL))


def check_marked(shown: str, template: str, tok: Tokenizer, opening: str = "[[",
                 closing: str = "]]") -> None:  # fmt: skip
    """``shown`` is ``template`` with each gap filled by exactly its number of tokens between
    ``opening`` and ``closing``, the known text as written."""
    parts = parse_template(template)
    gap = f"{re.escape(opening)}(.*?){re.escape(closing)}"
    pattern = "".join(gap if isinstance(p, int) else re.escape(p) for p in parts)
    match = re.fullmatch(pattern, shown, flags=re.DOTALL)
    assert match, (template, shown)
    sizes = [p for p in parts if isinstance(p, int)]
    assert [n_tokens(g, tok) for g in match.groups()] == sizes, (template, shown)


CODE = "class [MASK:5]:\n    def f(self):\n        [MASK:4]\n"


def test_templates_inline_and_from_a_file(model, tok, tmp_path: Path) -> None:
    ckpt, tokenizer = model
    code = tmp_path / "template.py"
    code.write_text(CODE)
    inline = "def [MASK:3](self, x):"
    done = sample("--model", str(ckpt), "--tokenizer", str(tokenizer), "--infill-file",
                  str(code), "--infill", inline, "--n", "2", "--sampler", "confidence",
                  "--steps", "3", "--seed", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown = texts(done.stdout)
    assert len(shown) == 4 and ANSI_GAP not in done.stdout
    # in the order given, --n draws of each; the file's last line break is not in the template
    for text, template in zip(shown, [CODE[:-1]] * 2 + [inline] * 2, strict=True):
        check_marked(text, template, tok)


def test_a_terminal_gets_the_gaps_highlighted(model, tok) -> None:
    ckpt, tokenizer = model
    template = "import [MASK:4]"
    leader, follower = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "flows.cli", "sample", "--model", str(ckpt), "--tokenizer",
             str(tokenizer), "--infill", template],
            cwd=REPO, stdout=follower, stderr=subprocess.PIPE, text=True, timeout=300,
        )  # fmt: skip
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal's other end is closed: all is read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert done.returncode == 0, done.stderr
    out = b"".join(chunks).decode().replace("\r\n", "\n")
    (text,) = texts(out)
    check_marked(text, template, tok, ANSI_GAP, "\x1b[0m")


def test_a_prefix_is_continued_past_the_block_length(model, tok) -> None:
    ckpt, tokenizer = model
    done = sample("--model", str(ckpt), "--tokenizer", str(tokenizer), "--prefix", "def ",
                  "--length", str(2 * L), "--n", "2", "--top-p", "0.9")  # fmt: skip
    assert done.returncode == 0, done.stderr
    for text in texts(done.stdout):
        check_marked(text, f"def [MASK:{2 * L - 4}]", tok)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--infill", "x = [MASK:0] + 1"],
         "maskdiff: TemplateError: '[MASK:0]' at character 4 is a gap of 0 tokens; a gap needs "
         "N >= 1"),
        (["--infill", "no gap here"],
         "maskdiff: TemplateError: the template 'no gap here' has no gap: mark unknown tokens "
         "with [MASK] or [MASK:N]"),
        (["--infill", "x" * L + "[MASK]"],
         f"is {L + 1} tokens, longer than the model's block length {L}"),
        (["--infill", "price: [MASK:2] €"],
         "maskdiff: TemplateError: the tokenizer cannot encode '€' in ' €' (not in its "
         "vocabulary)"),
        (["--infill-file", "{tmp}/missing.txt"],
         "maskdiff: --infill-file {tmp}/missing.txt: No such file or directory"),
        (["--infill-file", "{tmp}"], "maskdiff: --infill-file {tmp}: Is a directory"),
        (["--infill-file", "{tmp}/latin1.txt"],
         "maskdiff: --infill-file {tmp}/latin1.txt is not UTF-8 text (byte 0xe9 at offset 3)"),
        (["--prefix", "def ", "--top-p", "0"],
         "maskdiff: SettingsError: sample setting top_p: Input should be greater than 0 (got "
         "0.0)"),
        (["--infill", "[MASK]", "--prefix", "x"],
         "maskdiff: give templates (--infill, --infill-file) or --prefix, not both"),
    ],
)  # fmt: skip
def test_bad_input_ends_on_one_line(model, tmp_path: Path, args: list[str], says: str) -> None:
    ckpt, tokenizer = model
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 [MASK]".encode("latin-1"))
    argv = [a.format(tmp=tmp_path) for a in args]
    done = sample("--model", str(ckpt), "--tokenizer", str(tokenizer), *argv)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and done.stdout == "", done.stderr
    assert lines and says.format(tmp=tmp_path) in lines[-1], done.stderr
    assert len(lines) == 1, done.stderr  # no traceback, no "--debug prints the traceback"


@pytest.fixture(scope="module")
def registered(model, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a command whose MLflow store holds the model as ``cli-model`` v1."""
    from maskdiff.config import TrackingConfig
    from maskdiff.ops.registry import log_model
    from maskdiff.ops.tracking import RunTracker

    root = tmp_path_factory.mktemp("cli-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = RunTracker.start(TrackingConfig(experiment="cli", system_metrics=False), uri,
                               "run", artifact_root=root / "artifacts")  # fmt: skip
    assert log_model(tracker, model[0], model[1], "cli-model") == "1"
    tracker.end()
    return dict(os.environ, MLFLOW_TRACKING_URI=uri)


@pytest.mark.slow
def test_a_model_uri_goes_through_the_pyfunc(registered, tok) -> None:
    template = "if [MASK:2] == [MASK:3]:\n    pass"
    done = sample("--model", "models:/cli-model/1", "--infill", template, "--n", "2",
                  "--seed", "4", env=registered)  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown = texts(done.stdout)
    assert len(shown) == 2
    for text in shown:
        check_marked(text, template, tok)
    done = sample("--model", "models:/cli-model/1", "--prefix", "", "--length", "20",
                  env=registered)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(texts(done.stdout)) == 4  # unconditional: 4 draws unless --n says
    for text in texts(done.stdout):
        check_marked(text, "[MASK:20]", tok)
    bad = sample("--model", "models:/cli-model/1", "--infill", "x = [MASK:0]", env=registered)
    assert bad.returncode == 1 and bad.stdout == "", bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (
        "maskdiff: TemplateError: '[MASK:0]' at character 4 is a gap of 0 tokens; a gap needs "
        "N >= 1"
    ), bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr  # no traceback, no progress bar
