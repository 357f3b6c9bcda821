"""Where a training worker runs its model: CPU (gloo DDP), CUDA (NCCL; DDP or FSDP2) or PyTorch/XLA.

The model code knows none of this; the training loop asks its `Backend` for a device, wraps the model,
and calls `step_done()` after each optimizer step (XLA cuts and runs its graph there).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import TrainConfig


@dataclass
class Backend:
    name: str
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None: full precision

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def wrap(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        return model

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.to(self.device)

    def no_sync(self, model: nn.Module):
        return model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= dist.get_world_size()
        return value

    def local_rows(self, rows: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        """This worker's share of rows that all workers hold (validation windows): every world-th row."""
        return rows[rank::world]

    def step_done(self) -> None:
        pass

    def clear_fallback_counts(self) -> None:
        pass

    def fallback_ops(self) -> dict[str, int] | None:
        """Ops that ran on the host instead of the accelerator, with counts; None where that is not counted."""
        return None

    def peak_memory_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU/XLA host: peak RSS


class CPUBackend(Backend):
    def wrap(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        if dist.is_initialized() and dist.get_world_size() > 1:
            return nn.parallel.DistributedDataParallel(model)
        return model


class CUDABackend(Backend):
    def wrap(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        if cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        elif dist.is_initialized() and dist.get_world_size() > 1:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index])
        return torch.compile(model) if cfg.compile else model


class XLABackend(Backend):
    """One worker per host; torch_xla SPMD shards the batch over the host's devices (and hosts)."""

    @functools.cached_property
    def mesh(self):
        import numpy as np
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr

        devices = xr.global_runtime_device_count()
        return xs.Mesh(np.arange(devices), (devices, 1), ("data", "model"))

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """Shard the batch's rows over every device of the mesh (SPMD data parallel)."""
        import torch_xla.distributed.spmd as xs

        batch = batch.to(self.device)
        xs.mark_sharding(batch, self.mesh, ("data", None))
        return batch

    def local_rows(self, rows: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        return rows  # SPMD: `to_device` shards the rows over the mesh

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value  # SPMD: the loss is already global

    def step_done(self) -> None:
        import torch_xla

        torch_xla.sync()

    def fallback_ops(self) -> dict[str, int]:
        from torch_xla.debug import metrics

        return {n: metrics.counter_value(n) for n in metrics.counter_names() if n.startswith("aten::")}

    def clear_fallback_counts(self) -> None:
        from torch_xla.debug import metrics

        metrics.clear_all()


def _dtype(cfg: TrainConfig, accelerator: bool) -> torch.dtype | None:
    """The autocast dtype of `train.precision`: bf16 on accelerators for auto; None means full precision."""
    if cfg.precision == "auto":
        return torch.bfloat16 if accelerator else None
    return torch.bfloat16 if cfg.precision == "bf16" else None


def make_backend(cfg: TrainConfig) -> Backend:
    if cfg.backend == "cpu":
        return CPUBackend("cpu", torch.device("cpu"), _dtype(cfg, accelerator=False))
    if cfg.backend == "cuda":
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        return CUDABackend("cuda", device, _dtype(cfg, accelerator=True))
    if cfg.backend == "xla":
        import torch_xla
        import torch_xla.runtime as xr

        xr.use_spmd()
        return XLABackend("xla", torch_xla.device(), _dtype(cfg, accelerator=True))
    raise ValueError(f"train.backend={cfg.backend!r}")  # config.py checks the choice at load


def xla_backend_config() -> Any:
    """A Ray Train backend for torch_xla: Ray's `use_tpu=True` picks `torch_tpu`, not this, so it is ours."""
    from ray.train.backend import Backend as RayBackend
    from ray.train.backend import BackendConfig

    class _XLABackend(RayBackend):
        def on_start(self, worker_group, backend_config):
            # PJRT picks TPU on TPU VMs; tests run it on CPU (PJRT_DEVICE=CPU is passed through).
            device = os.environ.get("PJRT_DEVICE", "TPU")
            worker_group.execute(lambda: os.environ.setdefault("PJRT_DEVICE", device))

    class XLAConfig(BackendConfig):
        @property
        def backend_cls(self):
            return _XLABackend

    return XLAConfig()
