"""The run config: overrides, unknown keys, and every kind of bad value refused at load time in one line."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from models import PRESETS
from pipeline.config import ConfigError, RunConfig, TrainConfig, batch_layout, compiles, load_config, model_config

REPO = Path(__file__).parents[1]
LOCAL = REPO / "configs" / "local.yaml"


def test_config_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ndata:\n  pack:\n    seq_len: 512\n")
    cfg = load_config(path, ["data.pack.seq_len=1024", "data.source.languages=[Python, C]", "root=/r"])
    assert (cfg.name, cfg.root, cfg.data.pack.seq_len, cfg.data.source.languages) == ("x", "/r", 1024, ["Python", "C"])
    with pytest.raises(ConfigError, match="unknown config key 'data.pack.seqlen'.*did you mean 'seq_len'"):
        load_config(path, ["data.pack.seqlen=3"])
    with pytest.raises(ConfigError, match="data.pack.seq_len: expected int"):
        load_config(path, ["data.pack.seq_len=long"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_shipped_config_and_every_cell_of_the_shipped_sweeps_loads():
    from jobs.sweep import load_sweep

    configs = sorted((REPO / "configs").glob("*.yaml"))
    sweeps = [p for p in configs if p.name.startswith("sweep-")]
    runs = [p for p in configs if p not in sweeps]
    assert runs and sweeps
    for path in runs:
        cfg = load_config(path)
        assert cfg.name and cfg.data.source.path, path
    for path in sweeps:
        spec = load_sweep(str(path))
        names = [load_config(spec.base, cell.overrides).name for cell in spec.cells]
        assert len(set(names)) == len(names) > 1, path


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads_with_the_local_config(preset):
    assert load_config(LOCAL, [f"train.preset={preset}"]).train.preset == preset


def test_valid_values_load():
    cfg = load_config(LOCAL, [
        "train.lr=1e-3",  # YAML 1.1 reads this as text; a float field takes it
        "train.backend=cuda", "train.fsdp=true", "train.precision=bf16", "eval.device=cpu",
        "data.tokenizer.vocab_size=263", "data.tokenizer.model_type=bpe", "data.pack.seq_len=1",
        "train.global_batch_tokens=64", "train.micro_batch=16", "train.num_workers=2",
        "train.min_lr_ratio=0", "train.betas=[0, 0.999]", "data.source.kind=files", "data.source.splits.train=**/*.py",
        "train.worker_resources={TPU: 4}", "train.model={arch: transformer, ssm_kernel: chunked}",
    ])  # fmt: skip
    assert cfg.train.lr == 1e-3 and cfg.train.betas == [0.0, 0.999] and cfg.train.worker_resources == {"TPU": 4.0}
    model = model_config(cfg, vocab_size=300)
    assert (model.arch, model.ssm_kernel, model.vocab_size) == ("transformer", "chunked", 300)


def test_train_compile_auto_is_on_with_cuda_only():
    """auto: torch.compile on cuda; off on cpu (the compile outweighs short runs) and with xla (XLA compiles)."""
    for backend, on in (("cpu", False), ("cuda", True), ("xla", False)):
        tc = load_config(LOCAL, [f"train.backend={backend}"]).train
        assert tc.compile == "auto" and compiles(tc) is on, backend
    assert compiles(load_config(LOCAL, ["train.compile=true"]).train) is True  # cpu, when asked
    assert compiles(load_config(LOCAL, ["train.backend=cuda", "train.compile=off"]).train) is False  # YAML 1.1's off


# (override of configs/local.yaml, what the one-line error says)
BAD = [
    ("data.tokenizer.vocab_size=-5", "data.tokenizer.vocab_size=-5: must be at least 263 (SentencePiece needs"),
    ("data.tokenizer.vocab_size=262", "data.tokenizer.vocab_size=262: must be at least 263"),
    ("data.tokenizer.model_type=word", "data.tokenizer.model_type='word': must be one of unigram, bpe"),
    ("data.tokenizer.sample_bytes=0", "data.tokenizer.sample_bytes=0: must be at least 1"),
    ("data.pack.seq_len=0", "data.pack.seq_len=0: must be at least 1"),
    ("data.pack.eval_piece_tokens=0", "data.pack.eval_piece_tokens=0: must be at least 1"),
    ("data.source.kind=web", "data.source.kind='web': must be one of pg19, arxiv, github, files"),
    ("data.source.holdout_fraction=1", "data.source.holdout_fraction=1.0: must be in [0, 1)"),
    ("data.source.unit_bytes=0", "data.source.unit_bytes=0: must be at least 1"),
    ("data.source.splits.trian=x", "data.source.splits.<key>='trian': must be one of train, validation, test"),
    ("data.splits=[train, dev]", "data.splits[1]='dev': must be one of train, validation, test"),
    ("data.splits=[]", "data.splits=[]: must be non-empty"),
    ("data.num_actors=-1", "data.num_actors=-1: must be at least 0"),
    ("train.backend=tpu", "train.backend='tpu': must be one of cpu, cuda, xla"),
    ("train.precision=fp16", "train.precision='fp16': must be one of auto, bf16, fp32"),
    (("train.backend=xla", "train.fsdp=true"), "train.fsdp=true: not with train.backend=xla"),
    (("train.backend=xla", "train.compile=true"), "train.compile=true: not with train.backend=xla"),
    ("train.compile=maybe", "train.compile='maybe': must be one of auto, true, false"),
    ("train.compile=1", "train.compile=1: must be one of auto, true, false"),  # a number is no boolean
    ("train.preset=nope", "train.preset='nope': must be one of paper-gss, "),
    ("train.model.nope=1", "unknown config key 'train.model.nope'; allowed here: arch, d_model,"),
    ("train.model.ssm_kernal=chunked", "unknown config key 'train.model.ssm_kernal' (did you mean 'ssm_kernel'?)"),
    ("train.model.ssm_kernel=conv", "train.model.ssm_kernel='conv': must be one of fft, chunked"),
    ("train.model.arch=rnn", "train.model.arch='rnn': must be one of gss, dss, transformer, hybrid"),
    ("train.model.d_model=big", "train.model.d_model: expected int, got str 'big'"),
    ("train.model.n_layers=-1", "train.model.n_layers=-1: must be at least 0"),
    ("train.model.d_model=0", "train.model.d_model=0: must be at least 1"),
    ("train.model.ssm_max_memory=0.5", "train.model.ssm_max_memory=0.5: must be at least 1"),
    ("train.model={arch: hybrid, n_heads: 3}", "train.model.d_model=256: must be n_heads=3 times an even head width"),
    ("train.model.vocab_size=100", "train.model.vocab_size: the model's vocabulary is its tokenizer's"),
    ("train.global_batch_tokens=5000", "train.global_batch_tokens=5000 is 19 rows of 256; it must be a multiple of "
                                       "num_workers × micro_batch = 16 rows (4096 tokens)"),
    ("train.global_batch_tokens=256", "train.global_batch_tokens=256 is 1 rows of 256"),
    ("train.num_workers=0", "train.num_workers=0: must be at least 1"),
    ("train.micro_batch=-1", "train.micro_batch=-1: must be at least 1"),
    ("train.steps=0", "train.steps=0: must be at least 1"),
    ("train.lr=0", "train.lr=0.0: must be greater than 0"),
    ("train.lr=fast", "train.lr: expected float, got str 'fast'"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio=1.5: must be in [0, 1]"),
    ("train.warmup_steps=-1", "train.warmup_steps=-1: must be at least 0"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1: must be at least 0"),
    ("train.betas=[0.9, 1]", "train.betas[1]=1.0: must be in [0, 1)"),
    ("train.betas=[0.9]", "train.betas=[0.9]: must be two numbers"),
    ("train.grad_clip=0", "train.grad_clip=0.0: must be greater than 0"),
    ("train.eval_every=0", "train.eval_every=0: must be at least 1"),
    ("train.eval_windows=0", "train.eval_windows=0: must be at least 1"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0: must be at least 1"),
    ("train.max_failures=-1", "train.max_failures=-1: must be at least 0"),
    ("train.worker_resources={TPU: -4}", "train.worker_resources.TPU=-4.0: must be at least 0"),
    ("eval.lengths=[256, 0]", "eval.lengths[1]=0: must be at least 1"),
    ("eval.lengths=[]", "eval.lengths=[]: must be non-empty"),
    ("eval.splits=[dev]", "eval.splits[0]='dev': must be one of train, validation, test"),
    ("eval.piece_tokens=0", "eval.piece_tokens=0: must be at least 1"),
    ("eval.batch_tokens=0", "eval.batch_tokens=0: must be at least 1"),
    ("eval.max_documents=-1", "eval.max_documents=-1: must be at least 0"),
    ("eval.device=gpu", "eval.device='gpu': must be one of auto, cpu, cuda"),
    ("ray.num_cpus=-2", "ray.num_cpus=-2: must be at least 0"),
    ("name=", "name='': must be non-empty"),
]


@pytest.mark.parametrize(("override", "message"), BAD, ids=[" ".join(o) if isinstance(o, tuple) else o for o, _ in BAD])
def test_a_bad_value_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_config(LOCAL, list(override) if isinstance(override, tuple) else [override])
    assert "\n" not in str(error.value)


def test_model_config_and_batch_layout():
    cfg = RunConfig()
    cfg.train.model = {"n_layers": 2, "ssm_max_memory": 64}
    model = model_config(cfg, vocab_size=500)
    assert (model.n_layers, model.ssm_max_memory, model.vocab_size, model.d_model) == (
        2, 64.0, 500, PRESETS["small-gss"].d_model,
    )  # fmt: skip
    assert batch_layout(TrainConfig(global_batch_tokens=4096, num_workers=2, micro_batch=4), 128) == (32, 4)
    with pytest.raises(ConfigError, match="multiple of num_workers × micro_batch = 8 rows"):
        batch_layout(TrainConfig(global_batch_tokens=1000, num_workers=2, micro_batch=4), 64)


def test_the_cli_refuses_a_bad_value_before_starting_anything(tmp_path):
    command = [sys.executable, "-m", "jobs.cli", "prepare", f"root={tmp_path}", "data.tokenizer.vocab_size=-5"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gss prepare: data.tokenizer.vocab_size=-5: must be at least 263")
    assert not any(tmp_path.iterdir())  # nothing written: no Ray, no tokenizer
