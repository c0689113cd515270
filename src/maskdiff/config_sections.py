"""The sections of the configuration tree (:mod:`maskdiff.config` assembles and loads them).

Every section is a pydantic model with ``extra="forbid"`` and assignment validation; field
descriptions are what the Prefect UI's form and the README's configuration table show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A configuration problem; the message names the key and where it came from."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MarkovConfig(_Section):
    """The synthetic ``markov`` corpus: a seeded random chain with a known entropy rate."""

    vocab_size: int = Field(32, gt=1, le=4096, description="number of symbols of the chain")
    order: int = Field(1, ge=1, le=4, description="how many previous symbols the next depends on")
    concentration: float = Field(
        0.3, gt=0, description="Dirichlet concentration of each transition row (small = peaky)"
    )
    # 2.56 M symbols: more than the default run reads (2.46 M tokens), so models are measured
    # against the source and not against a memorised sample. Documents much longer than a
    # block keep the cost of not seeing where a document starts small (0.6% of the entropy
    # rate at L = 128, against 1.3% with 256-symbol documents).
    n_documents: int = Field(2500, gt=0)
    doc_length: int = Field(1024, gt=0, description="symbols per document")
    seed: int = Field(1234, ge=0)

    @model_validator(mode="after")
    def _check_states(self) -> MarkovConfig:
        if self.vocab_size ** (self.order + 1) > 1 << 24:
            raise ValueError(
                "data.markov: the transition table vocab_size**(order+1) exceeds 2**24 entries"
            )
        if self.doc_length < self.order:
            raise ValueError("data.markov.doc_length must be at least data.markov.order")
        return self


class DataConfig(_Section):
    """Where documents come from, how they are split and wrapped into blocks."""

    source: Literal["builtin", "local", "hub"] = "builtin"
    builtin: Literal["pydoc", "stdlib", "markov"] = "pydoc"
    paths: list[str] = Field(default_factory=list, description="local files, folders or globs")
    text_unit: Literal["file", "line", "paragraph"] = Field(
        "paragraph", description="for .txt files: one document per file, line or blank-line block"
    )
    text_column: str = "text"
    hub_name: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    streaming: bool = False
    max_documents: int | None = Field(None, gt=0)
    chunk_chars: int | None = Field(
        None,
        gt=0,
        description="cut each document into chunks of at most this many characters before "
        "splitting, just after the last ASCII whitespace of each window (a hard cut where there "
        "is none); no character is lost: the chunks of a document concatenate to it",
    )
    split_by: Literal["hash", "position"] = Field(
        "hash",
        description="hash: each document by a hash of its text (adding documents never moves "
        "old ones); position: the character stream in corpus order, first 1 - val - test of it "
        "to train, the next val_fraction to validation, the rest to test, cutting the document "
        "at each boundary (adding documents at the end moves only the tail); duplicates are kept",
    )
    val_fraction: float = Field(0.05, ge=0, lt=0.5)
    test_fraction: float = Field(0.05, ge=0, lt=0.5)
    seq_len: int = Field(128, gt=1, description="tokens per block (L)")
    shard_rows: int = Field(8192, gt=0, description="blocks per parquet shard")
    root: str = Field("runs", description="data root; every stage folder lives under it")
    markov: MarkovConfig = Field(default_factory=MarkovConfig)

    @field_validator("root")
    @classmethod
    def _check_root(cls, value: str) -> str:
        if ".." in Path(value).parts:  # every output lives below the root; it may not climb out
            raise ValueError(f"data.root={value!r} contains '..'; give a path without it")
        return value

    @model_validator(mode="after")
    def _check_source(self) -> DataConfig:
        if self.source == "local" and not self.paths:
            raise ValueError("data.source is 'local' but data.paths is empty")
        if self.source == "hub" and not self.hub_name:
            raise ValueError("data.source is 'hub' but data.hub_name is not set")
        return self


class TokenizerConfig(_Section):
    """Byte-level BPE trained on the train split, characters, a local file or a Hub tokenizer."""

    kind: Literal["bpe", "char", "file", "pretrained"] = "bpe"
    vocab_size: int = Field(4096, gt=2, description="real tokens, specials included, [MASK] not")
    min_frequency: int = Field(2, ge=1)
    path: str | None = Field(None, description="a tokenizer.json, for kind='file'")
    name: str | None = Field(None, description="a Hub tokenizer id, for kind='pretrained'")
    # BPE training is single-threaded and grows with the corpus; past a few tens of MB the
    # merges it learns hardly change (README, "Tokenizer training on a sample").
    train_max_mb: float | None = Field(
        32.0,
        gt=0,
        description="bpe: train on at most this many MB (1e6 bytes of UTF-8) of the train split, "
        "a uniform sample of its documents by a hash of their text (None: all of it)",
    )

    @model_validator(mode="after")
    def _check_path(self) -> TokenizerConfig:
        if self.kind == "file" and not self.path:
            raise ValueError("tokenizer.kind is 'file' but tokenizer.path is not set")
        if self.kind == "pretrained" and not self.name:
            raise ValueError("tokenizer.kind is 'pretrained' but tokenizer.name is not set")
        return self


class CorruptionConfig(_Section):
    """Precomputed masked corruptions of the token blocks."""

    mode: Literal["precomputed", "online"] = "precomputed"
    eval_draws: int = Field(8, gt=0, description="K stratified draws of t per evaluation block")
    discrete_steps: bool = Field(
        True, description="also store one corruption per step i=1..T for each T in diffusion.T"
    )
    train_epochs: int = Field(1, ge=0, description="training corruptions precomputed for epochs")
    train_draws: int = Field(1, gt=0, description="draws per training block per epoch")
    train_group: int = Field(
        32, gt=0, description="training t is stratified over groups of this many blocks"
    )
    discrete_max_blocks: int | None = Field(
        None, gt=0, description="cap on blocks per eval split given the full discrete grids"
    )
    seed: int = 0


_MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"n_layers": 4, "d_model": 128, "n_heads": 4},
    "small": {"n_layers": 12, "d_model": 768, "n_heads": 12},
    "medium": {"n_layers": 24, "d_model": 1024, "n_heads": 16},
}


class ModelConfig(_Section):
    """The denoiser (``mdm``) or the autoregressive baseline (``ar``) on the same backbone."""

    kind: Literal["mdm", "ar"] = "mdm"
    preset: Literal["tiny", "small", "medium", "custom"] = "tiny"
    n_layers: int = Field(4, gt=0)
    d_model: int = Field(128, gt=0)
    n_heads: int = Field(4, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    max_seq_len: int = Field(1024, gt=1, description="longest block the model accepts")
    time_conditioning: bool = Field(False, description="adaLN on t; absorbing models need none")
    rope_base: float = Field(10000.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            preset = data.get("preset", "tiny")
            for key, value in _MODEL_PRESETS.get(preset, {}).items():
                data.setdefault(key, value)
        return data

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by n_heads")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("model.d_model / n_heads must be even for rotary positions")
        if self.kind == "ar" and self.time_conditioning:
            raise ValueError("model.time_conditioning needs model.kind 'mdm' (AR has no t)")
        return self


class DiffusionConfig(_Section):
    process: Literal["absorbing", "uniform"] = "absorbing"
    schedule: Literal["linear", "cosine", "loglinear", "geometric", "polynomial"] = "linear"
    eps: float = Field(1e-3, gt=0, lt=0.5, description="log-linear: alpha(1) = eps")
    t_min: float = Field(1e-5, gt=0, lt=0.1, description="smallest t drawn in training and eval")
    sigma_min: float = Field(1e-4, gt=0, description="geometric schedule")
    sigma_max: float = Field(20.0, gt=0, description="geometric schedule")
    power: float = Field(2.0, gt=0, description="polynomial schedule: alpha = 1 - t**power")
    T: list[int] = Field(default_factory=lambda: [10, 100, 1000], description="discrete grids")

    @model_validator(mode="after")
    def _check(self) -> DiffusionConfig:
        if self.sigma_max <= self.sigma_min:
            raise ValueError("diffusion.sigma_max must exceed diffusion.sigma_min")
        if any(t <= 0 for t in self.T):
            raise ValueError("diffusion.T must hold positive step counts")
        return self


class TrainConfig(_Section):
    batch_size: int = Field(32, gt=0, description="global batch, in blocks")
    grad_accum: int = Field(1, gt=0)
    max_steps: int = Field(1000, gt=0)
    lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = Field(1.0, ge=0, description="0 turns clipping off")
    ema: float = Field(0.999, ge=0, lt=1, description="0 turns EMA off")
    compile: bool = False
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(200, gt=0)
    antithetic: bool = Field(True, description="stratified t across the batch (online masking)")
    shuffle_buffer: int = Field(16384, gt=0, description="blocks in the loader's shuffle buffer")
    keep_checkpoints: int = Field(2, gt=0, description="newest checkpoints kept in the run folder")
    eval_every: int = Field(
        100, ge=0, description="steps between validation points (0: no validation curve)"
    )
    eval_blocks: int = Field(
        32, gt=0, description="validation blocks scored at each point (the first ones, fixed)"
    )
    patience: int | None = Field(
        None, gt=0, description="stop after this many validation points without a new best"
    )
    max_minutes: float | None = Field(
        None, gt=0, description="end this call at a checkpoint once its wall time is spent"
    )
    seed: int = 0


class EvalConfig(_Section):
    batch_size: int = Field(64, gt=0)
    splits: list[Literal["validation", "test"]] = Field(default_factory=lambda: ["validation"])
    max_blocks: int | None = Field(None, gt=0, description="cap on blocks evaluated per split")
    use_ema: bool = True
    checkpoint: Literal["last", "best"] = Field(
        "last", description="which checkpoint the final evaluation and sampling use"
    )
    curve_bins: int = Field(10, gt=0, description="t bins of the per-timestep NELBO curve")


class SampleConfig(_Section):
    """Generation and infilling (maskdiff.samplers says what each sampler is exact for)."""

    n_samples: int = Field(4, ge=0)
    sampler: Literal["ancestral", "confidence", "remask"] = "ancestral"
    steps: int = Field(128, gt=0)
    length: int | None = Field(
        None, gt=0, description="defaults to data.seq_len; longer is decoded semi-autoregressively"
    )
    top_p: float = Field(1.0, gt=0, le=1)
    cached: bool = True
    confidence: Literal["prob", "margin"] = Field(
        "prob", description="confidence sampler: the drawn token's probability, or the top-2 margin"
    )
    remask_eta: float = Field(0.02, ge=0, le=1, description="remask sampler: ReMDM's cap eta")
    context: int | None = Field(
        None, ge=0, description="semi-autoregressive: known positions kept per window (L // 2)"
    )
    prefix: str | None = None
    seed: int = 0
    infill_examples: int = Field(
        3, ge=0, description="held-out blocks with a middle gap filled, in the run's report"
    )
    frontier_samples: int = Field(
        8, ge=0, description="samples per sampler and step count of the report's frontier (0: none)"
    )
    frontier_steps: list[int] = Field(
        default_factory=lambda: [8, 32], description="step counts of the frontier, plus L"
    )


class TrackingConfig(_Section):
    enabled: bool = True
    tracking_uri: str | None = Field(None, description="default: sqlite under the run root")
    experiment: str = "maskdiff"
    registered_model: str = "maskdiff-denoiser"
    log_model: bool = True
    system_metrics: bool = True
    champion_metric: str = Field(
        "validation.nelbo.continuous.bits_per_byte",
        description="lower is better; the 'champion' alias moves only when a run beats it",
    )
    ui_url: str = Field(
        "http://127.0.0.1:5000", description="MLflow UI base for links when the store is a file"
    )


class RuntimeConfig(_Section):
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    tf32: bool = True
    num_threads: int | None = Field(None, gt=0)
    peak_tflops: float | None = Field(
        None, gt=0, description="device peak for MFU; default: card table on GPUs, measured on CPU"
    )
    task_runner: Literal["thread", "process", "dask"] = Field(
        "thread", description="what maps the data stages' shards (dask: pip install '.[dask]')"
    )
    max_workers: int = Field(2, gt=0, description="threads, processes or local Dask workers")
    dask_address: str = Field(
        "", description="task_runner=dask: a scheduler (tcp://host:8786); empty: a local cluster"
    )
    # Training processes (docs/distributed.md). None of these enters a run's identity: a run
    # may resume on another world size (train.batch_size is the global batch).
    nproc_per_node: Literal["auto"] | int = Field(
        "auto", description="training processes on this node; auto: the visible GPUs, 1 on CPU"
    )
    nnodes: int = Field(1, ge=1, description="nodes of the training job (c10d rendezvous)")
    node_rank: int = Field(0, ge=0, description="this node's index, informational for c10d")
    rdzv_endpoint: str = Field("", description="HOST:PORT of the c10d rendezvous (nnodes > 1)")
    rdzv_id: str = Field("", description="job id shared by every node; default: the run key")
    collective_timeout: float = Field(
        1800.0, gt=0, description="seconds a rank waits in one collective before it fails and "
        "names the ranks that never arrived (a hung rank); torch's gloo default"
    )  # fmt: skip

    @field_validator("nproc_per_node")
    @classmethod
    def _check_nproc(cls, value: str | int) -> str | int:
        if value != "auto" and (not isinstance(value, int) or value < 1):
            raise ValueError("runtime.nproc_per_node must be 'auto' or an integer >= 1")
        return value

    @model_validator(mode="after")
    def _check_rendezvous(self) -> RuntimeConfig:
        if self.nnodes > 1:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(
                    f"runtime.nnodes={self.nnodes} needs runtime.rdzv_endpoint=HOST:PORT (the "
                    f"c10d rendezvous every node reaches), got {self.rdzv_endpoint!r}"
                )
            if self.node_rank >= self.nnodes:
                raise ValueError("runtime.node_rank must be below runtime.nnodes")
        return self


class NightlyConfig(_Section):
    """The scheduled deployment that ``maskdiff serve`` registers."""

    deployment: str = "nightly"
    cron: str = Field("0 2 * * *", description="cron expression, read in `timezone`")
    timezone: str = "UTC"
    regression_z: float = Field(
        2.0, gt=0, description="flag a run whose bound is worse than the champion's by more "
        "than this many paired standard errors (event maskdiff.regression)"
    )  # fmt: skip

    @model_validator(mode="after")
    def _check_cron(self) -> NightlyConfig:
        fields = self.cron.split()
        if len(fields) != 5:
            raise ValueError(f"nightly.cron={self.cron!r}: expected 5 fields (m h dom mon dow)")
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"nightly.timezone={self.timezone!r} is not a known zone") from exc
        return self


class SweepConfig(_Section):
    """``maskdiff sweep``: how many points train at once (docs/team-setup.md)."""

    max_concurrent: int = Field(1, ge=1, description="points run at once (1 on a CPU)")
