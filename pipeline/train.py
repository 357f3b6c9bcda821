"""`gss train`: one training loop on Ray Train, for every backend, tracked in MLflow, surviving failures.

The driver (`train_stage`) resolves the model from the dataset's tokenizer, finds or creates the run's
MLflow run (so a restart or a re-run continues the same one), and starts a Ray Train job named after the
run. Ray Train v2 resumes a job of the same name and storage from its latest checkpoint, and restarts a
failed worker group from it (`FailureConfig`). Each worker (`train_loop`) reads its own rows of the
packed shards at a position fixed by the step (`pipeline.data.TrainRows`), so a checkpoint holds the
model, the optimizer, the step (which is also the data position and the schedule's state) and the RNG.
Rank 0 logs metrics to MLflow and prints progress, which Ray streams to the driver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F

from models import PRESETS, ModelConfig, build_model
from pipeline.config import RunConfig, TrainConfig, fingerprint, from_dict, to_dict
from pipeline.prepare import dataset_dir, load_manifest
from pipeline.storage import absolute, filesystem, join, read_json, write_bytes_atomic, write_json_atomic

STATE = "state.pt"
DIVERGED = "diverged.json"


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what is kept."""


def model_config(cfg: RunConfig, vocab_size: int) -> ModelConfig:
    if cfg.train.preset not in PRESETS:
        raise TrainingError(f"train.preset={cfg.train.preset!r} is not one of {', '.join(PRESETS)}")
    try:
        return dataclasses.replace(PRESETS[cfg.train.preset], **{**cfg.train.model, "vocab_size": vocab_size})
    except TypeError as e:
        raise TrainingError(f"train.model: {e}; keys are the fields of models.ModelConfig") from None


def batch_layout(tc: TrainConfig, seq_len: int) -> tuple[int, int]:
    """(rows per optimizer step over all workers, micro-batches per worker per step)."""
    rows = tc.global_batch_tokens // seq_len
    per_pass = tc.num_workers * tc.micro_batch
    if rows < per_pass or rows % per_pass:
        raise TrainingError(
            f"train.global_batch_tokens={tc.global_batch_tokens} is {rows} rows of {seq_len}; it must be a multiple "
            f"of num_workers × micro_batch = {per_pass} rows ({per_pass * seq_len} tokens)"
        )
    return rows, rows // per_pass


def learning_rate(step: int, tc: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to lr × min_lr_ratio at the last step."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms, biases, the SSM's Λ, C, D) do not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas))


def lm_loss(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    logits = model(rows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten())


# ---------------------------------------------------------------------------------------------------
# Checkpoints: one file, written to a fresh folder that Ray Train persists and registers only when complete


def save_state(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
               model_config: dict[str, Any]) -> None:
    """The checkpoint: everything to resume, and the model config so that `gss eval` can load it alone."""
    state = {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "rng": torch.get_rng_state(), "model_config": model_config}
    tmp = os.path.join(folder, STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(folder, STATE))


def load_state(folder: str) -> dict[str, Any]:
    return torch.load(os.path.join(folder, STATE), map_location="cpu", weights_only=True)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


# ---------------------------------------------------------------------------------------------------
# The worker


def train_loop(payload: dict[str, Any]) -> None:
    import ray.train

    from pipeline.backends import make_backend
    from pipeline.data import TrainRows, eval_windows

    cfg = from_dict(RunConfig, payload["cfg"])
    tc = cfg.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    backend = make_backend(tc)
    torch.manual_seed(tc.seed)
    model = build_model(ModelConfig(**payload["model"])).to(backend.device)
    optimizer = make_optimizer(model, tc)

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_state(folder)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step = state["step"]
        if rank == 0:
            print(f"resumed from {checkpoint.path} at step {step}", flush=True)
    model = backend.wrap(model, tc)

    rows = TrainRows(payload["dataset"], seed=tc.seed)
    step_rows, accumulation = batch_layout(tc, rows.seq_len)
    validation = torch.from_numpy(eval_windows(payload["dataset"], "validation", rows.seq_len, tc.eval_windows))
    tracker = _RankZeroLog(payload) if rank == 0 else None
    _write_pid(payload, rank)

    if backend.name == "xla":
        backend.clear_metrics()  # count host fallbacks of the training steps only
    interval_start, interval_steps = time.perf_counter(), 0
    while step < tc.steps:
        lr = learning_rate(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = []
        for micro in range(accumulation):
            position = step * step_rows + (rank * accumulation + micro) * tc.micro_batch
            batch = backend.to_device(torch.from_numpy(rows.rows(position, tc.micro_batch)))
            sync = micro == accumulation - 1
            with backend.autocast(), (backend.no_sync(model) if not sync else contextlib.nullcontext()):
                loss = lm_loss(model, batch)
                (loss / accumulation).backward()
            losses.append(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        backend.step_done()
        step, interval_steps = step + 1, interval_steps + 1

        last = step == tc.steps
        if not (last or step % tc.log_every == 0 or step % tc.eval_every == 0 or step % tc.checkpoint_every == 0):
            continue  # values stay on the device between reports: no host sync per step (XLA, CUDA)
        summary = backend.all_reduce_mean(torch.stack([torch.stack(losses).mean(), grad_norm.to(torch.float32)]))
        loss_value, norm_value = summary.detach().cpu().tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):  # the same on every rank
            if rank == 0:  # Ray Train keeps only checkpointed metrics, so tell the driver through storage
                fs, path = filesystem(join(payload["run_dir"], DIVERGED))
                write_json_atomic(fs, path, {"step": step, "loss": loss_value, "grad_norm": norm_value})
            return
        seconds = (time.perf_counter() - interval_start) / interval_steps
        metrics = {"loss": loss_value, "ppl": math.exp(min(loss_value, 50)), "lr": lr, "grad_norm": norm_value,
                   "step_time": seconds, "tokens_per_second": step_rows * (rows.seq_len - 1) / seconds,
                   "peak_memory_mb": backend.peak_memory_bytes() / 2**20,
                   "tokens_seen": step * step_rows * rows.seq_len}
        if step % tc.eval_every == 0 or last:
            metrics["val_loss"] = _validate(model, backend, validation, rank, world, tc.micro_batch)
            metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50))
        if tracker:
            tracker.log(step, metrics)
        if step % tc.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as folder:
                if rank == 0:
                    save_state(folder, model, optimizer, step, payload["model"])
                ray.train.report({"step": step, **metrics},
                                 checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None)
        interval_start, interval_steps = time.perf_counter(), 0
    if tracker and backend.name == "xla":  # ops that fell back to the host CPU: each one is slow on a TPU
        tracker.client.set_tag(tracker.run_id, "gss.xla_fallbacks", json.dumps(backend.fallback_ops()))


@torch.no_grad()
def _validate(model, backend, windows: torch.Tensor, rank: int, world: int, micro_batch: int) -> float:
    model.eval()
    mine = windows[rank::world] if backend.name != "xla" else windows
    total = torch.zeros((), device=backend.device)
    for i in range(0, len(mine), micro_batch):
        with backend.autocast():
            total += lm_loss(model, backend.to_device(mine[i: i + micro_batch])) * len(mine[i: i + micro_batch])
    model.train()
    return backend.all_reduce_mean(total / max(1, len(mine))).cpu().item()  # .cpu(): a transfer, not a fallback


class _RankZeroLog:
    """Rank 0's MLflow metrics (to the run the driver made) and a progress line on the driver's terminal."""

    def __init__(self, payload: dict):
        from mlflow import MlflowClient

        self.client = MlflowClient(payload["tracking_uri"])
        self.run_id = payload["run_id"]
        self.steps = payload["steps"]

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        left = (self.steps - step) * metrics["step_time"]
        val = f" val {metrics['val_loss']:.3f}" if "val_loss" in metrics else ""
        # to the process's own stdout, which Ray streams to the driver: Ray Train v2 patches print() and,
        # once a library has wrapped sys.stdout, tees it to both, so every line showed up twice
        print(f"step {step}/{self.steps} loss {metrics['loss']:.3f}{val} lr {metrics['lr']:.2e} "
              f"{metrics['tokens_per_second']:,.0f} tok/s, {left / 60:.1f} min left", file=sys.__stdout__, flush=True)


def _write_pid(payload: dict, rank: int) -> None:
    """Worker pids, for operators (and the fault test) to find a worker process; run_dir may be gs://."""
    fs, path = filesystem(join(payload["run_dir"], "workers", f"rank-{rank}.pid"))
    write_bytes_atomic(fs, path, str(os.getpid()).encode())


# ---------------------------------------------------------------------------------------------------
# The driver


def train_stage(cfg: RunConfig) -> dict[str, Any]:
    """Train (or resume, or skip if finished) the run `cfg.name`; returns {run_id, checkpoint, model_uri, ...}."""
    import mlflow
    import ray.train
    from mlflow import MlflowClient
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline import tracking
    from pipeline.cluster import connect

    dataset = dataset_dir(cfg)
    manifest = load_manifest(dataset)  # a clear error if `gss prepare` has not completed
    model_cfg = model_config(cfg, manifest["tokenizer"]["vocab_size"])
    batch_layout(cfg.train, manifest["seq_len"])  # fail on a bad batch layout before starting anything
    tc = cfg.train

    experiment_id = tracking.setup(cfg)  # also fails fast on an unreachable tracking server
    client = MlflowClient()
    run = _find_or_create_run(client, experiment_id, cfg, model_cfg, dataset)
    if run.info.status == "FINISHED":
        print(f"training run {cfg.name} already finished (MLflow run {run.info.run_id}); nothing to do")
        return {"run_id": run.info.run_id, **{k.removeprefix("gss."): v for k, v in run.data.tags.items()
                                               if k in ("gss.checkpoint", "gss.model_uri")}, "skipped": True}

    storage = absolute(join(cfg.root, "train"))
    run_dir = join(storage, cfg.name)
    payload = {"cfg": to_dict(cfg), "model": dataclasses.asdict(model_cfg), "dataset": dataset,
               "tracking_uri": mlflow.get_tracking_uri(), "run_id": run.info.run_id, "steps": tc.steps,
               "run_dir": run_dir}
    connect(cfg.ray)
    scaling = ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.backend == "cuda",
                                      resources_per_worker=tc.worker_resources or None)
    run_config = ray.train.RunConfig(
        name=cfg.name, storage_path=storage,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
        failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
    )
    if tc.backend == "xla":
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

        from pipeline.backends import xla_backend_config

        trainer = DataParallelTrainer(train_loop, train_loop_config=payload, backend_config=xla_backend_config(),
                                      scaling_config=scaling, run_config=run_config)
    else:
        trainer = TorchTrainer(train_loop, train_loop_config=payload, scaling_config=scaling, run_config=run_config,
                               torch_config=TorchConfig(backend="nccl" if tc.backend == "cuda" else "gloo"))
    fs, diverged = filesystem(join(run_dir, DIVERGED))
    if fs.exists(diverged):
        fs.rm(diverged)
    try:
        result = trainer.fit()
    except Exception as e:
        client.set_terminated(run.info.run_id, "FAILED")
        raise TrainingError(f"training failed after {tc.max_failures} restarts: {e}") from e

    if fs.exists(diverged):
        client.set_terminated(run.info.run_id, "FAILED")
        kept = result.checkpoint.path if result.checkpoint else "none yet"
        raise TrainingError(
            f"the loss became NaN/inf at step {read_json(fs, diverged)['step']}; the last good checkpoint is kept "
            f"({kept}). Lower train.lr or raise train.warmup_steps, then re-run the same run name to resume."
        )
    checkpoint = result.checkpoint
    model_uri = _log_model(client, run.info.run_id, checkpoint, model_cfg, registered_name(cfg),
                           {"gss.dataset": dataset, "gss.tokenizer_sha256": manifest["tokenizer"]["sha256"],
                            "gss.run_name": cfg.name})
    client.set_tag(run.info.run_id, "gss.checkpoint", checkpoint.path)
    client.log_text(run.info.run_id, "\n".join(c.path for c, _ in result.best_checkpoints), "checkpoints.txt")
    client.set_terminated(run.info.run_id, "FINISHED")
    return {"run_id": run.info.run_id, "checkpoint": checkpoint.path, "model_uri": model_uri,
            "metrics": result.metrics, "skipped": False}


def _find_or_create_run(client, experiment_id: str, cfg: RunConfig, model_cfg: ModelConfig, dataset: str):
    """The MLflow run of this training run name: the same one across restarts and re-runs."""
    import mlflow

    from pipeline import tracking

    identity = fingerprint({"model": dataclasses.asdict(model_cfg), "dataset": dataset})
    found = client.search_runs([experiment_id], f"tags.`gss.train_name` = '{cfg.name}'", max_results=1)
    if found:
        run = found[0]
        if run.data.tags.get("gss.model_data") != identity:  # resuming it would mix two experiments
            raise TrainingError(
                f"training run {cfg.name!r} already exists (MLflow run {run.info.run_id}) with another model "
                "config or dataset; give this one a new name (name=...) or delete that run")
        if run.info.status != "FINISHED":
            client.update_run(run.info.run_id, status="RUNNING")
        return run
    tags = {"gss.stage": "train", "gss.train_name": cfg.name, "gss.run_name": cfg.name, "gss.dataset": dataset,
            "gss.arch": model_cfg.arch, "gss.model_data": identity}
    parent = mlflow.active_run()
    if parent is not None:
        tags["mlflow.parentRunId"] = parent.info.run_id
    run = client.create_run(experiment_id, run_name=f"{cfg.name}/train", tags=tags)
    with torch.device("meta"):
        params = build_model(model_cfg).num_parameters()
    flat = tracking.flatten({"train": to_dict(cfg.train), "model": dataclasses.asdict(model_cfg)})
    flat.update({"model.parameters": params, "dataset": dataset})
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()])
    return client.get_run(run.info.run_id)


def registered_name(cfg: RunConfig) -> str:
    return cfg.train.register_as or f"gss-{cfg.name}"


def _log_model(client, run_id: str, checkpoint, model_cfg: ModelConfig, name: str, tags: dict[str, str]) -> str:
    """Log the final model to the run and register it, with the alias `current` (`latest` is reserved)."""
    import mlflow.pytorch

    model = build_model(model_cfg)
    with checkpoint.as_directory() as folder:
        model.load_state_dict(load_state(folder)["model"])
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        # pickle (the class comes from this package's `models`), not pt2, which needs a traced input
        info = mlflow.pytorch.log_model(model.eval(), name="model", registered_model_name=name,
                                        serialization_format="pickle", pip_requirements=["torch"])
        mlflow.log_dict(dataclasses.asdict(model_cfg), "model_config.json")
    version = info.registered_model_version
    for key, value in tags.items():  # what `gss eval` and `gss reeval` need to know about the version
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, "current", version)
    client.set_tag(run_id, "gss.model_uri", f"models:/{name}@current")
    print(f"registered {name} version {version} (models:/{name}@current)")
    return f"models:/{name}/{version}"
