"""One config object drives a run: nested dataclasses, loaded from YAML, overridden with `key.sub=value`.

`load_config("configs/x.yaml", ["data.pack.seq_len=1024"])` returns a `RunConfig`. Unknown keys are
errors that name the key and the keys allowed there, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline.storage import absolute

SPLITS = ("train", "validation", "test")


class ConfigError(ValueError):
    """A config that cannot be used; the message says which key and what to do."""


@dataclass
class SourceConfig:
    """Where the raw text is and how it is laid out (read through fsspec: local, gs://, memory://)."""

    kind: str = "pg19"  # pg19 | arxiv | github | files
    path: str = ""  # the corpus root; split globs are relative to it
    # split -> glob under `path`; empty: the kind's public layout (see `pipeline.sources.DEFAULT_SPLITS`)
    splits: dict[str, str] = field(default_factory=dict)
    text_field: str = ""  # arxiv JSON field / github Parquet column; empty: "text" / "code"
    languages: list[str] = field(default_factory=list)  # github: keep only these languages (empty: all)
    licenses: list[str] = field(default_factory=list)  # github: keep only these licenses (empty: all)
    exclude: list[str] = field(default_factory=list)  # globs under `path` to leave out, e.g. site-packages/*
    # files/pg19 with no validation/test glob: hold out this fraction of the train files for each
    holdout_fraction: float = 0.0
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options, e.g. {token: anon}
    unit_bytes: int = 32 << 20  # files are read, tokenized and written in units (= shards) of about this many bytes


@dataclass
class TokenizerConfig:
    path: str = ""  # an existing SentencePiece model to use; empty: train one
    vocab_size: int = 32000
    model_type: str = "unigram"  # unigram | bpe
    sample_bytes: int = 200 << 20  # train on about this much of the training split
    seed: int = 0


@dataclass
class PackConfig:
    seq_len: int = 4096  # training rows have exactly this many tokens (the last row may be shorter)
    eval_piece_tokens: int = 131072  # validation/test documents longer than this are cut into pieces


@dataclass
class DataConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    splits: list[str] = field(default_factory=lambda: list(SPLITS))
    # execution only (not part of the dataset's identity): tokenizer actors; 0 = one per CPU
    num_actors: int = 0


@dataclass
class TrainConfig:
    preset: str = "small-gss"  # a models.PRESETS name; vocab_size comes from the dataset's tokenizer
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides, e.g. {ssm_kernel: chunked}
    backend: str = "cpu"  # cpu (gloo DDP) | cuda (NCCL; DDP or FSDP2) | xla (torch_xla SPMD)
    num_workers: int = 2
    # Ray resources each worker holds, e.g. {TPU: 4} for one v4 host (so workers land on TPU VMs); empty: Ray's
    # default (1 CPU, or 1 GPU with backend cuda)
    worker_resources: dict[str, float] = field(default_factory=dict)
    steps: int = 200
    global_batch_tokens: int = 32768  # per optimizer step, over all workers and accumulation steps
    micro_batch: int = 4  # rows per forward on one worker
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 autocast on cuda/xla, fp32 on cpu) | bf16 | fp32
    compile: bool = False  # cuda: torch.compile the model
    fsdp: bool = False  # cuda: FSDP2 (fully_shard per block) instead of DDP
    eval_every: int = 50
    eval_windows: int = 16  # validation windows of seq_len tokens, split over the workers
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    max_failures: int = 3  # worker-group restarts from the last checkpoint
    log_every: int = 10
    seed: int = 0
    register_as: str = ""  # MLflow registered model name; empty: gss-<run name>


@dataclass
class EvalConfig:
    # evaluation lengths: every document is scored whole, in consecutive windows of each length (lengths
    # longer than the longest document are skipped); beyond the training length this is zero-shot
    lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536])
    splits: list[str] = field(default_factory=lambda: ["test"])
    model: str = ""  # a checkpoint folder or an MLflow model URI; empty: models:/<registered name>@current
    piece_tokens: int = 2048  # a window is run in pieces of this many tokens, the state carried between them
    batch_size: int = 4  # windows per forward pass
    max_documents: int = 0  # score only the first n documents of each split; 0 = all
    device: str = "auto"  # auto (cuda if there is one) | cpu | cuda


@dataclass
class TrackingConfig:
    uri: str = ""  # MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db
    experiment: str = "gss"


@dataclass
class RayConfig:
    address: str = ""  # empty: $RAY_ADDRESS, else start a local cluster
    num_cpus: int = 0  # local cluster only; 0 = all
    dashboard: bool = False  # local cluster only: start the dashboard (and its Jobs API, for `gss submit`)


@dataclass
class RunConfig:
    name: str = "run"
    root: str = "runs"  # everything a run writes goes under here (local path or gs://...)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# ---------------------------------------------------------------------------------------------------
# dict <-> dataclass


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking every key and value type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint}; allowed here: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value or {}, path)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return value
    if origin is list:
        if not isinstance(value, list):
            value = [value] if value not in (None, "") else []
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
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
