"""`gss train`: one training loop on Ray Train, for every backend, tracked in MLflow, surviving failures.

The driver (`train_stage`) resolves the model from the dataset's tokenizer, finds or creates the run's
MLflow run (so a restart or a re-run continues the same one), and starts a Ray Train job named after the
run. Ray Train v2 resumes a job of the same name and storage from its latest checkpoint, and restarts a
failed worker group from it (`FailureConfig`). Each worker (`train_loop`) reads its own rows of the
packed shards at a position fixed by the step (`pipeline.dataset.TrainRows`), so a checkpoint holds the
model, the optimizer, the step (which is also the data position and the schedule's state) and the RNG.
Rank 0 logs metrics to MLflow; the driver draws its progress bar from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from models import ModelConfig, build_model
from pipeline import checkpoint
from pipeline.backends import Backend, inductor_cache_dir, xla_cache_dir
from pipeline.config import (
    ConfigError,
    RunConfig,
    TrainConfig,
    batch_layout,
    compiles,
    fingerprint,
    from_dict,
    model_config,
    to_dict,
)
from pipeline.dataset import (
    TOKENIZER,
    TrainRows,
    check_shards,
    dataset_dir,
    eval_windows,
    load_manifest,
    read_tokenizer_file,
)
from pipeline.lease import hold_lease
from pipeline.logs import printed_to_log
from pipeline.progress import TrainingProgress, say
from pipeline.storage import (
    NO_ROOM,
    absolute,
    filesystem,
    join,
    local_free_bytes,
    ray_checkpoint_url,
    ray_storage,
    read_json,
    storage_failure,
    write_bytes_atomic,
    write_json_atomic,
)
from pipeline.tokenizer import Tokenizer
from pipeline.tracking import (
    ALIAS,
    BackgroundLogger,
    Tag,
    Tracking,
    find_or_create_run,
    log_dataset_input,
    param_values,
    registered_name,
)

# Rank 0's word to the driver, in the run folder: Ray Train hands the driver only what was reported with a checkpoint,
# and these come without one. {"diverged": {step, loss, grad_norm}, "metrics_lost": the line saying which}; written
# by `tell_driver`, read once by the driver after the workers are done (`_told`).
TOLD = "told_driver.json"


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what is kept."""


def learning_rate(step: int, tc: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to lr × min_lr_ratio at the last step."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def no_weight_decay(model: torch.nn.Module) -> set[str]:
    """Names of the parameters AdamW leaves undecayed: vectors (norms, biases) and parameters marked
    `_no_weight_decay` (the SSM's Λ, C and D, as in Mamba and the official DSS code). Read it before
    `Backend.wrap`: fully_shard replaces the Parameters, marks and all; the names stay."""
    return {name for name, p in checkpoint.unwrap(model).named_parameters()
            if p.dim() < 2 or getattr(p, "_no_weight_decay", False)}


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, undecayed: set[str]) -> torch.optim.AdamW:
    """AdamW over the model's parameters as they are now (after `Backend.wrap`); `undecayed` from `no_weight_decay`."""
    decay, no_decay = [], []
    for name, p in checkpoint.unwrap(model).named_parameters():
        (no_decay if name in undecayed else decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas))


# ---------------------------------------------------------------------------------------------------
# The worker


class Diverged(Exception):
    """The loss or the gradient norm is NaN/inf: the same verdict on every rank (they are all-reduced)."""


class StepBatches:
    """The micro-batches one worker trains on at each optimizer step, at data positions fixed by the step."""

    def __init__(self, dataset: str, tc: TrainConfig, rank: int, backend: Backend):
        self.rows = TrainRows(dataset, seed=tc.seed)
        self.seq_len = self.rows.seq_len
        self.step_rows, self.accumulation = batch_layout(tc, self.seq_len)
        self.micro_batch, self.rank, self.backend = tc.micro_batch, rank, backend

    def host_rows(self, step: int) -> Iterator[np.ndarray]:
        """This worker's rows of each micro-batch of `step`. Over the workers and micro-batches they are rows
        [step × step_rows, (step + 1) × step_rows) of the seeded order, whatever the number of workers; with
        SPMD over several hosts, micro-batch m of the global batch is every host's m-th part, in rank order."""
        for micro in range(self.accumulation):
            position = step * self.step_rows + (self.rank * self.accumulation + micro) * self.micro_batch
            yield self.rows.rows(position, self.micro_batch)

    def __call__(self, step: int) -> Iterator[torch.Tensor]:
        for rows in self.host_rows(step):
            yield self.backend.to_device(torch.from_numpy(rows))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, backend: Backend,
               micro_batches: Iterator[torch.Tensor], accumulation: int, lr: float, grad_clip: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `accumulation` micro-batches; returns (mean loss, gradient norm), on the device."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    losses = []
    for micro, rows in enumerate(micro_batches):
        sync = micro == accumulation - 1  # DDP all-reduces the gradients on the last micro-batch only
        with backend.autocast(), (contextlib.nullcontext() if sync else backend.no_sync(model)):
            _, loss = model(rows[:, :-1], rows[:, 1:])
            (loss / accumulation).backward()
        losses.append(loss.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if isinstance(grad_norm, DTensor):  # FSDP2: the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = torch.stack(losses).mean()  # before step_done: in the step's XLA graph, not one of its own
    backend.step_done()
    return loss, grad_norm


class Validator:
    """Validation loss on `eval_windows` windows of the validation split, every `eval_every` steps and at the last."""

    def __init__(self, dataset: str, tc: TrainConfig, backend: Backend, rank: int, world: int, seq_len: int):
        windows = torch.from_numpy(eval_windows(dataset, "validation", seq_len, tc.eval_windows))
        # whole micro-batches on every worker: one shape (one XLA graph), and each rank's mean weighs the same
        usable = len(windows) // (world * tc.micro_batch) * (world * tc.micro_batch)
        if not usable:
            raise TrainingError(f"the validation split has {len(windows)} windows of {seq_len} tokens, fewer than "
                                f"num_workers × micro_batch = {world * tc.micro_batch}; lower train.micro_batch")
        self.windows = windows[:usable][rank::world]  # this worker's share
        self.every, self.last_step, self.micro_batch, self.backend = tc.eval_every, tc.steps, tc.micro_batch, backend

    def should_run(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last_step

    @torch.no_grad()
    def validate(self, model: torch.nn.Module) -> torch.Tensor:
        model.eval()
        total = torch.zeros((), device=self.backend.device)
        for i in range(0, len(self.windows), self.micro_batch):
            rows = self.backend.to_device(self.windows[i: i + self.micro_batch])
            with self.backend.autocast():
                total += model(rows[:, :-1], rows[:, 1:])[1] * len(rows)
        model.train()
        return total / max(1, len(self.windows))


class SystemMetrics:
    """Rank 0's host, sampled by MLflow's own monitors at every metrics log: CPU and memory use, and GPU use and
    memory where NVML sees GPUs (`pip install '.[gpu]'`), as system/* metrics at the training step."""

    def __init__(self):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        self.monitors = [CPUMonitor()]
        try:
            self.monitors.append(GPUMonitor())
        except Exception:  # noqa: BLE001 - no NVML library, or no GPU: CPU and memory only
            pass

    def sample(self) -> dict[str, float]:
        values = {}
        for monitor in self.monitors:
            monitor.collect_metrics()
            values.update({f"system/{k}": v for k, v in monitor.aggregate_metrics().items()})
            monitor.clear_metrics()
        return values


class MetricsLogger:
    """Every `log_every` steps (and whenever validation or a checkpoint needs them): the loss and gradient norm
    averaged over the workers, brought to the host (the only host sync of the loop), checked, and logged to
    the MLflow run by rank 0 (`mlflow_run`: its tracking URI and run id; None on the other ranks) from a thread
    that keeps them while the tracking server is down (tracking.BackgroundLogger)."""

    def __init__(self, tc: TrainConfig, backend: Backend, tokens_per_step: int, start_step: int,
                 mlflow_run: tuple[str, str] | None):
        self.every, self.last_step = tc.log_every, tc.steps
        self.backend, self.tokens_per_step = backend, tokens_per_step
        self.sender, self.system = None, None
        if mlflow_run:
            self.sender, self.system = BackgroundLogger(*mlflow_run, say=say), SystemMetrics()
        self.interval_start, self.interval_first_step = time.perf_counter(), start_step

    def should_log(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last_step

    def log(self, step: int, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor,
            val_loss: torch.Tensor | None) -> dict[str, float]:
        """The metrics of `step` (raises Diverged on NaN/inf), logged by rank 0."""
        values = [loss, grad_norm.to(torch.float32)] + ([val_loss] if val_loss is not None else [])
        summary = self.backend.all_reduce_mean(torch.stack(values)).detach().cpu().tolist()
        if not all(map(math.isfinite, summary[:2])):
            raise Diverged({"step": step, "loss": summary[0], "grad_norm": summary[1]})
        seconds = (time.perf_counter() - self.interval_start) / (step - self.interval_first_step)
        self.interval_start, self.interval_first_step = time.perf_counter(), step
        metrics = {"loss": summary[0], "ppl": math.exp(min(summary[0], 50)), "lr": lr, "grad_norm": summary[1],
                   "step_time": seconds, "tokens_per_second": self.tokens_per_step / seconds,
                   "peak_memory_mb": self.backend.peak_memory_bytes() / 2**20,
                   "tokens_seen": step * self.tokens_per_step}
        if val_loss is not None:
            metrics.update(val_loss=summary[2], val_ppl=math.exp(min(summary[2], 50)))
        metrics.update(self.backend.compile_counts())
        if self.system:
            metrics.update(self.system.sample())
        self._log(step, metrics)
        return metrics

    def resumed(self, step: int) -> None:
        """Mark a restart from the checkpoint at `step` (the driver prints it)."""
        self._log(step, {"resumed_at_step": step})

    def notice(self, line: str) -> None:
        """A line for the user: the driver prints it (workers' own output stays in Ray's logs)."""
        say(line)
        if self.sender:
            self.sender.set_tag(f"{Tag.NOTICE}{time.time_ns()}", line)

    def compiled(self, step: int) -> None:
        """After this worker's first step, which compiled the model (torch.compile and XLA are lazy): the compile
        counts at once, not at the next report (the driver prints torch.compile's time)."""
        counts = self.backend.compile_counts() if self.sender else {}
        if counts:
            self._log(step, counts)

    def finish(self, fallback_ops: dict[str, int] | None) -> None:
        if self.sender and fallback_ops is not None:  # ops that fell back to the host CPU: each one is slow on a TPU
            self.sender.set_tag(Tag.XLA_FALLBACKS, json.dumps(fallback_ops))

    def close(self, run_dir: str) -> None:
        """Send what the tracking server has not taken yet (waiting for it as long as MLflow's own retries do);
        what it never took is said, and told to the driver to print."""
        lost = self.sender.close() if self.sender else None
        if lost:
            say(lost)
            tell_driver(run_dir, metrics_lost=lost)

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        if self.sender:
            self.sender.log(step, metrics)


def tell_driver(run_dir: str, **news: Any) -> None:
    """(Rank 0.) Add `news` to what the driver reads once the workers are done (TOLD)."""
    fs, path = filesystem(join(run_dir, TOLD))
    write_json_atomic(fs, path, {**(read_json(fs, path) if fs.exists(path) else {}), **news})


def _told(run_dir: str) -> dict[str, Any]:
    """(The driver.) What rank 0 told it (TOLD), once: the file goes."""
    fs, path = filesystem(join(run_dir, TOLD))
    if not fs.exists(path):
        return {}
    told = read_json(fs, path)
    fs.rm(path)
    return told


def train_loop(payload: dict[str, Any]) -> None:
    """One Ray Train worker: restore, then train to the last step. The metrics logger, the validator and the
    checkpointer each decide at which steps they act."""
    import ray.train

    from pipeline.backends import make_backend

    tc = from_dict(RunConfig, payload["cfg"]).train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    backend = make_backend(tc, payload["xla_cache"], payload["inductor_cache"])
    torch.manual_seed(tc.seed)
    model = build_model(ModelConfig(**payload["model"])).to(backend.device)
    undecayed = no_weight_decay(model)
    model = backend.wrap(model, tc)
    optimizer = make_optimizer(model, tc, undecayed)
    checkpointer = checkpoint.Checkpointer(tc.checkpoint_every, tc.steps, rank, payload["model"], payload["run_dir"],
                                           minutes=tc.checkpoint_minutes, validate_every=payload["validate_every"])
    step = checkpointer.restore(model, optimizer)
    batches = StepBatches(payload["dataset"], tc, rank, backend)
    validator = Validator(payload["dataset"], tc, backend, rank, world, batches.seq_len)
    metrics = MetricsLogger(tc, backend, batches.step_rows * batches.seq_len, step,
                            (payload["tracking_uri"], payload["run_id"]) if rank == 0 else None)
    for line in checkpointer.skipped:
        metrics.notice(line)
    if step:
        metrics.resumed(step)
    first_step = step
    _write_pid(payload, rank)
    backend.clear_fallback_counts()  # count host fallbacks of the training steps only

    try:
        while step < tc.steps:
            lr = learning_rate(step, tc)
            loss, grad_norm = train_step(model, optimizer, backend, batches(step), batches.accumulation, lr,
                                         tc.grad_clip)
            step += 1
            if step == first_step + 1:
                metrics.compiled(step)
            save = checkpointer.should_save(step)  # once per step on every rank: ranks must agree
            if not (save or metrics.should_log(step) or validator.should_run(step)):
                continue  # values stay on the device between reports: no host sync per step (XLA, CUDA)
            val_loss = validator.validate(model) if validator.should_run(step) else None
            logged = metrics.log(step, lr, loss, grad_norm, val_loss)
            if save and not checkpointer.save(step, model, optimizer, logged):
                metrics.notice(f"no room for the checkpoint of step {step}: {checkpointer.no_room}; training stops")
                break  # every rank: the driver says what to do
    except Diverged as e:
        if rank == 0:
            tell_driver(payload["run_dir"], diverged=e.args[0])
    else:
        metrics.finish(backend.fallback_ops())
    finally:
        metrics.close(payload["run_dir"])


def _write_pid(payload: dict, rank: int) -> None:
    """Worker pids, for operators (and the fault test) to find a worker process; run_dir may be gs://."""
    fs, path = filesystem(join(payload["run_dir"], "workers", f"rank-{rank}.pid"))
    write_bytes_atomic(fs, path, str(os.getpid()).encode())


# ---------------------------------------------------------------------------------------------------
# The driver


def run_folder(cfg: RunConfig) -> str:
    """The training run's folder: Ray Train's storage of the run, its checkpoints, and its lease."""
    return join(absolute(join(cfg.root, "train")), cfg.name)


def train_stage(cfg: RunConfig, tracking: Tracking | None = None) -> dict[str, Any]:
    """Train (or resume, or skip if finished) the run `cfg.name`; returns {run_id, checkpoint, model_uri, ...}.
    One driver at a time: it holds the run folder's lease (`pipeline.lease`) before the MLflow run or a checkpoint
    is written, and Ray Train's restarts of the worker group happen inside it."""
    with hold_lease(run_folder(cfg), "gss train"):
        return _train_stage(cfg, tracking)


def _train_stage(cfg: RunConfig, tracking: Tracking | None) -> dict[str, Any]:
    dataset = dataset_dir(cfg)
    manifest = load_manifest(dataset)  # a clear error if `gss prepare` has not completed
    model_cfg = model_config(cfg, manifest["tokenizer"]["vocab_size"])
    step_rows, _ = batch_layout(cfg.train, manifest["seq_len"])
    tc = cfg.train
    scaling_config(tc)  # Ray's checks of the resources asked for, before any MLflow run is made

    tracking = tracking or Tracking.of(cfg)  # also fails fast on an unreachable tracking server
    # what the workers read: every byte once, before any starts (and after the cheap checks above)
    check_shards(dataset, ["train", "validation"])
    client = tracking.client
    run = _training_run(tracking, cfg, model_cfg, dataset)
    if run.info.status == "FINISHED":
        print(f"[train] skipped: {cfg.name} already finished (MLflow run {run.info.run_id})")
        tags = run.data.tags
        return {"run_id": run.info.run_id, "checkpoint": tags.get(Tag.CHECKPOINT),
                "model_uri": tags.get(Tag.MODEL_URI), "skipped": True}

    run_dir = run_folder(cfg)
    payload = {"cfg": to_dict(cfg), "model": dataclasses.asdict(model_cfg), "dataset": dataset,
               "tracking_uri": tracking.uri, "run_id": run.info.run_id, "run_dir": run_dir,
               "xla_cache": xla_cache_dir(cfg.root), "inductor_cache": inductor_cache_dir(cfg.root),
               "validate_every": cfg.eval.during_training}
    trainer = _trainer(cfg, payload)
    _told(run_dir)  # an earlier driver's, unread
    print(f"[train] {cfg.name}: {model_cfg.arch}, {tc.num_workers} {tc.backend} worker(s), {tc.steps} steps")
    finishing = "saving the final checkpoint"
    if cfg.eval.during_training:
        from pipeline.evaluate import during_training_lengths

        lengths = ", ".join(str(n) for n in during_training_lengths(cfg, manifest["seq_len"]))
        finishing = f"saving the final checkpoint and scoring it at {lengths} (validation split)"
    try:
        with TrainingProgress(payload["tracking_uri"], run.info.run_id, tc.steps, step_rows * manifest["seq_len"],
                              finishing, compiled=compiles(tc), need=trainer.scaling_config.total_resources):
            result = trainer.fit()
    except Exception as e:
        with contextlib.suppress(Exception):  # its store may be on the disk that filled: the error to say is `e`
            client.set_terminated(run.info.run_id, "FAILED")
        if storage_failure(e) is not None:  # the storage itself is gone, not the training: `gss` says what to do
            raise
        raise TrainingError(f"training failed after {tc.max_failures} restarts: {e}") from e

    told = _told(run_dir)
    if "metrics_lost" in told:
        print(f"[train] {told['metrics_lost']}")
    fs = filesystem(run_dir)[0]
    if "diverged" in told:
        client.set_terminated(run.info.run_id, "FAILED")
        kept = ray_checkpoint_url(result.checkpoint, fs) if result.checkpoint else "none yet"
        raise TrainingError(
            f"the loss became NaN/inf at step {told['diverged']['step']}; the last good checkpoint is kept "
            f"({kept}). Lower train.lr or raise train.warmup_steps, then re-run the same run name to resume."
        )
    final = result.checkpoint
    if (result.metrics or {}).get("step") != tc.steps:  # the workers stopped early: no room for a checkpoint
        with contextlib.suppress(Exception):  # its store may be on the disk that filled
            client.set_terminated(run.info.run_id, "FAILED")
        free = local_free_bytes(run_dir)
        where = f"the disk holding {run_dir} has {free / 2**20:,.1f} MB free" if free is not None else run_dir
        if final:
            where += f"; a checkpoint takes {fs.du(final.path) / 2**20:,.1f} MB"
        kept = f"The checkpoint of step {result.metrics['step']} is kept" if final else "No checkpoint was written"
        raise TrainingError(f"training stopped: {NO_ROOM} ({where}). {kept}: free space, then "
                            "run the same command again to go on from there")
    print(f"[train] registering the final model as {registered_name(cfg)} in MLflow")
    model_uri = _register_model(client, run.info.run_id, final, model_cfg, dataset, registered_name(cfg),
                                {Tag.DATASET: dataset, Tag.TOKENIZER_SHA256: manifest["tokenizer"]["sha256"],
                                 Tag.RUN_NAME: cfg.name})
    final_url = ray_checkpoint_url(final, fs)
    client.set_tag(run.info.run_id, Tag.CHECKPOINT, final_url)
    client.log_text(run.info.run_id, "\n".join(ray_checkpoint_url(c, fs) for c, _ in result.best_checkpoints),
                    "checkpoints.txt")
    client.set_terminated(run.info.run_id, "FINISHED")
    return {"run_id": run.info.run_id, "checkpoint": final_url, "model_uri": model_uri,
            "metrics": result.metrics, "skipped": False}


def scaling_config(tc: TrainConfig):
    """Ray Train's resources for `train.*`. Workers that hold TPUs reserve a whole slice (`use_tpu`, `topology`,
    `accelerator_type`: Ray finds the slice's hosts by their node labels and puts one worker on each); cuda
    workers hold a GPU each; the rest, CPUs (the XLA lane runs torch_xla on CPU this way)."""
    import ray.train

    try:
        return ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.backend == "cuda", use_tpu=tc.worker_resources.get("TPU", 0) > 0,
            topology=tc.topology or None, accelerator_type=tc.accelerator_type or None,
            resources_per_worker=tc.worker_resources or None)
    except ValueError as e:  # Ray's own checks of a TPU slice request
        raise ConfigError(f"train.worker_resources / topology / accelerator_type: {e}") from None


def _trainer(cfg: RunConfig, payload: dict[str, Any]):
    """The Ray Train trainer for `train.backend`, named after the run so that a restart resumes it."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.cluster import connect

    tc = cfg.train
    scaling = scaling_config(tc)
    connect(cfg.ray)
    storage_path, storage_filesystem = ray_storage(absolute(join(cfg.root, "train")))
    run_config = ray.train.RunConfig(
        name=cfg.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
        failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
    )
    validation = None
    if cfg.eval.during_training:  # Ray Train runs these tasks beside the workers, one checkpoint at a time
        from ray.train.v2.api.validation_config import ValidationConfig, ValidationTaskConfig

        from pipeline.evaluate import validate_checkpoint

        validation = ValidationConfig(validate_checkpoint, ValidationTaskConfig(
            {"cfg": to_dict(cfg), "tracking_uri": payload["tracking_uri"], "run_id": payload["run_id"]}),
            ray_remote_kwargs={"num_cpus": 1})
    if tc.backend == "xla":  # not TorchTrainer: on TPU workers it would set up torch_tpu, not torch_xla
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

        from pipeline.backends import xla_backend_config

        return DataParallelTrainer(train_loop, train_loop_config=payload, backend_config=xla_backend_config(),
                                   scaling_config=scaling, run_config=run_config, validation_config=validation)
    return TorchTrainer(train_loop, train_loop_config=payload, scaling_config=scaling, run_config=run_config,
                        torch_config=TorchConfig(backend="nccl" if tc.backend == "cuda" else "gloo"),
                        validation_config=validation)


def _training_run(tracking: Tracking, cfg: RunConfig, model_cfg: ModelConfig, dataset: str):
    """The MLflow run of this training run name: the same one across restarts and re-runs."""
    import mlflow
    from mlflow.entities import Param

    identity = fingerprint({"model": dataclasses.asdict(model_cfg), "dataset": dataset})
    tags = {Tag.STAGE: "train", Tag.TRAIN_NAME: cfg.name, Tag.RUN_NAME: cfg.name, Tag.DATASET: dataset,
            Tag.ARCH: model_cfg.arch, Tag.MODEL_DATA: identity}
    parent = mlflow.active_run()
    if parent is not None:
        tags[Tag.PARENT_RUN] = parent.info.run_id
    client = tracking.client
    run, created = find_or_create_run(client, tracking.experiment_id, Tag.TRAIN_NAME, f"{cfg.name}/train", tags)
    if not created:
        if run.data.tags.get(Tag.MODEL_DATA) != identity:  # resuming it would mix two experiments
            raise TrainingError(
                f"training run {cfg.name!r} already exists (MLflow run {run.info.run_id}) with another model "
                "config or dataset; give this one a new name (name=...) or delete that run")
        if run.info.status != "FINISHED":
            client.update_run(run.info.run_id, status="RUNNING")
        return run
    with torch.device("meta"):
        params = build_model(model_cfg).num_parameters()
    values = param_values({"train": to_dict(cfg.train), "model": dataclasses.asdict(model_cfg),
                           "model.parameters": params, "dataset": dataset})
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in values.items()])
    log_dataset_input(client, run.info.run_id, dataset, fingerprint(load_manifest(dataset)["identity"]),
                               "training")
    return client.get_run(run.info.run_id)


# The served model's sampling params and their defaults: `gss generate`'s (jobs/cli.py). MLflow takes a params schema
# only from the params of an input example (the inputs' schema comes from predict's type hints).
SERVING_PARAMS = {"max_new_tokens": 200, "temperature": 0.8, "top_k": 40}


def _register_model(client, run_id: str, final, model_cfg: ModelConfig, dataset: str, name: str,
                    tags: dict[str, str]) -> str:  # fmt: skip
    """Log the final model to the run as `pipeline/registered_model.py` describes (weights as tensors, the
    dataset's tokenizer, code alongside) and register it, with the alias `current` pointing at the new version."""
    import mlflow.pyfunc

    here = os.path.dirname(os.path.abspath(__file__))
    with final.as_directory() as folder, tempfile.TemporaryDirectory() as tmp:
        weights, config = os.path.join(tmp, "weights.pt"), os.path.join(tmp, "model_config.json")
        tokenizer, tokenizer_bytes = os.path.join(tmp, TOKENIZER), read_tokenizer_file(dataset)
        torch.save(checkpoint.load(folder)["model"], weights)
        with open(config, "w") as f:
            json.dump(dataclasses.asdict(model_cfg), f)
        with open(tokenizer, "wb") as f:
            f.write(tokenizer_bytes)
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None), printed_to_log("mlflow"):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=os.path.join(here, "registered_model.py"),
                artifacts={"weights": weights, "model_config": config, "tokenizer": tokenizer},  # as it reads them
                code_paths=[os.path.join(os.path.dirname(here), "models"), os.path.join(here, "tokenizer.py")],
                # token ids, so that MLflow's trial predictions on it are a forward pass each, not a decode
                input_example=([[Tokenizer(tokenizer_bytes).eod_id]], SERVING_PARAMS),
                registered_model_name=name,
                pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", "numpy", "sentencepiece"])
            mlflow.log_dict(dataclasses.asdict(model_cfg), "model_config.json")
    version = info.registered_model_version
    for key, value in tags.items():  # what `gss eval` and `gss reeval` need to know about the version
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, ALIAS, version)
    client.set_tag(run_id, Tag.MODEL_URI, f"models:/{name}@{ALIAS}")
    print(f"[train] registered {name} version {version} (models:/{name}@{ALIAS})")
    return f"models:/{name}/{version}"
