"""One config object drives a run: nested dataclasses, loaded from YAML, overridden with `key.sub=value`.

`load_config("configs/x.yaml", ["data.pack.seq_len=1024"])` returns a `RunConfig`, checked whole before any
work starts: every key is known, every value has its field's type, is one of its choices (`Literal`) and
passes its checks (`Annotated[type, check]`, below), `train.preset` and `train.model` make a model, and
the global batch fits the training length. Anything else is a `ConfigError` of one line that names the
dotted key and what is allowed there: a typo never silently falls back to a default, and a bad value never
reaches a library as a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import yaml

from models import PRESETS, ModelConfig
from pipeline.storage import absolute

Split = Literal["train", "validation", "test"]
SPLITS: tuple[str, ...] = typing.get_args(Split)


class ConfigError(ValueError):
    """A config that cannot be used; the message says which key and what to do."""


# ---------------------------------------------------------------------------------------------------
# Value checks, attached to a field as `Annotated[type, check, ...]`; a value that fails one is the error
# "<dotted key>=<value>: must be <check.allowed>".


@dataclass(frozen=True)
class Check:
    """A condition on a value; `allowed` finishes the sentence "must be ..."."""

    test: Callable[[Any], bool]
    allowed: str


def at_least(low: float, why: str = "") -> Check:
    return Check(lambda v: v >= low, f"at least {low}" + (f" ({why})" if why else ""))


def above(low: float) -> Check:
    return Check(lambda v: v > low, f"greater than {low}")


def within(low: float, high: float, *, include_high: bool = True) -> Check:
    if include_high:
        return Check(lambda v: low <= v <= high, f"in [{low}, {high}]")
    return Check(lambda v: low <= v < high, f"in [{low}, {high})")


NON_EMPTY = Check(lambda v: len(v) > 0, "non-empty")
PAIR = Check(lambda v: len(v) == 2, "two numbers")

Positive = Annotated[int, at_least(1)]
NonNegative = Annotated[int, at_least(0)]
Fraction = Annotated[float, within(0, 1)]

# SentencePiece with byte fallback holds 256 byte pieces, <unk> <s> </s> and our user symbols "\n" and "\t"
# (261), then a piece for "▁" and for each character of the text: 263 for a text of one letter.
MIN_VOCAB_SIZE = 263
VocabSize = Annotated[int, at_least(
    MIN_VOCAB_SIZE, "SentencePiece needs 256 byte pieces, <unk> <s> </s>, the \\n and \\t pieces, '▁' and a piece "
    "per distinct character of the text"
)]  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# The config tree: each field's docstring says what it means.


@dataclass
class SourceConfig:
    """Where the raw text is and how it is laid out (read through fsspec: local, gs://, memory://)."""

    kind: Literal["pg19", "arxiv", "github", "files"] = "pg19"
    """The layout: pg19 (a book per .txt), arxiv (JSON lines), github (Parquet), files (a document per file)."""
    path: str = ""
    """The corpus root; split globs are relative to it."""
    splits: dict[Split, str] = field(default_factory=dict)
    """Split -> glob under `path`; empty: the kind's public layout (see `pipeline.sources.DEFAULT_SPLITS`)."""
    text_field: str = ""
    """The arxiv JSON field / github Parquet column; empty: "text" / "code"."""
    languages: list[str] = field(default_factory=list)
    """github: keep only these languages (empty: all)."""
    licenses: list[str] = field(default_factory=list)
    """github: keep only these licenses (empty: all)."""
    exclude: list[str] = field(default_factory=list)
    """Globs under `path` to leave out, e.g. site-packages/*."""
    holdout_fraction: Annotated[float, within(0, 1, include_high=False)] = 0.0
    """files/pg19 with no validation/test glob: hold out this fraction of the train files for each."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options, e.g. {token: anon}."""
    unit_bytes: Positive = 32 << 20
    """Files are read, tokenized and written in units (= shards) of about this many bytes."""


@dataclass
class TokenizerConfig:
    """The SentencePiece model: trained on a sample of the training split, or given."""

    path: str = ""
    """An existing SentencePiece model to use; empty: train one."""
    vocab_size: VocabSize = 32000
    model_type: Literal["unigram", "bpe"] = "unigram"
    sample_bytes: Positive = 200 << 20
    """Train on about this much of the training split."""
    seed: NonNegative = 0


@dataclass
class PackConfig:
    """How tokenized documents become rows."""

    seq_len: Positive = 4096
    """The training length: the model trains on exactly this many tokens per row (rows hold seq_len + 1
    tokens, the last one the target of the one before; see `pipeline.dataset`)."""
    eval_piece_tokens: Positive = 131072
    """Validation/test documents longer than this are cut into pieces."""


@dataclass
class DataConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    splits: Annotated[list[Split], NON_EMPTY] = field(default_factory=lambda: list(SPLITS))
    num_actors: NonNegative = 0
    """Execution only (not part of the dataset's identity): tokenizer actors; 0 = one per CPU."""


@dataclass
class TrainConfig:
    preset: str = "small-gss"
    """A models.PRESETS name; vocab_size comes from the dataset's tokenizer."""
    model: dict[str, Any] = field(default_factory=dict)
    """models.ModelConfig overrides, e.g. {ssm_kernel: chunked}."""
    backend: Literal["cpu", "cuda", "xla"] = "cpu"
    """cpu (gloo DDP) | cuda (NCCL; DDP or FSDP2) | xla (torch_xla SPMD)."""
    num_workers: Positive = 2
    worker_resources: dict[str, Annotated[float, at_least(0)]] = field(default_factory=dict)
    """Ray resources each worker holds, e.g. {TPU: 4} for one v4 host (so workers land on TPU VMs); empty:
    Ray's default (1 CPU, or 1 GPU with backend cuda)."""
    topology: str = ""
    """The TPU slice's topology when workers hold TPUs, e.g. 2x2x1 (v4-8, one host) or 2x2x4 (v4-32, four
    hosts; one worker per host): Ray reserves the whole slice by its hosts' node labels."""
    accelerator_type: str = ""
    """The accelerator the workers need, e.g. TPU-V4 (with `topology`) or A100; empty: any."""
    steps: Positive = 200
    global_batch_tokens: Positive = 32768
    """Per optimizer step, over all workers and accumulation steps: a multiple of
    num_workers × micro_batch × data.pack.seq_len."""
    micro_batch: Positive = 4
    """Rows per forward on one worker."""
    lr: Annotated[float, above(0)] = 1e-3
    min_lr_ratio: Fraction = 0.1
    """Cosine decay to lr * min_lr_ratio."""
    warmup_steps: NonNegative = 20
    weight_decay: Annotated[float, at_least(0)] = 0.1
    betas: Annotated[list[Annotated[float, within(0, 1, include_high=False)]], PAIR] = field(
        default_factory=lambda: [0.9, 0.95]
    )
    """AdamW's [beta1, beta2]."""
    grad_clip: Annotated[float, above(0)] = 1.0
    """The largest gradient norm; larger gradients are scaled down to it."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto (bf16 autocast on cuda/xla, fp32 on cpu) | bf16 | fp32."""
    compile: Literal["auto", True, False] = "auto"
    """torch.compile the model with Inductor (cpu, cuda; XLA compiles its graphs itself): auto (on with backend cuda,
    off on cpu) | true | false. Off on cpu because there the compile dominates short runs (about a minute for the tests'
    tiny two-layer model on 2 cores) and a compiled CPU step was not measured faster. Its time and Inductor's cache
    lookups are logged (compile_seconds, fx_graph_cache_hits, ...); the cache persists under the root
    (`pipeline.backends.inductor_cache_dir`)."""
    fsdp: bool = False
    """FSDP2 (fully_shard per block) instead of DDP (cpu, cuda); checkpoints are then sharded."""
    eval_every: Positive = 50
    eval_windows: Positive = 16
    """Validation windows of seq_len inputs (seq_len + 1 tokens), split over the workers; whole micro-batches
    of them on every worker."""
    checkpoint_every: Positive = 50
    checkpoint_minutes: Annotated[float, at_least(0)] = 0.0
    """Also checkpoint whenever this many minutes have passed since the last checkpoint (rank 0's clock); 0 = off.
    A worker told to stop (SIGTERM, e.g. a Spot VM's preemption) checkpoints at its next step whatever these say."""
    keep_checkpoints: Positive = 2
    max_failures: NonNegative = 3
    """Worker-group restarts from the last checkpoint."""
    log_every: Positive = 10
    seed: NonNegative = 0
    register_as: str = ""
    """MLflow registered model name; empty: gss-<run name>."""


@dataclass
class EvalConfig:
    lengths: Annotated[list[Positive], NON_EMPTY] = field(
        default_factory=lambda: [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
    )
    """Evaluation lengths: every document is scored whole, in consecutive windows of each length (lengths
    longer than the longest document are skipped); beyond the training length this is zero-shot."""
    splits: Annotated[list[Split], NON_EMPTY] = field(default_factory=lambda: ["test"])
    model: str = ""
    """A checkpoint folder or an MLflow model URI; empty: models:/<registered name>@current."""
    piece_tokens: Positive = 2048
    """A window is run in pieces of this many tokens, the state carried between them."""
    batch_tokens: Positive = 16384
    """Tokens per batch of windows of one length (at least one window): what a scorer runs at once."""
    num_workers: NonNegative = 0
    """Scorer actors, each holding what a training worker holds (train.worker_resources but TPUs, a GPU with
    train.backend cuda, else a CPU) and the model, loaded once; 0: train.num_workers."""
    max_documents: NonNegative = 0
    """Score only the first n documents of each split; 0 = all."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto (cuda if there is one) | cpu | cuda."""
    during_training: NonNegative = 0
    """Score every n-th checkpoint of `gss train` on the validation split (its first max_documents documents) at
    during_training_lengths, in Ray Train validation tasks beside the workers (one CPU each), and log the result
    into the training run at the checkpoint's step; 0: off."""
    during_training_lengths: list[Positive] = field(default_factory=list)
    """Empty: the eval.lengths up to 4 × the training length."""


@dataclass
class TrackingConfig:
    uri: str = ""
    """MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db."""
    experiment: Annotated[str, NON_EMPTY] = "gss"


@dataclass
class RayConfig:
    address: str = ""
    """Empty: $RAY_ADDRESS, else start a local cluster."""
    num_cpus: NonNegative = 0
    """Local cluster only; 0 = all."""
    dashboard: bool = True
    """Local cluster only: start the dashboard on 127.0.0.1. It serves the State API that Ray Train v2's
    placement-group cleaner polls every second (without it the cleaner cannot work and logs a warning each
    second) and the Jobs API that `gss submit` uses."""


@dataclass
class RunConfig:
    name: Annotated[str, NON_EMPTY] = "run"
    """Names the run's MLflow runs (a re-run with the same name resumes) and its model, gss-<name>."""
    root: Annotated[str, NON_EMPTY] = "runs"
    """Everything a run writes goes under here (local path or gs://...)."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# ---------------------------------------------------------------------------------------------------
# Checks that span fields


def model_config(cfg: RunConfig, vocab_size: int) -> ModelConfig:
    """The model of a run: preset `train.preset`, overridden by `train.model`, with the tokenizer's vocabulary."""
    preset = cfg.train.preset
    if preset not in PRESETS:
        raise ConfigError(f"train.preset={preset!r}: must be one of {', '.join(PRESETS)}")
    hints = typing.get_type_hints(ModelConfig, include_extras=True)
    names = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "vocab_size"]
    overrides = {}
    for key, value in cfg.train.model.items():
        path = f"train.model.{key}"
        if key == "vocab_size":
            raise ConfigError(f"{path}: the model's vocabulary is its tokenizer's; set data.tokenizer.vocab_size")
        if key not in names:
            raise ConfigError(_unknown_key(path, names))
        overrides[key] = _coerce(hints[key], value, path)
    try:
        return dataclasses.replace(PRESETS[preset], **overrides, vocab_size=vocab_size)
    except ValueError as e:  # ModelConfig's messages start with the field's name
        raise ConfigError(f"train.model.{e}") from None


def compiles(tc: TrainConfig) -> bool:
    """Whether the model runs under torch.compile: `train.compile`, where auto is on with backend cuda only."""
    return tc.backend == "cuda" if tc.compile == "auto" else tc.compile


def batch_layout(tc: TrainConfig, seq_len: int) -> tuple[int, int]:
    """(rows per optimizer step over all workers, micro-batches per worker per step)."""
    rows = tc.global_batch_tokens // seq_len
    per_pass = tc.num_workers * tc.micro_batch
    if rows < per_pass or rows % per_pass:
        raise ConfigError(
            f"train.global_batch_tokens={tc.global_batch_tokens} is {rows} rows of {seq_len}; it must be a multiple "
            f"of num_workers × micro_batch = {per_pass} rows ({per_pass * seq_len} tokens)"
        )
    return rows, rows // per_pass


def check_run(cfg: RunConfig) -> None:
    """What no single field can check: the model, the batch layout, options of one backend only."""
    model_config(cfg, cfg.data.tokenizer.vocab_size)  # the dataset's tokenizer may have fewer pieces: a stand-in
    batch_layout(cfg.train, cfg.data.pack.seq_len)
    for option in ("compile", "fsdp"):
        if getattr(cfg.train, option) is True and cfg.train.backend == "xla":  # compile: auto is off with xla
            raise ConfigError(f"train.{option}=true: not with train.backend=xla (SPMD shards the batch; XLA compiles)")


# ---------------------------------------------------------------------------------------------------
# dict <-> dataclass


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking every key and value (type, choices, checks)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(_unknown_key(path, names))
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _unknown_key(path: str, names: list[str]) -> str:
    close = difflib.get_close_matches(path.rsplit(".", 1)[-1], names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown config key {path!r}{hint}; allowed here: {', '.join(names)}"


def _coerce(hint: Any, value: Any, path: str) -> Any:
    """`value` as type `hint`, or a ConfigError naming `path`; YAML's loose forms are accepted where harmless."""
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value or {}, path)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        value = _coerce(args[0], value, path)
        for check in hint.__metadata__:
            if not check.test(value):
                raise ConfigError(f"{path}={value!r}: must be {check.allowed}")
        return value
    if origin is Literal:  # of the choice's type too (1 is no `true`); booleans said as YAML writes them
        if not any(value == arg and type(value) is type(arg) for arg in args):
            choices = ", ".join(str(arg).lower() if isinstance(arg, bool) else str(arg) for arg in args)
            raise ConfigError(f"{path}={value!r}: must be one of {choices}")
        return value
    if origin is list:  # a single value is a list of one
        items = value if isinstance(value, list) else [value] if value not in (None, "") else []
        return [_coerce(args[0], item, f"{path}[{i}]") for i, item in enumerate(items)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_hint, value_hint = args
        return {_coerce(key_hint, k, f"{path}.<key>"): _coerce(value_hint, v, f"{path}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and not isinstance(value, bool) and isinstance(value, (int, str)):
        try:  # YAML 1.1 reads 1e-3 (no dot) as text
            return float(value)
        except ValueError:
            pass
    if hint is str and value is None:
        return ""
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply `a.b.c=value` to a nested dict; the value is parsed as YAML (`3`, `true`, `[a, b]`)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    try:
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:  # not YAML (a glob like **/*.py): the text itself
        node[leaf] = raw


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The run config of a YAML file (optional) and `key.sub=value` overrides, checked whole."""
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} not found (see configs/ for examples)") from None
    for override in overrides:
        apply_override(data, override)
    cfg = from_dict(RunConfig, data)
    check_run(cfg)
    # local paths made absolute here: Ray workers do not share the driver's working folder
    cfg.root = absolute(cfg.root)
    cfg.data.source.path = absolute(cfg.data.source.path)
    cfg.data.tokenizer.path = absolute(cfg.data.tokenizer.path)
    if not cfg.eval.model.startswith(("models:/", "runs:/")):
        cfg.eval.model = absolute(cfg.eval.model)
    return cfg


def fingerprint(obj: Any, length: int = 10) -> str:
    """A short stable hash of a config (or any JSON-able value)."""
    value = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    blob = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
