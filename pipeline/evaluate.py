"""`gss eval`: perplexity against evaluation length, zero-shot beyond the training length.

At every length L each document is scored whole: it is read as consecutive windows of L tokens, the
context restarting at each window, so the same tokens are scored at every length and only the context
they see changes. A window is run in pieces of `eval.piece_tokens` with the model's recurrent state
(or attention cache) carried from piece to piece, so a 65k window fits in memory on a CPU.

Every token of a document is predicted, the first one from the end-of-document id that precedes it in
training. Reported per split and length: token perplexity, word-level perplexity (the summed negative
log-likelihood over the document's whitespace words, as PG-19 is scored) and bits per byte.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models import LanguageModel, ModelConfig, build_model, next_token_loss
from pipeline import checkpoint
from pipeline.config import RunConfig
from pipeline.dataset import check_shards, dataset_dir, eval_documents, is_complete, load_manifest
from pipeline.lease import hold_lease
from pipeline.tracking import Tag, Tracking, default_model_uri, finished_evals, log_params


class EvalError(RuntimeError):
    """The evaluation cannot run as configured; the message says what to do."""


@dataclasses.dataclass
class LoadedModel:
    model: LanguageModel
    uri: str  # a checkpoint folder or models:/<name>/<version>
    dataset: str = ""  # the dataset it was trained on, when known
    tokenizer_sha256: str = ""
    train_run_id: str = ""


# ---------------------------------------------------------------------------------------------------
# Scoring

Window = tuple[int, int, int]  # (document, start, size)


def token_batches(doc_lengths: list[int], length: int, batch_tokens: int) -> list[list[Window]]:
    """Every document's consecutive windows of `length`, in batches of one window size holding at most
    `batch_tokens` tokens (at least one window each), longest windows first."""
    windows = sorted(((d, start, min(length, n - start)) for d, n in enumerate(doc_lengths)
                      for start in range(0, n, length)), key=lambda w: -w[2])
    batches = []
    for size, same in itertools.groupby(windows, key=lambda w: w[2]):
        same, per_batch = list(same), max(1, batch_tokens // size)
        batches += [same[i: i + per_batch] for i in range(0, len(same), per_batch)]
    return batches


def window_arrays(docs: list[np.ndarray], eod_id: int, batch: list[Window]) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) [len(batch), size] of a batch: every token is predicted, the first from end-of-document."""
    inputs = [np.concatenate([[eod_id], docs[d][: size - 1]]) if s == 0 else docs[d][s - 1: s + size - 1]
              for d, s, size in batch]
    return np.stack(inputs).astype(np.int64), np.stack([docs[d][s: s + size] for d, s, size in batch]).astype(np.int64)


@torch.no_grad()
def score_windows(model: LanguageModel, inputs: np.ndarray, targets: np.ndarray, piece_tokens: int,
                  device: torch.device) -> np.ndarray:
    """Summed negative log-likelihood (nats) of each window [B], run in pieces with the state carried."""
    # copied: in a Scorer the arrays are Ray's read-only, zero-copy views of its object store
    inputs, targets = torch.tensor(inputs, device=device), torch.tensor(targets, device=device)
    state = model.init_state(len(inputs))
    totals = torch.zeros(len(inputs), device=device, dtype=torch.float64)
    for p in range(0, inputs.shape[1], piece_tokens):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, state = model.prefill(inputs[:, p: p + piece_tokens], state)
        totals += next_token_loss(logits, targets[:, p: p + piece_tokens], reduction="none").sum(1).double()
    return totals.cpu().numpy()


def score_documents(model: LanguageModel, docs: list[np.ndarray], length: int, eod_id: int, piece_tokens: int,
                    batch_tokens: int, device: torch.device) -> np.ndarray:
    """Summed negative log-likelihood of each document in windows of `length`, every batch in this process: the
    reference for `ClusterScorer`, which spreads the same batches over Ray actors."""
    nll = np.zeros(len(docs))
    for batch in token_batches([len(d) for d in docs], length, batch_tokens):
        totals = score_windows(model, *window_arrays(docs, eod_id, batch), piece_tokens, device)
        np.add.at(nll, [d for d, _, _ in batch], totals)
    return nll


class Scorer:
    """A Ray actor holding the model, loaded once, that scores batches of windows."""

    def __init__(self, model_config: dict[str, Any], weights: dict[str, torch.Tensor], device: str, threads: int):
        if threads:
            torch.set_num_threads(threads)  # the CPUs this actor holds: actors on one host must not contend
        self.device = pick_device(device)
        self.model = build_model(ModelConfig(**model_config))
        self.model.load_state_dict(weights)
        self.model.to(self.device).eval()

    def score(self, inputs: np.ndarray, targets: np.ndarray, piece_tokens: int) -> tuple[np.ndarray, float]:
        """(summed NLL of each window, seconds it took)."""
        started = time.perf_counter()
        return score_windows(self.model, inputs, targets, piece_tokens, self.device), time.perf_counter() - started


class ClusterScorer:
    """`eval.num_workers` Scorer actors, each holding what a training worker holds; batches go to whichever is
    free, two in flight per actor (one running, one waiting), generated as they are needed. A scorer lost with its
    node hands its batches to the others (a new one is started, to wait for room, if none is left): a batch's sums
    do not depend on which scorer ran it."""

    def __init__(self, model: LanguageModel, cfg: RunConfig):
        import ray

        from pipeline.cluster import connect

        connect(cfg.ray)
        self.weights = ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()})
        self.options, self.device = scorer_options(cfg), cfg.eval.device
        self.model_config = dataclasses.asdict(model.cfg)
        self.actors = [self._start() for _ in range(cfg.eval.num_workers or cfg.train.num_workers)]
        self.piece_tokens = cfg.eval.piece_tokens

    def __enter__(self) -> ClusterScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """End the scorers now, not when the last reference to them goes: a traceback or a reference cycle can put
        that off for minutes (one held a CPU of the test cluster for five, and the next training waited for it)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def _start(self):
        import ray

        return ray.remote(Scorer).options(**self.options).remote(self.model_config, self.weights, self.device,
                                                                 int(self.options.get("num_cpus", 0)))

    def run(self, jobs: Iterator[tuple[Any, np.ndarray, np.ndarray]]) -> Iterator[tuple[Any, np.ndarray, float]]:
        """(key, inputs, targets) -> (key, summed NLL per window, actor seconds), in the order they finish."""
        import ray
        from ray.exceptions import ObjectLostError, RayActorError

        free, running, again = [a for a in self.actors for _ in range(2)], {}, []
        jobs = iter(jobs)
        while True:
            while free and (job := again.pop() if again else next(jobs, None)) is not None:
                actor = free.pop()
                running[actor.score.remote(job[1], job[2], self.piece_tokens)] = (job, actor)
            if not running:
                return
            [ref], _ = ray.wait(list(running), num_returns=1)
            job, actor = running.pop(ref)
            try:
                totals, seconds = ray.get(ref)
            except (RayActorError, ObjectLostError) as e:
                again.append(job)
                if actor in self.actors:  # said once per scorer: its other batch fails the same way
                    self.actors.remove(actor)
                    free = [a for a in free if a is not actor]
                    to = f"the {len(self.actors)} left"
                    if not self.actors:
                        to = "a new scorer, started once the cluster has room for it"
                        self.actors.append(self._start())
                        free += [self.actors[0]] * 2
                    tqdm.write(f"[eval] a scorer was lost ({type(e).__name__}: its node or its process ended); its "
                               f"batches go to {to}")
                continue
            free.append(actor)
            yield job[0], totals, seconds


def scorer_options(cfg: RunConfig) -> dict[str, Any]:
    """Ray options of a Scorer: what a training worker holds (`train.worker_resources`; one GPU for cuda; one CPU),
    except TPUs: scoring runs in PyTorch on the host (CPU, or a GPU), not through XLA."""
    held = {k: v for k, v in cfg.train.worker_resources.items() if k != "TPU"}
    options: dict[str, Any] = {"num_cpus": held.pop("CPU", 1), "num_gpus": held.pop("GPU", 0)}
    if cfg.train.backend == "cuda" or cfg.eval.device == "cuda":
        options["num_gpus"] = options["num_gpus"] or 1
    if held:
        options["resources"] = held
    return options


def metrics_at_length(nll: np.ndarray, docs: list[dict[str, Any]]) -> dict[str, float]:
    tokens = sum(len(d["tokens"]) for d in docs)
    words = sum(d["n_words"] for d in docs)
    n_bytes = sum(d["n_bytes"] for d in docs)
    total = float(nll.sum())
    return {
        "loss": total / tokens,
        "token_ppl": math.exp(total / tokens),
        "word_ppl": math.exp(total / words) if words else float("nan"),
        "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else float("nan"),
        "tokens": tokens,
        "words": words,
        "bytes": n_bytes,
    }


# ---------------------------------------------------------------------------------------------------
# Models: a checkpoint folder or an MLflow model URI


def load_model(ref: str, tracking: Tracking | None = None) -> LoadedModel:
    """A `gss train` checkpoint folder (local or gs://), or an MLflow model URI (models:/name@alias, /version) of
    the store of `tracking`."""
    if ref.startswith("models:/"):
        import mlflow.pyfunc
        from mlflow.exceptions import MlflowException

        if tracking is None:
            raise ValueError(f"load_model({ref!r}) needs the store the model is registered in: pass tracking=")
        try:
            name, _, number = tracking.resolve_model_uri(ref).removeprefix("models:/").partition("/")
            version = tracking.client.get_model_version(name, number)
        except MlflowException as e:
            raise EvalError(f"no registered model {ref} in {tracking.uri} ({e.message}); "
                            "train it first (`gss train` / `gss run`) or give eval.model=<checkpoint folder>") from None
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}").unwrap_python_model().model
        return LoadedModel(model, f"models:/{name}/{version.version}", version.tags.get(Tag.DATASET, ""),
                           version.tags.get(Tag.TOKENIZER_SHA256, ""), version.run_id or "")

    try:
        state = checkpoint.read(ref)
    except checkpoint.UnreadableCheckpoint as e:
        raise EvalError(f"the checkpoint {ref} is unreadable: {e}; give another one (the training run's "
                        "checkpoints.txt in MLflow lists them) or the registered model") from None
    if state is None:
        raise EvalError(f"{ref} is not a `gss train` checkpoint (no {checkpoint.STATE}); give a checkpoint folder "
                        "(see the MLflow run's checkpoints.txt) or an MLflow model URI")
    model = build_model(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return LoadedModel(model, ref)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EvalError("eval.device=cuda but no CUDA device is visible; use eval.device=cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------------
# The stage


def evaluate(cfg: RunConfig, loaded: LoadedModel, todo: dict[str, list[int]] | None = None) -> list[dict[str, Any]]:
    """Score `loaded` on the config's dataset: {split: [lengths]} (default: the config's suite), on Scorer actors
    (`ClusterScorer`). One row per (split, length)."""
    dataset = dataset_dir(cfg)
    manifest = load_manifest(dataset)
    if loaded.model.cfg.vocab_size != manifest["tokenizer"]["vocab_size"] or (
            loaded.tokenizer_sha256 and loaded.tokenizer_sha256 != manifest["tokenizer"]["sha256"]):
        raise EvalError(f"{loaded.uri} was trained with another tokenizer than {dataset}'s; evaluate it with "
                        "the data config it was trained on")
    ec = cfg.eval
    todo = todo or suite(cfg)
    eod = manifest["tokenizer"]["eod_id"]
    rows, scored, docs = [], {}, {}
    for split, lengths in todo.items():
        if split not in manifest["splits"]:
            raise EvalError(f"split {split!r} is not in {dataset} (it has {', '.join(manifest['splits'])})")
        check_shards(dataset, [split])  # every shard, not only those max_documents reaches: before any scoring
        docs[split] = eval_documents(dataset, split, limit=ec.max_documents or None)
        longest = max(len(d["tokens"]) for d in docs[split])
        kept = [n for n in sorted(lengths) if n <= longest or n == min(lengths)]  # longer: whole documents again
        rows += [{"split": split, "length": n, "capped": True} for n in sorted(lengths) if n not in kept]
        scored.update({(split, n): np.zeros(len(docs[split])) for n in kept})
    seconds = dict.fromkeys(scored, 0.0)
    batches = {key: token_batches([len(d["tokens"]) for d in docs[key[0]]], key[1], ec.batch_tokens) for key in scored}

    def jobs() -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
        for (split, length), todo_batches in batches.items():
            arrays = [d["tokens"] for d in docs[split]]
            for batch in todo_batches:
                yield (split, length, batch), *window_arrays(arrays, eod, batch)

    total = sum(len(d["tokens"]) for split, _ in scored for d in docs[split])
    with ClusterScorer(loaded.model, cfg) as scorers:
        started = time.perf_counter()
        # the bar's rate is the whole cluster's: every actor's results arrive here
        with tqdm(total=total, desc=f"[eval] {len(scorers.actors)} scorer(s)", unit="tok", unit_scale=True,
                  dynamic_ncols=True) as bar:
            for (split, length, batch), totals, busy in scorers.run(jobs()):
                np.add.at(scored[split, length], [d for d, _, _ in batch], totals)
                seconds[split, length] += busy
                bar.update(sum(size for _, _, size in batch))
        wall, actors = time.perf_counter() - started, len(scorers.actors)
    for (split, length), nll in scored.items():
        row = {"split": split, "length": length, "capped": False, "documents": len(docs[split]),
               **metrics_at_length(nll, docs[split]), "seconds": seconds[split, length]}
        row["tokens_per_second"] = row["tokens"] / row["seconds"]  # per actor
        print(f"[eval] {split:<10} L={length:>6}  token ppl {row['token_ppl']:9.3f}  word ppl {row['word_ppl']:9.3f}  "
              f"bits/byte {row['bits_per_byte']:.4f}")
        rows.append(row)
    print(f"[eval] {total:,} tokens in {wall:.1f} s: {total / wall:,.0f} tokens/s over {actors} scorer(s)")
    return sorted(rows, key=lambda r: (list(todo).index(r["split"]), r["length"]))


def plot(rows: list[dict[str, Any]], train_length: int | None, title: str, path: str) -> None:
    """Perplexity against evaluation length, one line per split (and metric), the training length marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for split in sorted({r["split"] for r in rows if not r["capped"]}):
        done = sorted((r for r in rows if r["split"] == split and not r["capped"]), key=lambda r: r["length"])
        lengths = [r["length"] for r in done]
        axes[0].plot(lengths, [r["token_ppl"] for r in done], marker="o", label=split)
        axes[1].plot(lengths, [r["word_ppl"] for r in done], marker="o", label=split)
    for ax, label in zip(axes, ("token perplexity", "word-level perplexity")):
        if train_length:
            ax.axvline(train_length, color="grey", linestyle="--", label=f"training length {train_length}")
        length_axis(ax, label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def length_axis(ax, ylabel: str) -> None:
    """A metric against evaluation length: log2 length axis, labels, legend, light grid."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)


def suite(cfg: RunConfig) -> dict[str, list[int]]:
    """The evaluation suite of a config: {split: lengths}."""
    return {split: list(cfg.eval.lengths) for split in cfg.eval.splits}


def suite_keys(todo: dict[str, list[int]]) -> list[str]:
    return [f"{split}:{length}" for split, lengths in todo.items() for length in lengths]


def eval_stage(cfg: RunConfig, model_ref: str | None = None, todo: dict[str, list[int]] | None = None,
               tracking: Tracking | None = None) -> dict:
    """`evaluate` as an MLflow stage run: metrics per length (step = length), a table, the plot."""
    import mlflow

    from pipeline.storage import filesystem, join, write_bytes_atomic

    tracking = tracking or Tracking.of(cfg)
    loaded = load_model(model_ref or default_model_uri(cfg), tracking)
    dataset = dataset_dir(cfg)
    todo = todo or suite(cfg)
    info = _training_info(loaded, tracking.client)
    print(f"[eval] {loaded.uri} on {dataset}")
    tags = {Tag.MODEL_URI: loaded.uri, Tag.DATASET: dataset, Tag.ARCH: loaded.model.cfg.arch,
            Tag.MAX_DOCUMENTS: str(cfg.eval.max_documents)}
    out_dir = join(cfg.root, "eval", cfg.name)
    with hold_lease(out_dir, "gss eval"), tracking.stage_run(cfg, "eval", tags) as run:
        log_params({"eval": dataclasses.asdict(cfg.eval), "model": dataclasses.asdict(loaded.model.cfg),
                             "model.parameters": loaded.model.num_parameters(), **info["params"]})
        rows = evaluate(cfg, loaded, todo)
        for r in rows:
            if not r["capped"]:
                for key in ("token_ppl", "word_ppl", "bits_per_byte", "loss", "tokens_per_second"):
                    mlflow.log_metric(f"{r['split']}.{key}", r[key], step=r["length"])
        mlflow.log_metrics(info["metrics"])
        mlflow.log_dict({"rows": rows}, "eval/results.json")
        mlflow.log_text(_csv(rows), "eval/results.csv")
        title = f"{cfg.name}: {loaded.model.cfg.arch}, {loaded.model.num_parameters() / 1e6:.1f}M parameters"
        fs, out = filesystem(out_dir)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "ppl_vs_length.png")
            plot(rows, info["train_length"], title, local)
            mlflow.log_artifact(local, "eval")
            with open(local, "rb") as f:  # atomic: a full disk leaves the old file or none, never half of one
                write_bytes_atomic(fs, join(out, "ppl_vs_length.png"), f.read())
        write_bytes_atomic(fs, join(out, "results.json"), json.dumps({"model": loaded.uri, "rows": rows},
                                                                     indent=1).encode())
        # last: what reeval counts as done (a run stopped before this line is not complete)
        mlflow.set_tag(Tag.EVAL_DONE, json.dumps(suite_keys(todo)))
    print(f"[eval] results: {join(out_dir, 'results.json')}, plot: {join(out_dir, 'ppl_vs_length.png')}")
    return {"run_id": run.info.run_id, "rows": rows, "plot": join(out_dir, "ppl_vs_length.png")}


def _training_info(loaded: LoadedModel, client) -> dict[str, Any]:
    """What the comparison table shows about how the model was trained, from its MLflow training run."""
    info: dict[str, Any] = {"params": {}, "metrics": {}, "train_length": None}
    if not loaded.train_run_id:
        return info
    train = client.get_run(loaded.train_run_id)
    info["params"] = {"train.run_id": loaded.train_run_id, "train.preset": train.data.params.get("train.preset", "")}
    metrics = train.data.metrics
    if "tokens_seen" in metrics:
        info["metrics"]["train.tokens"] = metrics["tokens_seen"]
    if "tokens_per_second" in metrics:
        info["metrics"]["train.tokens_per_second"] = metrics["tokens_per_second"]
    if loaded.dataset and is_complete(loaded.dataset):  # the training length, marked on the plot
        info["train_length"] = load_manifest(loaded.dataset)["seq_len"]
    return info


def _csv(rows: list[dict[str, Any]]) -> str:
    keys = ["split", "length", "capped", "documents", "tokens", "words", "bytes", "loss", "token_ppl", "word_ppl",
            "bits_per_byte", "seconds", "tokens_per_second"]
    return "\n".join([",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]) + "\n"


def suite_todo(cfg: RunConfig, model_ref: str, tracking: Tracking | None = None) -> dict[str, list[int]]:
    """The (split, length) pairs of the config's suite that no finished eval run of this model has yet."""
    tracking = tracking or Tracking.of(cfg)
    uri = tracking.resolve_model_uri(model_ref)
    done = set()
    for run in finished_evals(tracking.client, [tracking.experiment_id], model_uri=uri, dataset=dataset_dir(cfg),
                              max_documents=cfg.eval.max_documents):
        done.update(json.loads(run.data.tags.get(Tag.EVAL_DONE, "[]")))
    todo = {split: [n for n in lengths if f"{split}:{n}" not in done] for split, lengths in suite(cfg).items()}
    return {split: lengths for split, lengths in todo.items() if lengths}


# ---------------------------------------------------------------------------------------------------
# During training: Ray Train's validation of checkpoints


def during_training_lengths(cfg: RunConfig, train_length: int) -> list[int]:
    return list(cfg.eval.during_training_lengths) or [n for n in cfg.eval.lengths if n <= 4 * train_length]


def validate_checkpoint(checkpoint_ref, cfg: dict[str, Any], tracking_uri: str, run_id: str) -> dict[str, float]:
    """(Ray Train's validation task, beside the training workers.) Score a training checkpoint on the validation
    split at `during_training_lengths`, with the code `gss eval` runs, and log the perplexities into the training
    run at the checkpoint's step, with a perplexity-against-length plot."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from pipeline.config import from_dict

    run = from_dict(RunConfig, cfg)
    with checkpoint_ref.as_directory() as folder:
        state = checkpoint.load(folder)
    model = build_model(ModelConfig(**state["model_config"])).eval()
    model.load_state_dict(state["model"])
    dataset = dataset_dir(run)
    manifest = load_manifest(dataset)
    docs = eval_documents(dataset, "validation", limit=run.eval.max_documents or None)
    rows, metrics = [], {}
    for length in during_training_lengths(run, manifest["seq_len"]):
        nll = score_documents(model, [d["tokens"] for d in docs], length, manifest["tokenizer"]["eod_id"],
                              run.eval.piece_tokens, run.eval.batch_tokens, torch.device("cpu"))
        rows.append({"split": "validation", "length": length, "capped": False, **metrics_at_length(nll, docs)})
        metrics.update({f"eval/validation/L{length}/{key}": rows[-1][key] for key in ("token_ppl", "word_ppl")})
    client, step, now = MlflowClient(tracking_uri), state["step"], int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"step_{step:07d}.png")
        plot(rows, manifest["seq_len"], f"{run.name}: validation at step {step}", path)
        client.log_artifact(run_id, path, "eval_during_training")
    return metrics
