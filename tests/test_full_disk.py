"""A full disk: one line from the command, nothing half-written left behind or counted as done, and the same command
goes on once space is freed. The disk is a small tmpfs this test mounts, which needs root (CI's container has
it); where mounting is not allowed the test skips and says so."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.dataset import COMPLETE, verify_shards
from tests.corpus import as_overrides, fresh_process_env, run_config, write_pg19

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
