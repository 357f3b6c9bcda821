"""A full disk: one line from the command, nothing half-written left behind or counted as done, and the same command
goes on once space is freed. The disk is a small tmpfs this test mounts, which needs root (CI's container has
it); where mounting is not allowed the test skips and says so."""

import dataclasses
import errno
import shutil
import sqlite3
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from jobs.export import CODE_DIRS
from pipeline.dataset import COMPLETE, verify_shards
from tests.corpus import (
    as_overrides,
    fresh_process_env,
    metric_steps,
    run_config,
    start_train,
    train_run,
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
    save(str(folder), model, optimizer, 1, dataclasses.asdict(model.cfg), rank=0)  # `gss eval` can load it
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


def test_a_full_disk_during_eval_or_export_is_one_line_naming_its_disk_and_nothing_half_written_is_left(
        tmp_path, small_disk, ray_cluster):
    from mlflow import MlflowClient

    from pipeline.config import load_config
    from pipeline.prepare import prepare

    write_pg19(tmp_path / "corpus", counts=(6, 2, 2), words=(2000, 4000))
    root, out = small_disk / "out", small_disk / "export"
    tree = run_config(root, tmp_path / "corpus", "full")
    tree["eval"] = {"lengths": [64, 128], "splits": ["test"], "piece_tokens": 64, "num_workers": 1}
    tree["tracking"] = {"uri": f"sqlite:///{tmp_path}/m.db"}
    cfg = load_config(None, as_overrides(tree))
    prepare(cfg)
    model = tmp_path / "model"  # a checkpoint of the dataset's vocabulary, off the small disk
    checkpoint_bytes(tree, model)
    # MLflow's store and artifacts elsewhere: eval's and export's own files are what the disk refuses
    MlflowClient(cfg.tracking.uri).create_experiment(cfg.tracking.experiment, artifact_location=str(tmp_path / "a"))
    ballast = fill(small_disk, leave=16 * 1024)  # eval's lease fits, its plot does not
    evaluated = gss("eval", *as_overrides(tree), f"eval.model={model}")
    ballast.unlink()
    code = sum(-(-f.stat().st_size // 4096) * 4096 for folder in CODE_DIRS for f in Path(folder).glob("*.py"))
    fill(small_disk, leave=code + 40 * 1024)  # export's code fits, its weights (~88 kB) do not: safetensors' error
    exported = gss("export", str(model), str(out), *as_overrides(tree))
    for done in (evaluated, exported):
        assert done.returncode == 1, (done.stdout[-2000:], done.stderr[-3000:])
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
    line = evaluated.stderr.strip().splitlines()[-1]
    assert line.startswith(f"gss eval: {root}: the disk holding it is full ("), evaluated.stderr[-3000:]
    assert line.endswith("point root at a bigger disk. What was complete is kept and nothing half-written counts as "
                         "done: run the same command again to go on from there"), line
    assert not (root / "eval" / "full" / "results.json").exists()
    assert not (root / "eval" / "full" / "ppl_vs_length.png").exists()
    line = exported.stderr.strip().splitlines()[-1]
    assert line.startswith(f"gss export: {out}: the disk holding it is full ("), exported.stderr[-3000:]
    assert line.endswith("free space there, or give an OUT_DIR on a bigger disk. Nothing was written: run the same "
                         "command again once there is room"), line
    assert not out.exists()
    assert not [p for p in small_disk.rglob("*") if ".tmp" in p.name or p.name.startswith(".export.")]


def in_a_ray_task(error: BaseException):
    """`error` as `ray.get` raises it when a task raised it (a sweep's cell): a RayTaskError that is also one."""
    from ray.exceptions import RayTaskError

    try:
        raise error
    except BaseException as e:  # noqa: BLE001 - raised to have a traceback, as in a task
        return RayTaskError("_run_cell", traceback.format_exc(), e).as_instanceof_cause()


def test_a_full_disk_is_recognised_however_a_sweep_cell_reports_it():
    from safetensors import SafetensorError

    from pipeline.storage import is_full_disk
    from pipeline.train import TrainingError

    stopped = TrainingError("training stopped: no room for its next checkpoint (the disk holding /d has 0.1 MB free)")
    full = [OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EDQUOT, "Disk quota exceeded"),
            sqlite3.OperationalError("database or disk is full"),  # MLflow's store
            SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),  # export
            stopped]
    other = [TrainingError("training failed after 2 restarts: boom"), PermissionError(errno.EACCES, "denied"),
             OSError(errno.EIO, "Input/output error"), ValueError("no room for doubt")]
    for error in full:
        assert is_full_disk(error) and is_full_disk(in_a_ray_task(error)), error
    for error in other:
        assert not is_full_disk(error) and not is_full_disk(in_a_ray_task(error)), error
    try:
        raise RuntimeError("run_pipeline failed") from stopped
    except RuntimeError as e:
        assert is_full_disk(in_a_ray_task(e))  # a cause of what the task raised
