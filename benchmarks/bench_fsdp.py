"""FSDP2 smoke run: the training worker's own code (`Backend.wrap` with `train.fsdp`, `make_optimizer`,
`train_step`, the sharded checkpoint's `save` and `restore`) for a few steps, without Ray.

Trains --steps steps, saves a sharded checkpoint, restores it into a freshly wrapped model and optimizer, and
trains one more step on both: the two losses must be equal (exit status 1 if not). One process (world size
1) by default; under `torchrun --nproc_per_node=N` it shards over N devices. NCCL on CUDA, gloo on the CPU
(the tests run it that way).

    python -m benchmarks.bench_fsdp --device cuda --dtype bf16 --preset paper-gss --out fsdp.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from benchmarks import common
from models import PRESETS, ModelConfig, build_model
from pipeline import checkpoint
from pipeline.backends import Backend
from pipeline.config import TrainConfig
from pipeline.train import make_optimizer, no_weight_decay, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper-gss")
    parser.add_argument("--layers", type=int, default=0, help="override the preset's depth (0: the preset's)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--steps", type=int, default=2)
    common.add_common_args(parser)
    args = parser.parse_args()
    device = common.setup(args)

    rank = int(os.environ.get("RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                            world_size=int(os.environ.get("WORLD_SIZE", 1)))
    tc = TrainConfig(backend="cuda" if device.type == "cuda" else "cpu", fsdp=True,
                     precision="bf16" if args.dtype == "bf16" else "fp32")
    backend = Backend(tc.backend, device, torch.bfloat16 if args.dtype == "bf16" else None)
    cfg = replace(PRESETS[args.preset], vocab_size=args.vocab)
    if args.layers:
        cfg = replace(cfg, n_layers=args.layers)

    def wrapped(model_cfg: ModelConfig):
        torch.manual_seed(args.seed)
        model = build_model(model_cfg).to(device)
        undecayed = no_weight_decay(model)
        model = backend.wrap(model, tc)
        return model, make_optimizer(model, tc, undecayed)

    data = torch.Generator().manual_seed(args.seed + rank)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.length + 1), generator=data).to(device)
               for _ in range(args.steps + 1)]

    def step(model, optimizer, rows) -> tuple[float, float]:
        common.sync(device)
        start = time.perf_counter()
        loss, _ = train_step(model, optimizer, backend, iter([rows]), 1, 1e-4, 1.0)
        loss = backend.all_reduce_mean(loss).item()
        return loss, time.perf_counter() - start

    model, optimizer = wrapped(cfg)
    rows = [{"step": i + 1, **dict(zip(("loss", "seconds"), step(model, optimizer, batches[i])))}
            for i in range(args.steps)]
    with tempfile.TemporaryDirectory() as own:
        root = [own]
        dist.broadcast_object_list(root)  # rank 0's folder for all (one host)
        root = root[0]
        folder = os.path.join(root, f"rank-{rank}")  # what each worker hands Ray Train; here one folder each
        os.makedirs(folder)
        start = time.perf_counter()
        checkpoint.save(folder, model, optimizer, args.steps, {}, rank)
        save_s = time.perf_counter() - start
        dist.barrier()
        shared = os.path.join(root, "merged")  # what Ray Train's storage then holds: every rank's files together
        if rank == 0:
            for r in range(dist.get_world_size()):
                shutil.copytree(os.path.join(root, f"rank-{r}"), shared, dirs_exist_ok=True)
        dist.barrier()
        restored, restored_optimizer = wrapped(cfg)
        start = time.perf_counter()
        checkpoint.restore(shared, restored, restored_optimizer)
        restore_s = time.perf_counter() - start
        shard_bytes = sum(os.path.getsize(os.path.join(shared, checkpoint.SHARDS, f))
                          for f in os.listdir(os.path.join(shared, checkpoint.SHARDS)))
        dist.barrier()
    after, _ = step(model, optimizer, batches[-1])
    after_restore, _ = step(restored, restored_optimizer, batches[-1])
    summary = {"preset": args.preset, "layers": cfg.n_layers, "world size": dist.get_world_size(),
               "params (M)": sum(p.numel() for p in model.parameters()) / 1e6,  # DTensors: the global count
               "save (s)": save_s, "restore (s)": restore_s, "shards (MB)": shard_bytes / 1e6,
               "next loss": after, "next loss after restore": after_restore, "same": after == after_restore,
               "peak memory (GB)": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}
    if rank == 0:
        common.print_table(rows, ["step", "loss", "seconds"])
        common.print_table([summary], list(summary))
        common.write_json(args, device, {"steps": rows, "checkpoint": [summary]})
    dist.destroy_process_group()
    if not summary["same"]:
        raise SystemExit(f"the restored model's next loss {after_restore} differs from the original's {after}")


if __name__ == "__main__":
    main()
