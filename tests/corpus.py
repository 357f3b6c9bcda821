"""Small generated corpora in the real datasets' layouts, the shared samples when they are there, run configs,
and training jobs run on them."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from .seed import TEST_SEED
from .tiny import TINY

SHARED = Path(__file__).resolve().parents[2] / "shared" / "corpora"

WORDS = """the of and to in a is that was he for it with as his on be at by had not are but from or have an they which
one you were her all she there would their we him been has when who will more no if out so said what up its
about into than them can only other new some could time these two may then do first any my now such like our
over man me even most made after also did many before must through back years where much your way well down
should because each just those people how too little state good very make world still own see men work long
get here between both life being under never day same another know while last might us great old year off come
since against go came right used take three""".split()


def prose(rng: random.Random, n_words: int) -> str:
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if rng.random() < 0.08:
            lines.append(" ".join(line) + ".")
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


def write_pg19(root: Path, counts=(8, 2, 2), words=(2000, 6000), seed: int = 0) -> dict[str, list[str]]:
    """Books as <id>.txt under train/validation/test; returns the texts of each split in file order."""
    rng = random.Random(seed)
    texts: dict[str, list[str]] = {}
    for split, n in zip(("train", "validation", "test"), counts):
        (root / split).mkdir(parents=True, exist_ok=True)
        names = sorted(f"{1000 + i}.txt" for i in range(n))
        texts[split] = []
        for name in names:
            text = prose(rng, rng.randint(*words))
            (root / split / name).write_text(text)
            texts[split].append(text)
    (root / "metadata.csv").write_text("1000,A Title,1900,http://example.org\n")
    return texts


def write_arxiv(path: Path, records: list, compress: bool = True) -> None:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if compress else data)


def write_github(path: Path, rows: dict) -> None:
    pq.write_table(pa.table(rows), path)


def shared_corpus(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"needs ../shared/corpora/{name} (the shared samples beside the checkout); not present here")
    return path


# The tiny model's size as `train.model` overrides; the rest (vocabulary, heads, chunks) comes from the
# tokenizer and the preset of the run config.
TINY_MODEL = {key: TINY[key] for key in ("d_model", "n_layers", "d_gate", "d_ssm", "state_size")}


def run_config(root: Path, corpus: Path, name: str, **train) -> dict:
    return {
        "name": name,
        "root": str(root),
        "data": {"source": {"kind": "pg19", "path": str(corpus)}, "tokenizer": {"vocab_size": 300},
                 "pack": {"seq_len": 64}},
        "train": {"preset": "small-gss", "model": TINY_MODEL, "num_workers": 2, "global_batch_tokens": 1024,
                  "micro_batch": 4, "warmup_steps": 5, "lr": 3e-3, "log_every": 5, "seed": TEST_SEED, **train},
    }


def as_overrides(tree: dict, prefix: str = "") -> list[str]:
    """A nested config as `key.sub=value` command-line overrides (train.model stays one YAML mapping)."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and key != "model":
            out += as_overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={yaml.safe_dump(value, default_flow_style=True).strip()}")
    return out


def prepared(root: Path, counts=(10, 2, 2), words=(2000, 5000)) -> Path:
    """`root`/corpus, a generated PG-19, prepared by `gss prepare` into `root`/out (the run name "base")."""
    from pipeline.config import load_config
    from pipeline.prepare import prepare

    write_pg19(root / "corpus", counts=counts, words=words)
    prepare(load_config(None, as_overrides(run_config(root / "out", root / "corpus", "base"))))
    return root


def fresh_process_env(**extra: str) -> dict[str, str]:
    """This environment without the MLflow store and Ray cluster that earlier tests' libraries set in it: a `gss`
    process started with it finds its own, as a user's would."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return env | extra


def start_train(tree: dict, **env: str) -> subprocess.Popen:
    """`gss train` with the config `tree` as a separate driver process on this test session's Ray cluster; `env`:
    more environment variables."""
    import ray

    env = fresh_process_env(RAY_ADDRESS=ray.get_runtime_context().gcs_address, **env)
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "train", *as_overrides(tree)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(job: subprocess.Popen, ready: Callable[[], bool], what: str, seconds: float = 240) -> None:
    """Wait until `ready()`, failing if the job ends first (or after `seconds`)."""
    deadline = time.time() + seconds
    while not ready():
        assert job.poll() is None, f"the job ended before {what}: {job.communicate()[0][-3000:]}"
        assert time.time() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.05)


def train_run(root: Path, name: str):
    """The one MLflow run of training run `name` under `root`/out."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'out' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["gss"], filter_string=f"tags.`gss.train_name` = '{name}'",
                              output_format="list")
    assert len(runs) == 1, runs
    return runs[0]


def metric_steps(run, key: str) -> dict[int, float]:
    import mlflow

    return {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, key)}


def train_killing_a_worker(root: Path, tree: dict) -> str:
    """`gss train` of `tree` (under `root`/out) with rank 1 SIGKILLed once a checkpoint is registered; returns
    the job's output once it has finished successfully."""
    from fsspec.implementations.local import LocalFileSystem

    run_dir = str(root / "out" / "train" / tree["name"])
    return kill_rank_1_once_checkpointed(start_train(tree), LocalFileSystem(), run_dir)


def kill_rank_1_once_checkpointed(job: subprocess.Popen, fs, run_dir: str) -> str:
    """SIGKILL training rank 1 of `job` (`gss train` or `gss run`) once a checkpoint of its run folder `run_dir`
    in `fs` (local or a bucket) is registered (the controller writes its snapshot file then); returns the job's
    output once it has finished successfully."""
    import signal

    pid = f"{run_dir}/workers/rank-1.pid"

    def checkpointed() -> bool:
        fs.invalidate_cache()
        return fs.exists(f"{run_dir}/checkpoint_manager_snapshot.json") and fs.exists(pid)

    wait_for(job, checkpointed, "a checkpoint")
    os.kill(int(fs.cat_file(pid)), signal.SIGKILL)
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output[-3000:]
    return output
