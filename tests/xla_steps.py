"""A few SPMD training steps under torch_xla on as many devices as the process has (CPU_NUM_DEVICES).

Run as `python -m tests.xla_steps OUT.json [RESUME_AT]` in a process of its own (the device count is fixed
when torch_xla starts). The same code as a `gss train` worker: `XLABackend.to_device` (the rows as this
host's part of one global batch), `train_step`, and `pipeline.checkpoint`'s save/load; with RESUME_AT the
model and optimizer are saved after that step and the rest runs on fresh copies loaded from the file.
Writes {losses, sharding, devices} as JSON.
"""

import json
import sys
import tempfile

import torch

from models import build_model
from pipeline import checkpoint
from pipeline.backends import make_backend
from pipeline.config import TrainConfig
from pipeline.train import learning_rate, make_optimizer, no_weight_decay, train_step
from tests.seed import TEST_SEED
from tests.tiny import tiny_config

STEPS, ROWS, LENGTH = 6, 8, 64


def fresh(tc: TrainConfig, device: torch.device):
    torch.manual_seed(TEST_SEED)
    model = build_model(tiny_config("gss", ssm_kernel="chunked", ssm_chunk=16)).to(device)
    return model, make_optimizer(model, tc, no_weight_decay(model))


def main(out: str, resume_at: int = 0) -> None:
    import torch_xla
    import torch_xla.runtime as xr

    tc = TrainConfig(backend="xla", precision="fp32", lr=3e-3, warmup_steps=2, steps=STEPS)
    backend = make_backend(tc)
    model, optimizer = fresh(tc, backend.device)
    data = torch.Generator().manual_seed(TEST_SEED + 1)
    batches = [torch.randint(0, 97, (ROWS, LENGTH + 1), generator=data) for _ in range(STEPS)]
    losses, sharding = [], ""
    for step, rows in enumerate(batches):
        if step == resume_at and resume_at:
            with tempfile.TemporaryDirectory() as folder:
                checkpoint.save(folder, model, optimizer, step, {}, rank=0)
                model, optimizer = fresh(tc, backend.device)
                checkpoint.restore(folder, model, optimizer)
        batch = backend.to_device(rows)
        sharding = torch_xla._XLAC._get_xla_sharding_spec(batch)
        loss, _ = train_step(model, optimizer, backend, iter([batch]), 1, learning_rate(step, tc), tc.grad_clip)
        losses.append(loss.item())
    with open(out, "w") as f:
        json.dump({"losses": losses, "sharding": sharding, "devices": xr.global_runtime_device_count()}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
