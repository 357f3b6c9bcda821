"""Where a training worker runs its model: CPU (gloo) or CUDA (NCCL), each with DDP or FSDP2, or PyTorch/XLA.

The model code knows none of this; the training loop asks its `Backend` for a device, wraps the model,
and calls `step_done()` after each optimizer step (XLA cuts and runs its graph there).
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import TrainConfig, compiles


@dataclass
class Backend:
    name: str
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None: full precision
    compiled: bool = False  # the model runs under torch.compile (`train.compile`)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def wrap(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        """FSDP2 (`train.fsdp`: every block, then the whole model, sharded over the workers) or DDP over several
        workers, then torch.compile (`train.compile`, lazy: the first step compiles). The same on cpu (gloo) as on
        cuda (NCCL), so that the tests run the code GPU nodes run. Build the optimizer after this: fully_shard makes
        new Parameters."""
        if cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        elif dist.is_initialized() and dist.get_world_size() > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return torch.compile(model) if self.compiled else model

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

    def step_done(self) -> None:
        pass

    def clear_fallback_counts(self) -> None:
        pass

    def fallback_ops(self) -> dict[str, int] | None:
        """Ops that ran on the host instead of the accelerator, with counts; None where that is not counted."""
        return None

    def compile_counts(self) -> dict[str, float]:
        """What compiling took so far and what the persistent cache had, as metrics: torch.compile's seconds (Dynamo's
        own total over the graphs of every frame and their lazily compiled backward graphs) and the lookups of
        Inductor's FX graph cache and AOTAutograd's cache (a hit: a graph an earlier run compiled; a bypass: a graph
        that cache cannot hold, e.g. one that switches autocast or runs a custom autograd Function)."""
        if not self.compiled:
            return {}
        from torch._dynamo.utils import calculate_time_spent, counters

        inductor, aot = counters["inductor"], counters["aot_autograd"]
        return {"compile_seconds": calculate_time_spent()["total_wall_time"],
                "fx_graph_cache_hits": inductor["fxgraph_cache_hit"],
                "fx_graph_cache_misses": inductor["fxgraph_cache_miss"],
                "aot_autograd_cache_hits": aot["autograd_cache_hit"],
                "aot_autograd_cache_misses": aot["autograd_cache_miss"],
                "aot_autograd_cache_bypasses": aot["autograd_cache_bypass"]}

    def peak_memory_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU/XLA host: peak RSS


class XLABackend(Backend):
    """One worker per TPU host; torch_xla SPMD runs one program over every device of every host.

    Each host loads only its own rows of a batch; `to_device` hands them to torch_xla as this host's part of
    one global array (a `minibatch` sharding spec, as torch_xla's MpDeviceLoader does for multi-host SPMD), so
    the global batch is every host's rows in rank order, sharded along the mesh's data axis.
    """

    @functools.cached_property
    def input_sharding(self):
        import numpy as np
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr

        devices = xr.global_runtime_device_count()
        mesh = xs.Mesh(np.arange(devices), (devices, 1), ("data", "model"))
        return xs.ShardingSpec(mesh, ("data", None), minibatch=True)

    def wrap(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        return model  # SPMD: one program over every device; the input's sharding says how the batch is split

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        import torch_xla.core.xla_model as xm

        return xm.send_cpu_data_to_device([batch], self.device, self.input_sharding)[0]

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value  # SPMD: the loss of the global batch is already the same on every host

    def step_done(self) -> None:
        import torch_xla

        torch_xla.sync()

    def fallback_ops(self) -> dict[str, int]:
        from torch_xla.debug import metrics

        return {n: metrics.counter_value(n) for n in metrics.counter_names() if n.startswith("aten::")}

    def clear_fallback_counts(self) -> None:
        from torch_xla.debug import metrics

        metrics.clear_all()

    def compile_counts(self) -> dict[str, float]:
        from torch_xla.debug import metrics

        # a graph the persistent cache has is a hit, or a deserialize failure where the runtime cannot load
        # executables back (torch_xla 2.9's CPU runtime); a miss is a graph no earlier run compiled
        return {"xla_compiles": metrics.counter_value("UncachedCompile") or 0,
                "xla_cache_hits": metrics.counter_value("PersistentCacheHit") or 0,
                "xla_cache_misses": metrics.counter_value("PersistentCacheMiss") or 0}


def _dtype(cfg: TrainConfig, accelerator: bool) -> torch.dtype | None:
    """The autocast dtype of `train.precision`: bf16 on accelerators for auto; None means full precision."""
    if cfg.precision == "auto":
        return torch.bfloat16 if accelerator else None
    return torch.bfloat16 if cfg.precision == "bf16" else None


def _compile_cache_dir(root: str, name: str, on_host: str) -> str:
    """`<root>/<name>` for a local root; on a bucket root, `on_host`, a folder on each host."""
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.storage import filesystem

    fs, path = filesystem(root)
    return os.path.join(path, name) if isinstance(fs, LocalFileSystem) else os.path.expanduser(on_host)


def xla_cache_dir(root: str) -> str:
    """The persistent XLA compilation cache: `<root>/xla_cache` for a local root, else a folder on the host."""
    return _compile_cache_dir(root, "xla_cache", "~/.cache/gss/xla")


def inductor_cache_dir(root: str) -> str:
    """Inductor's persistent caches (FX graphs, AOTAutograd graphs, C++ and Triton kernels; by default under /tmp,
    lost with the node): `<root>/inductor_cache` for a local root, else a folder on the host."""
    return _compile_cache_dir(root, "inductor_cache", "~/.cache/gss/inductor")


def make_backend(cfg: TrainConfig, xla_cache: str = "", inductor_cache: str = "") -> Backend:
    """The worker's backend; `xla_cache` / `inductor_cache`: where compiled XLA programs / Inductor's graphs and
    kernels persist (a restart finds them instead of compiling again)."""
    if compiles(cfg) and inductor_cache:
        # read at each lookup (torch._inductor.runtime.cache_dir_utils), so before the first compile is enough; the FX
        # graph and AOTAutograd caches under it are on by default (torch 2.13: fx_graph_cache, enable_autograd_cache)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache
        os.environ["TRITON_CACHE_DIR"] = os.path.join(inductor_cache, "triton")  # cuda's kernels, whatever was set
    if cfg.backend == "cpu":
        return Backend("cpu", torch.device("cpu"), _dtype(cfg, accelerator=False), compiles(cfg))
    if cfg.backend == "cuda":
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        return Backend("cuda", device, _dtype(cfg, accelerator=True), compiles(cfg))
    if cfg.backend == "xla":
        import torch_xla
        import torch_xla.runtime as xr

        if xla_cache:
            xr.initialize_cache(xla_cache)  # before the first computation
        xr.use_spmd()
        return XLABackend("xla", torch_xla.device(), _dtype(cfg, accelerator=True))
    raise ValueError(f"train.backend={cfg.backend!r}")  # config.py checks the choice at load


def xla_backend_config() -> Any:
    """The Ray Train backend of torch_xla workers: torch_xla's runtime variables on every worker, and a gloo
    process group across the hosts (barriers, small CPU collectives such as the checkpoint decision).

    Ours, not Ray's torch setup: that one asks Ray's device manager for the worker's device, which on workers
    holding TPUs means `torch_tpu` (RuntimeError "Using TPUTorchDeviceManager but torch_tpu is not available"),
    while this path runs torch_xla SPMD. (MegaScale variables for multislice runs are not set here.)
    """
    import ray
    from ray.train.backend import Backend as RayBackend
    from ray.train.backend import BackendConfig

    # PJRT picks the TPU on TPU VMs; the tests run it on the CPU with PJRT_DEVICE=CPU and CPU_NUM_DEVICES.
    runtime = {"PJRT_DEVICE": "TPU",
               **{k: os.environ[k] for k in ("PJRT_DEVICE", "CPU_NUM_DEVICES") if k in os.environ}}

    def meeting_point() -> str:
        """tcp://<this node's address>:<a free port>, for the process group's workers to meet at."""
        host = ray.util.get_node_ip_address()
        ipv6 = ":" in host
        with socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://[{host}]:{port}" if ipv6 else f"tcp://{host}:{port}"

    def join_process_group(init_method: str, world_rank: int, world_size: int) -> None:
        dist.init_process_group("gloo", init_method=init_method, rank=world_rank, world_size=world_size,
                                timeout=timedelta(seconds=1800))

    class _XLABackend(RayBackend):
        def on_start(self, worker_group, backend_config):
            worker_group.execute(lambda: os.environ.update(runtime))
            init_method = worker_group.execute_single(0, meeting_point)  # on rank 0's node
            world = len(worker_group)
            # positional: `rank` is execute_single_async's own first argument
            ray.get([worker_group.execute_single_async(rank, join_process_group, init_method, rank, world)
                     for rank in range(world)])

        def on_shutdown(self, worker_group, backend_config):
            worker_group.execute(lambda: dist.destroy_process_group() if dist.is_initialized() else None)

    class XLAConfig(BackendConfig):
        @property
        def backend_cls(self):
            return _XLABackend

    return XLAConfig()
