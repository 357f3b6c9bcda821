"""Checkpoints verified before use: a checkpoint cut short or changed after it was written is found by its contents
lists before anything loads, and training resumes from the newest whole one, with one line, and no worker-group
restart spent on it."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from models import build_model
from pipeline.checkpoint import STATE, UnreadableCheckpoint, damage, read, restore, save
from pipeline.evaluate import EvalError, load_model
from tests.corpus import metric_steps, prepared, run_config, start_train, train_run, wait_for
from tests.tiny import tiny_config


def saved(folder: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A tiny model and its optimizer after one step, saved into `folder` as rank 0 of one worker saves them."""
    model = build_model(tiny_config("gss"))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    optimizer.step()
    folder.mkdir()
    save(str(folder), model, optimizer, 7, {"arch": "gss"}, rank=0)
    return model, optimizer


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_whole_checkpoint_passes_and_a_cut_or_changed_one_is_named_before_anything_loads(tmp_path):
    model, optimizer = saved(tmp_path / "whole")
    assert damage(str(tmp_path / "whole")) is None
    assert restore(str(tmp_path / "whole"), model, optimizer)["step"] == 7
    assert sorted(os.listdir(tmp_path / "whole")) == ["contents-rank-00000.json", STATE]

    saved(tmp_path / "cut")
    size = (tmp_path / "cut" / STATE).stat().st_size
    cut_in_half(tmp_path / "cut" / STATE)
    problem = damage(str(tmp_path / "cut"))
    assert problem.startswith(f"{STATE} holds ") and problem.endswith(f" of {size:,} bytes"), problem
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnreadableCheckpoint, match=f"{STATE} holds "):
        restore(str(tmp_path / "cut"), model, optimizer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was loaded

    saved(tmp_path / "changed")
    data = bytearray((tmp_path / "changed" / STATE).read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = bytes(4096)
    (tmp_path / "changed" / STATE).write_bytes(bytes(data))
    assert damage(str(tmp_path / "changed")) == f"{STATE} differs from what was written (sha256)"

    saved(tmp_path / "unlisted")
    (tmp_path / "unlisted" / "contents-rank-00000.json").unlink()
    assert damage(str(tmp_path / "unlisted")) is None  # as written before the lists: its load is its test
    cut_in_half(tmp_path / "unlisted" / STATE)
    with pytest.raises(UnreadableCheckpoint, match=f"^{STATE} does not load"):
        restore(str(tmp_path / "unlisted"), model, optimizer)


def test_a_sharded_checkpoint_is_whole_only_with_every_rank_s_list(tmp_path):
    saved(tmp_path / "parts")
    listed = tmp_path / "parts" / "contents-rank-00000.json"
    listed.write_text(json.dumps({**json.loads(listed.read_text()), "parts": 2}))  # as FSDP's rank 0 says
    assert damage(str(tmp_path / "parts")) == "1 of 2 ranks' contents lists are there"
    (tmp_path / "parts" / "shard-of-rank-1").write_bytes(b"x" * 10)
    (tmp_path / "parts" / "contents-rank-00001.json").write_text(json.dumps(
        {"files": {"shard-of-rank-1": {"bytes": 11, "sha256": ""}}}))
    assert damage(str(tmp_path / "parts")) == "shard-of-rank-1 holds 10 bytes of 11 bytes"


def test_gss_eval_of_an_unreadable_checkpoint_folder_is_one_clear_error(tmp_path):
    saved(tmp_path / "ckpt")
    assert read(str(tmp_path / "ckpt"))["step"] == 7
    cut_in_half(tmp_path / "ckpt" / STATE)
    with pytest.raises(EvalError, match=f"the checkpoint {tmp_path / 'ckpt'} is unreadable: {STATE} holds .*; give "
                                        "another one"):
        load_model(str(tmp_path / "ckpt"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_cluster):
    return prepared(tmp_path_factory.mktemp("checkpoint_faults"), counts=(6, 2, 2), words=(2000, 4000))


def kept(run_dir: Path) -> dict[int, Path]:
    """{step: folder} of the checkpoints Ray Train keeps for the run (its snapshot, written once one is registered)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return {}
    results = json.loads(snapshot.read_text())["checkpoint_results"]
    return {r["metrics"]["step"]: run_dir / r["checkpoint_dir_name"] for r in results}


@pytest.mark.parametrize("cut", ["newest", "all"])
def test_training_resumes_from_the_newest_whole_checkpoint_and_spends_no_restart_on_a_cut_one(corpus, cut):
    """The issue's fault: the newest checkpoint cut to half (a copy cut short, a disk that filled), then the worker
    group restarted (rank 1 SIGKILLed). Before, every restart failed in torch.load on the same file."""
    name = f"cut-{cut}"
    run_dir = corpus / "out" / "train" / name
    job = start_train(run_config(corpus / "out", corpus / "corpus", name, steps=120, checkpoint_every=40,
                                 eval_every=1000, keep_checkpoints=2))
    pid = run_dir / "workers" / "rank-1.pid"
    wait_for(job, lambda: len(kept(run_dir)) == 2 and pid.exists(), "two checkpoints")  # steps 40 and 80
    folders = kept(run_dir)
    steps = sorted(folders)
    for step in steps[-1:] if cut == "newest" else steps:
        cut_in_half(folders[step] / STATE)
    os.kill(int(pid.read_text()), signal.SIGKILL)  # well before the last step, 40 steps from here
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output[-3000:]

    run = train_run(corpus, name)
    assert run.info.status == "FINISHED" and max(metric_steps(run, "loss")) == 120
    resumed = list(metric_steps(run, "resumed_at_step"))
    assert f"[train] the checkpoint of step {steps[-1]} ({folders[steps[-1]]}) is unreadable ({STATE} holds " \
           in output, output[-5000:]
    if cut == "newest":
        assert resumed == [steps[0]]  # one restart, the one the SIGKILL asked for
        assert f"[train] resumed from the checkpoint at step {steps[0]}" in output, output[-5000:]
    else:
        assert resumed == []
        assert "[train] no whole checkpoint is left: training starts again from step 0" in output, output[-5000:]

