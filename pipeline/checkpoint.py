"""Checkpoints: what a training step leaves behind, how it is written, when, and how it is read back.

A checkpoint is one folder holding `state.pt`: the model and optimizer state, the step (which is also the
data position and the learning-rate schedule's state, see `pipeline.dataset.TrainRows`), the RNG state and
the model config, so that `gss eval` can load a checkpoint folder on its own. The folder is handed to Ray
Train (`ray.train.report`), which copies it into the run's storage (local or gs://) and registers it only
once it is complete; `load` reads with `weights_only=True`.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from pipeline.storage import filesystem, join

STATE = "state.pt"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def save(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
         model_config: dict[str, Any]) -> None:
    """Write `folder/state.pt` under a temporary name first, so a reader never sees half a file."""
    state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "rng": torch.get_rng_state(), "model_config": model_config}
    tmp = os.path.join(folder, STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(folder, STATE))


def load(folder: str) -> dict[str, Any]:
    """A local checkpoint folder's state (tensors on the CPU)."""
    return torch.load(os.path.join(folder, STATE), map_location="cpu", weights_only=True)


def read(url: str) -> dict[str, Any] | None:
    """The state of a checkpoint folder anywhere fsspec reaches (local, gs://); None if it holds no checkpoint."""
    fs, path = filesystem(url)
    if not fs.exists(join(path, STATE)):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        fs.get(join(path, STATE), os.path.join(tmp, STATE))
        return load(tmp)


class Checkpointer:
    """Restores a worker from Ray Train's latest checkpoint and saves one every `every` steps and at the last.

    Every rank calls `save` at the same steps (Ray Train's report is collective); rank 0 writes the state.
    """

    def __init__(self, every: int, last_step: int, rank: int, model_config: dict[str, Any]):
        self.every, self.last_step, self.rank, self.model_config = every, last_step, rank, model_config

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Load the latest checkpoint of this run, if any, into model and optimizer; returns its step (or 0)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return 0
        with checkpoint.as_directory() as folder:
            state = load(folder)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if self.rank == 0:
            print(f"resumed from {checkpoint.path} at step {state['step']}", flush=True)
        return state["step"]

    def should_save(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last_step

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             metrics: dict[str, float]) -> None:
        """Write the state of `step` and report it to Ray Train with `metrics` (every rank calls it)."""
        import ray.train

        with tempfile.TemporaryDirectory() as folder:
            if self.rank == 0:
                save(folder, model, optimizer, step, self.model_config)
            checkpoint = ray.train.Checkpoint.from_directory(folder) if self.rank == 0 else None
            ray.train.report({"step": step, **metrics}, checkpoint=checkpoint)
