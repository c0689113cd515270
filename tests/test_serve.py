"""The registered model behind ``mlflow models serve``, end to end: the smoke pipeline trains and
registers it (``maskdiff run`` in a subprocess, its own stores), a real model server serves
``models:/maskdiff-denoiser@champion``, and HTTP requests fill templates and continue prefixes.
A malformed request is answered 400 with a message naming the problem, and the server goes on
answering. The server is stopped by its process group."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import REPO, SMOKE

from maskdiff.data.tokenizer import Tokenizer, load_tokenizer
from maskdiff.infill import parse_template
from maskdiff.ops.servers import ServerProcess, prefect_env, start_model_server

MODEL = "models:/maskdiff-denoiser@champion"
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """(server URL, the run's tokenizer, the MLflow store): the smoke pipeline's model, served."""
    root = tmp_path_factory.mktemp("serve")
    config = yaml.safe_load(SMOKE.read_text())
    config["data"]["root"] = str(root / "runs")
    config["tracking"] = {"system_metrics": False}
    config["ar_baseline"] = False  # the served model is the masked one; seconds saved
    preset = root / "serve.yaml"
    preset.write_text(yaml.safe_dump(config))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = prefect_env(root / "prefect") | {"MLFLOW_TRACKING_URI": uri}
    run = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(preset), "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(Path(run.stdout.strip().splitlines()[-1]).read_text())
    assert summary["registry"]["champion"] is True, summary["registry"]
    server: ServerProcess = start_model_server(MODEL, root / "model-server.log", uri)
    try:
        server.wait_ready(120)
        yield server.url, load_tokenizer(summary["stages"]["tokenizer"]), uri
    finally:
        server.stop()


def invoke(url: str, columns: list[str], rows: list[list], **params) -> httpx.Response:
    body = {"dataframe_split": {"columns": columns, "data": rows}, "params": params}
    return httpx.post(f"{url}/invocations", json=body, timeout=60)


def char_tokens(text: str, tok: Tokenizer) -> list[str]:
    """``text`` decoded from a char tokenizer, cut back into its tokens: one character each, but
    the special ones (``<|eos|>``, ``[UNK]``), which a filled gap may hold and which encoding
    the text again would read as characters."""
    specials = sorted({tok.decode([tok.eos_id]), tok.decode([tok.unk_id])}, key=len, reverse=True)
    return re.findall("|".join(map(re.escape, specials)) + "|.", text, flags=re.DOTALL)


def check_filled(answer: dict, template: str, tok: Tokenizer) -> None:
    """The known text of ``template`` is kept as written and each gap holds exactly its number
    of tokens."""
    parts = parse_template(template)
    sizes = [p for p in parts if isinstance(p, int)]
    assert len(answer["gaps"]) == len(sizes), answer
    for gap, size in zip(answer["gaps"], sizes, strict=True):
        assert len(char_tokens(gap, tok)) == size, (gap, size, answer)
    gaps = iter(answer["gaps"])
    pieces = [(isinstance(p, int), next(gaps) if isinstance(p, int) else p) for p in parts]
    assert answer["text"] == "".join(text for _, text in pieces)
    assert answer["marked"] == "".join(f"[[{t}]]" if gap else t for gap, t in pieces)


def test_templates_are_filled_and_a_bad_request_is_a_400(served) -> None:
    url, tok, _ = served
    templates = ['#"[MASK:4]$%[MASK]&', "[MASK:3]!!", "(((([MASK:6]("]
    good = invoke(url, ["template"], [[t] for t in templates], seed=3)
    assert good.status_code == 200, good.text
    answers = good.json()["predictions"]
    assert len(answers) == len(templates)
    for answer, template in zip(answers, templates, strict=True):
        check_filled(answer, template, tok)
    # the same request and seed, the same texts; params left out take the checkpoint's values
    # (smoke: 8 steps, fewer than the 20 gap tokens, so the step count shapes the draws)
    assert invoke(url, ["template"], [[t] for t in templates], seed=3).json() == good.json()
    wide = [["#[MASK:20]#"]]
    default = invoke(url, ["template"], wide).json()
    assert invoke(url, ["template"], wide, steps=8, seed=0).json() == default
    assert invoke(url, ["template"], wide, steps=16, seed=0).json() != default

    for rows, params, says in [
        ([["#[MASK:0]$"]], {}, "row 0: '[MASK:0]' at character 1 is a gap of 0 tokens"),
        ([["#[MASK]"], ["no gap"]], {}, "row 1: the template 'no gap' has no gap"),
        ([["[MASK:40]"]], {}, "longer than the model's block length 32"),
        ([["#[MASK]"]], {"sampler": "greedy"}, "sample setting sampler: Input should be"),
        ([["#[MASK]"]], {"top_p": 0.0}, "sample setting top_p: Input should be greater than 0"),
    ]:
        bad = invoke(url, ["template"], rows, **params)
        assert bad.status_code == 400, (rows, bad.text)
        error = bad.json()
        assert error["error_code"] == "INVALID_PARAMETER_VALUE" and says in error["message"], error
        assert "Traceback" not in bad.text

    again = invoke(url, ["template"], [["$$[MASK:5]$$"]], sampler="confidence", steps=2)
    assert again.status_code == 200, again.text
    check_filled(again.json()["predictions"][0], "$$[MASK:5]$$", tok)


def test_prefixes_are_continued_beside_templates(served) -> None:
    url, tok, _ = served
    # 40 tokens > the block length 32: decoded semi-autoregressively
    answer = invoke(url, ["prefix"], [["#'!"], [""]], length=40, sampler="remask", steps=6)
    assert answer.status_code == 200, answer.text
    continued, unconditional = answer.json()["predictions"]
    check_filled(continued, "#'![MASK:37]", tok)
    check_filled(unconditional, "[MASK:40]", tok)
    # one request, both kinds of row (null where a row has none)
    mixed = invoke(url, ["template", "prefix"], [["#[MASK:2]#", None], [None, "$"]], length=12)
    assert mixed.status_code == 200, mixed.text
    infilled, after = mixed.json()["predictions"]
    check_filled(infilled, "#[MASK:2]#", tok)
    check_filled(after, "$[MASK:11]", tok)
    both = invoke(url, ["template", "prefix"], [["#[MASK]", "$"]])
    assert both.status_code == 400 and "row 0: give a template or a prefix, not both" in both.text
    short = invoke(url, ["prefix"], [["#'!"]], length=3)
    assert short.status_code == 400 and "leaves nothing to generate in 3" in short.text
    assert re.search(r'"predictions": \[\{"text": ', invoke(url, ["prefix"], [[""]]).text)


def test_the_model_loads_once_for_every_request(served, monkeypatch) -> None:
    """The pyfunc loads checkpoint, tokenizer and network as MLflow loads it, never per request."""
    import mlflow.pyfunc
    import pandas as pd
    import torch

    from maskdiff.textgen import TextModel

    loads = []
    real = TextModel.load.__func__

    def counted(cls, *args, **kwargs):
        loads.append(args)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(TextModel, "load", classmethod(counted))
    previous, threads = mlflow.get_tracking_uri(), torch.get_num_threads()
    monkeypatch.setenv("MASKDIFF_NUM_THREADS", "1")  # the serving knob: torch's threads
    mlflow.set_tracking_uri(served[2])
    try:
        model = mlflow.pyfunc.load_model(MODEL)
        assert torch.get_num_threads() == 1
    finally:
        mlflow.set_tracking_uri(previous)
        torch.set_num_threads(threads)
    assert len(loads) == 1
    params = {p.name: p.default for p in model.metadata.signature.params}
    assert params == {"sampler": "ancestral", "steps": 8, "seed": 0, "top_p": 1.0, "length": 32}
    for seed in range(3):
        out = model.predict(pd.DataFrame({"template": ["#[MASK:2]#", "$[MASK]"]}), {"seed": seed})
        assert list(out.columns) == ["text", "marked", "gaps"] and len(out) == 2
    assert len(loads) == 1
