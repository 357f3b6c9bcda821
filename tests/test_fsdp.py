"""FSDP2 on two CPU workers (gloo): the code GPU nodes run with `train.fsdp`, its sharded checkpoints (resumed
after a killed worker, and on another number of workers), and the full model it registers in MLflow; bf16
autocast and torch.compile on the CPU; the CPU twins of benchmarks/gpu.sh."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pytest
import torch

from models import ModelConfig, build_model
from pipeline import checkpoint
from pipeline.backends import make_backend
from pipeline.config import TrainConfig, load_config
from pipeline.train import make_optimizer, no_weight_decay, train_stage, train_step
from tests.corpus import (
    as_overrides,
    metric_steps,
    prepared,
    run_config,
    start_train,
    train_killing_a_worker,
    train_run,
    wait_for,
)
from tests.seed import TEST_SEED
from tests.tiny import tiny_config

# 60 steps of 2 workers × 4 rows; checkpoints every 20 (and at the last step); no validation before the end
RUN = {"steps": 60, "checkpoint_every": 20, "eval_every": 1000, "log_every": 1, "fsdp": True}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_cluster):
    return prepared(tmp_path_factory.mktemp("fsdp"))


def config(corpus, name: str, **train):
    return load_config(None, as_overrides(run_config(corpus / "out", corpus / "corpus", name, **{**RUN, **train})))


def registered(name: str) -> dict[str, torch.Tensor]:
    return mlflow.pyfunc.load_model(f"models:/gss-{name}@current").unwrap_python_model().model.state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tolerance) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tolerance, msg=lambda m: f"{key}: {m}")


@pytest.fixture(scope="module")
def whole(corpus):
    """An FSDP2 run that nobody interrupts: the final loss and weights the others must end with."""
    out = train_stage(config(corpus, "whole"))
    return {"loss": metric_steps(train_run(corpus, "whole"), "loss"), "weights": registered("whole"),
            "checkpoint": out["checkpoint"]}


def test_fsdp_and_ddp_from_the_same_seed_give_the_same_losses(corpus, whole, record_property):
    train_stage(config(corpus, "ddp", fsdp=False))
    ddp = metric_steps(train_run(corpus, "ddp"), "loss")
    assert sorted(ddp) == list(range(1, 61))
    torch.testing.assert_close([whole["loss"][s] for s in range(1, 11)], [ddp[s] for s in range(1, 11)],
                               rtol=1e-5, atol=1e-5)
    record_property("loss_drop", whole["loss"][1] - whole["loss"][60])
    assert whole["loss"][60] < whole["loss"][1] - 0.5  # it learns
    assert_same_weights(whole["weights"], registered("ddp"), rtol=1e-3, atol=1e-4)


def test_the_checkpoint_holds_every_ranks_shard_and_the_registered_model_is_their_union(corpus, whole):
    folder = whole["checkpoint"]
    shards = sorted(os.listdir(os.path.join(folder, checkpoint.SHARDS)))
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # written by rank 0 and by rank 1
    # each rank listed its own files, and rank 0 says there are two lists: the folder is whole only with both
    assert sorted(f for f in os.listdir(folder) if f.startswith("contents")) == ["contents-rank-00000.json",
                                                                                "contents-rank-00001.json"]
    assert checkpoint.damage(folder) is None
    state = checkpoint.load(folder)
    assert_same_weights(state["model"], whole["weights"], rtol=0, atol=0)  # state.pt: gathered onto rank 0
    # the shards read back here, in one process with no process group, into a fresh unsharded model
    model = build_model(ModelConfig(**state["model_config"]))
    optimizer = make_optimizer(model, TrainConfig(), no_weight_decay(model))
    assert checkpoint.restore(folder, model, optimizer)["step"] == 60
    assert_same_weights(model.state_dict(), whole["weights"], rtol=0, atol=0)
    assert {s["step"].item() for s in optimizer.state.values()} == {60}  # AdamW's state came back too


def test_an_fsdp_worker_killed_mid_run_resumes_from_the_shards_and_ends_as_if_never_killed(corpus, whole):
    train_killing_a_worker(corpus, run_config(corpus / "out", corpus / "corpus", "killed", **RUN))

    run = train_run(corpus, "killed")
    assert run.info.status == "FINISHED"
    resumed = list(metric_steps(run, "resumed_at_step"))
    assert resumed and resumed[0] % 20 == 0 and resumed[0] < 60, resumed
    loss = metric_steps(run, "loss")
    assert loss[60] == pytest.approx(whole["loss"][60], rel=1e-6)
    assert_same_weights(registered("killed"), whole["weights"], rtol=1e-6, atol=1e-7)


def test_a_two_worker_fsdp_checkpoint_resumes_on_one_worker(corpus, whole):
    job = start_train(run_config(corpus / "out", corpus / "corpus", "shrunk", **RUN))
    run_dir = corpus / "out" / "train" / "shrunk"
    wait_for(job, lambda: (run_dir / "checkpoint_manager_snapshot.json").exists(), "a checkpoint")
    job.kill()  # the driver: Ray ends its trainer and workers with it, and the MLflow run stays unfinished
    job.communicate()

    out = train_stage(config(corpus, "shrunk", num_workers=1))  # the same global batch, as 2 micro-batches
    run = train_run(corpus, "shrunk")
    resumed = list(metric_steps(run, "resumed_at_step"))
    assert len(resumed) == 1 and resumed[0] % 20 == 0 and resumed[0] < 60, resumed
    assert sorted(os.listdir(os.path.join(out["checkpoint"], checkpoint.SHARDS))) == [".metadata", "__0_0.distcp"]
    assert metric_steps(run, "loss")[60] == pytest.approx(whole["loss"][60], rel=1e-4)
    assert_same_weights(registered("shrunk"), whole["weights"], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("option", ["precision", "compile"])
def test_bf16_autocast_and_torch_compile_train_on_the_cpu(option, record_property):
    """Two steps through `Backend.wrap` and `train_step` with the option on and off: bf16 changes the loss a
    little (autocast is on), torch.compile (inductor) not at all; a compiled model's checkpoint loads back."""
    rows = torch.randint(0, 50, (2, 4, 33), generator=torch.Generator().manual_seed(TEST_SEED))

    def losses(tc: TrainConfig) -> tuple[list[float], torch.nn.Module, torch.optim.Optimizer]:
        backend = make_backend(tc)
        torch.manual_seed(TEST_SEED)
        model = build_model(tiny_config("gss"))
        undecayed = no_weight_decay(model)
        model = backend.wrap(model, tc)
        optimizer = make_optimizer(model, tc, undecayed)
        out = [train_step(model, optimizer, backend, iter([r]), 1, 1e-2, 1.0)[0].item() for r in rows]
        return out, model, optimizer

    plain, _, _ = losses(TrainConfig(backend="cpu", precision="fp32"))
    on = TrainConfig(backend="cpu", precision="bf16") if option == "precision" else TrainConfig(backend="cpu",
                                                                                                compile=True)
    changed, model, optimizer = losses(on)
    if option == "precision":
        assert make_backend(on).dtype == torch.bfloat16
        record_property("bf16_max_loss_change", max(abs(a - b) for a, b in zip(changed, plain)))
        assert changed != plain and changed == pytest.approx(plain, abs=0.05)
    else:
        assert type(model).__name__ == "OptimizedModule"
        assert changed == pytest.approx(plain, rel=1e-4)
        with tempfile.TemporaryDirectory() as folder:
            checkpoint.save(folder, model, optimizer, 2, {}, rank=0)
            fresh = build_model(tiny_config("gss"))
            checkpoint.restore(folder, fresh, make_optimizer(fresh, on, no_weight_decay(fresh)))
        assert_same_weights(fresh.state_dict(), checkpoint.unwrap(model).state_dict(), rtol=0, atol=0)



ROOT = Path(__file__).resolve().parents[1]


def test_the_fsdp_smoke_benchmark_restores_its_shards_on_two_cpu_processes(tmp_path):
    """The CPU twin of benchmarks/gpu.sh's FSDP2 step: the same script under torchrun, gloo instead of NCCL."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "benchmarks.bench_fsdp", "--device", "cpu", "--preset", "small-gss", "--layers", "2", "--length", "64",
         "--vocab", "500", "--out", str(tmp_path / "fsdp.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "fsdp.json").read_text())["results"]["checkpoint"][0]
    assert summary["world size"] == 2 and summary["same"], summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the script would run")
def test_the_gpu_benchmark_script_refuses_to_run_without_cuda(tmp_path):
    result = subprocess.run(["bash", "benchmarks/gpu.sh", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert result.returncode != 0 and "gpu.sh: no CUDA device" in result.stderr, result
    assert not (tmp_path / "out").exists()
