"""The logged model and the model registry: the MLflow pyfunc over a checkpoint (what ``mlflow
models serve`` answers with), its signature, logging and registering it, and the ``champion``
alias, moved only to a better model.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from maskdiff.ops.tracking import RunTracker

__all__ = [
    "InvalidRequest",
    "MaskdiffPyfunc",
    "champion_metric",
    "champion_version",
    "log_model",
    "model_signature",
    "promote_if_better",
]


class InvalidRequest(MlflowException):
    """A request the model cannot answer as asked (a malformed template, a bad parameter):
    ``mlflow models serve`` answers it with HTTP 400 and this message. The original error (a
    :class:`~maskdiff.infill.TemplateError` or :class:`~maskdiff.textgen.SettingsError`) is
    its ``__cause__``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


PREDICT_PARAMS = ("sampler", "steps", "seed", "top_p", "length")


class MaskdiffPyfunc(mlflow.pyfunc.PythonModel):
    """An MLflow pyfunc over a maskdiff checkpoint and its tokenizer stage: fills templates and
    continues prefixes.

    Input: a DataFrame with a ``template`` column (infill templates, ``[MASK]`` one unknown
    token, ``[MASK:N]`` N of them) and/or a ``prefix`` column (a continuation of the prefix to
    ``length`` tokens; "" for an unconditional sample). One output row per input row; a row
    gives a template or a prefix (the other null or empty), never both.
    Params: ``sampler``, ``steps``, ``seed``, ``top_p`` and ``length`` (prefix rows; longer than
    the block length is decoded semi-autoregressively); the signature's defaults are the
    checkpoint's ``sample`` section.
    Output: a DataFrame with ``text`` (the whole filled text), ``marked`` (the gaps in
    ``[[brackets]]``) and ``gaps`` (each gap's text, in order).
    Loading needs the ``maskdiff`` package installed (the class is imported, not copied).
    """

    # ``predict`` has no type hints on purpose (``log_model`` states the signature). Without this
    # MLflow wraps it in a pass-through validator as the class is created and warns about the
    # hints, under its own "once" filter: the first line every maskdiff command printed.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        """Load the checkpoint, its tokenizer and the network once, for every request.

        ``MASKDIFF_NUM_THREADS`` sets torch's threads (default: the checkpoint's
        ``runtime.num_threads``, else the cores): on cores other jobs keep busy, OpenMP threads
        spin, and one thread can answer several times faster than two (README).
        """
        import torch

        from maskdiff.checkpoint import load_checkpoint
        from maskdiff.config import Config
        from maskdiff.textgen import TextModel

        checkpoint = context.artifacts["checkpoint"]
        cfg = Config.model_validate(json.loads(load_checkpoint(checkpoint)["config"]))
        self.model = TextModel.load(
            checkpoint, context.artifacts["tokenizer"], use_ema=cfg.eval.use_ema
        )
        threads = os.environ.get("MASKDIFF_NUM_THREADS", "").strip()
        if threads:
            if not threads.isdigit() or int(threads) < 1:
                raise ValueError(f"MASKDIFF_NUM_THREADS={threads!r}: give a whole number >= 1")
            torch.set_num_threads(int(threads))

    def predict(self, context, model_input, params=None):  # untyped: MLflow reads the hints
        import pandas as pd

        from maskdiff.infill import TemplateError, continuation_template, encode_template
        from maskdiff.textgen import SettingsError

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "template" not in frame and "prefix" not in frame:
            raise InvalidRequest(
                "the input needs a 'template' column (infill templates) or a 'prefix' column "
                f"(continuations); it has {list(map(str, frame.columns))}"
            )
        model = self.model
        params = params or {}
        try:
            cfg = model.settings(**{k: params.get(k) for k in PREDICT_PARAMS})
        except SettingsError as err:
            raise InvalidRequest(str(err)) from err
        length = cfg.length or model.block_length
        # two batches: how a template is filled does not depend on the prefix rows beside it
        infill: list[tuple[int, Any]] = []
        going_on: list[tuple[int, Any]] = []
        for row in range(len(frame)):
            text, prefix = _cell(frame, "template", row), _cell(frame, "prefix", row)
            if text is not None and prefix:
                raise InvalidRequest(f"row {row}: give a template or a prefix, not both")
            try:
                if text is not None:
                    infill.append((row, encode_template(text, model.tokenizer, model.block_length)))
                else:
                    tpl = continuation_template(prefix or "", model.tokenizer, length)
                    going_on.append((row, tpl))
            except TemplateError as err:
                raise InvalidRequest(f"row {row}: {err}") from err
        rows: list[Any] = [None] * len(frame)
        for batch in (infill, going_on):
            out = model.fill_templates([tpl for _, tpl in batch], cfg)
            for (row, _), filled in zip(batch, out.filled, strict=True):
                rows[row] = {"text": filled.text, "marked": filled.marked, "gaps": filled.gaps}
        return pd.DataFrame(rows, columns=["text", "marked", "gaps"])


def _cell(frame: Any, column: str, row: int) -> str | None:
    """The string in ``frame[column]`` at ``row``; None for a missing column, null or NaN."""
    import pandas as pd

    if column not in frame:
        return None
    value = frame[column].iloc[row]
    return None if pd.isna(value) else str(value)


def model_signature(checkpoint: str | Path) -> Any:
    """The served model's signature: optional ``template`` and ``prefix`` string columns in,
    ``text``, ``marked`` and ``gaps`` out; the params' defaults are the checkpoint's ``sample``
    section (as the MLflow UI shows them), ``length`` the block length unless it says one."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    from maskdiff.checkpoint import load_checkpoint
    from maskdiff.config import Config

    cfg = Config.model_validate(json.loads(load_checkpoint(checkpoint)["config"]))
    sample = cfg.sample
    inputs = Schema(
        [ColSpec("string", "template", required=False), ColSpec("string", "prefix", required=False)]
    )
    outputs = Schema(
        [ColSpec("string", "text"), ColSpec("string", "marked"), ColSpec(Array("string"), "gaps")]
    )
    params = ParamSchema(
        [
            ParamSpec("sampler", "string", sample.sampler),
            ParamSpec("steps", "long", sample.steps),
            ParamSpec("seed", "long", sample.seed),
            ParamSpec("top_p", "double", float(sample.top_p)),
            ParamSpec("length", "long", sample.length or cfg.data.seq_len),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def log_model(
    tracker: RunTracker,
    checkpoint: str | Path,
    tokenizer_dir: str | Path,
    registered_model: str | None,
) -> str | None:
    """Log the checkpoint as a pyfunc model into the tracker's run; register it if named.

    Returns the new registered model version (or None when not registering).
    """
    signature = model_signature(checkpoint)
    mlflow.set_tracking_uri(tracker.tracking_uri)
    with (
        warnings.catch_warnings(),
        mlflow.start_run(run_id=tracker.run_id, log_system_metrics=False),
    ):
        # The signature is explicit: MLflow's hints about input examples and type hints
        # (it would run the sampler to infer what we state) are moot here.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\.pyfunc.*")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=MaskdiffPyfunc(),
            artifacts={"checkpoint": str(checkpoint), "tokenizer": str(tokenizer_dir)},
            signature=signature,
            pip_requirements=_requirements(),
            registered_model_name=registered_model,
        )
    return None if info.registered_model_version is None else str(info.registered_model_version)


def _requirements() -> list[str]:
    from importlib import metadata

    out = []
    for name in ("torch", "tokenizers", "pyarrow", "numpy", "pydantic", "pyyaml", "pandas"):
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def champion_version(client: MlflowClient, model_name: str) -> Any | None:
    """The model version aliased ``champion``, if there is one and it has a run behind it."""
    try:
        version = client.get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None
    return version if version.run_id else None


def champion_metric(client: MlflowClient, model_name: str, metric: str) -> float | None:
    """``metric`` of the run behind the model version aliased ``champion``; None if no champion."""
    version = champion_version(client, model_name)
    if version is None:
        return None
    value = client.get_run(version.run_id).data.metrics.get(metric)
    return None if value is None else float(value)


def promote_if_better(
    client: MlflowClient, model_name: str, version: str, metric: str, value: float
) -> tuple[bool, float | None]:
    """Move the ``champion`` alias to ``version`` only if ``value`` (lower is better) beats it.

    Returns (promoted, the previous champion's value or None).
    """
    previous = champion_metric(client, model_name, metric)
    better = math.isfinite(value) and (previous is None or value < previous)
    if better:
        client.set_registered_model_alias(model_name, "champion", version)
    return better, previous
