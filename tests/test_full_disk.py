"""A full disk: one line from the command, nothing half-written left behind or counted as done, and the same command
goes on once space is freed. The disk is a small tmpfs this test mounts, which needs root (CI's container has
it); where mounting is not allowed the test skips and says so."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.dataset import COMPLETE, verify_shards
from tests.corpus import (
    as_overrides,
    fresh_process_env,
    metric_steps,
    run_config,
    start_train,
    train_run,
    wait_for,
    write_pg19,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); a full disk needs one")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """A file that takes all of `disk`'s free space but `leave` bytes."""
    ballast = disk / "ballast"
    ballast.write_bytes(bytes(shutil.disk_usage(disk).free - leave))
    return ballast


def gss(*args: str) -> subprocess.CompletedProcess:
    """A `gss` command as a user runs it, on this test session's Ray cluster."""
    import ray

    env = fresh_process_env(RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_a_full_disk_during_prepare_is_one_line_and_the_same_command_goes_on_once_space_is_freed(
        tmp_path, small_disk, ray_cluster):
    write_pg19(tmp_path / "corpus", counts=(6, 2, 2), words=(2000, 4000))
    root = small_disk / "out"
    # the MLflow store elsewhere: the shards are what fills the disk
    args = [*as_overrides(run_config(root, tmp_path / "corpus", "disk")), f"tracking.uri=sqlite:///{tmp_path}/m.db"]
    ballast = fill(small_disk, leave=48 * 1024)  # the tokenizer fits, the shards do not

    full = gss("prepare", *args)
    assert full.returncode == 1, (full.stdout[-2000:], full.stderr[-3000:])
    line = full.stderr.strip().splitlines()[-1]
    assert line.startswith("gss prepare: ") and "the disk holding it is full (" in line, full.stderr[-3000:]
    assert "free space there, or point root at a bigger disk" in line and "run the same command again" in line, line
    assert "Traceback" not in full.stderr and "Logging error" not in full.stderr, full.stderr[-3000:]
    assert not [p for p in root.rglob("*") if ".tmp" in p.name], "a half-written file was left behind"
    [dataset] = (root / "datasets").iterdir()
    assert not (dataset / COMPLETE).exists()

    ballast.unlink()
    again = gss("prepare", *args)
    assert again.returncode == 0, (again.stdout[-2000:], again.stderr[-3000:])
    assert (dataset / COMPLETE).exists()
    assert verify_shards(str(dataset), ["train", "validation", "test"]) == []


def checkpoint_bytes(tree: dict, folder: Path) -> int:
    """The size of a checkpoint of the run `tree` describes, as rank 0 of its workers writes it (after a step, so
    that AdamW's moments are in it)."""
    import torch

    from models import build_model
    from pipeline.checkpoint import save
    from pipeline.config import TrainConfig, load_config, model_config
    from pipeline.dataset import dataset_dir, load_manifest
    from pipeline.train import make_optimizer, no_weight_decay

    cfg = load_config(None, as_overrides(tree))
    model = build_model(model_config(cfg, load_manifest(dataset_dir(cfg))["tokenizer"]["vocab_size"]))
    optimizer = make_optimizer(model, TrainConfig(), no_weight_decay(model))
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    optimizer.step()
    folder.mkdir()
    save(str(folder), model, optimizer, 1, {}, rank=0)
    return sum(f.stat().st_size for f in folder.iterdir())


def test_a_full_disk_during_training_stops_it_in_one_line_with_no_restart_spent_and_it_goes_on_once_freed(
        tmp_path, small_disk, ray_cluster):
    from pipeline.checkpoint import ROOM_BESIDE, damage
    from pipeline.config import load_config
    from pipeline.prepare import prepare

    write_pg19(tmp_path / "corpus", counts=(6, 2, 2), words=(2000, 4000))
    root = small_disk / "out"
    tree = run_config(root, tmp_path / "corpus", "full", steps=100, checkpoint_every=10, eval_every=1000)
    (tmp_path / "out").mkdir()  # MLflow elsewhere (where `train_run` looks): the checkpoints fill the disk
    tree["tracking"] = {"uri": f"sqlite:///{tmp_path}/out/mlflow.db"}
    prepare(load_config(None, as_overrides(tree)))
    run_dir = root / "train" / "full"
    # room for the first checkpoint and the margin kept beside it, not for a second
    ballast = fill(small_disk, leave=ROOM_BESIDE + checkpoint_bytes(tree, tmp_path / "sized") * 3 // 2)

    output, _ = start_train(tree).communicate(timeout=300)
    line = output.strip().splitlines()[-1]
    assert line.startswith(f"gss train: training stopped: no room for its next checkpoint (the disk holding {run_dir} "
                           "has "), output[-3000:]
    assert " MB free; a checkpoint takes " in line and "The checkpoint of step 10 is kept: free space, then run the " \
           "same command again" in line, line
    assert "[train] no room for the checkpoint of step 20: the disk holding " in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    run = train_run(tmp_path, "full")
    assert run.info.status == "FAILED" and max(metric_steps(run, "loss")) == 20
    assert not metric_steps(run, "resumed_at_step"), "a restart was spent on the full disk"
    [folder] = [f for f in run_dir.glob("checkpoint_*") if f.is_dir()]  # step 10's, whole; none half-copied beside
    assert damage(str(folder)) is None and (folder / "state.pt").exists()
    assert not [p for p in root.rglob("*") if ".tmp" in p.name]

    ballast.unlink()
    again = start_train(tree)
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0, output[-3000:]
    run = train_run(tmp_path, "full")
    assert run.info.status == "FINISHED" and max(metric_steps(run, "loss")) == 100
    assert list(metric_steps(run, "resumed_at_step")) == [10]
