"""Preemption: a worker told to stop (SIGTERM) checkpoints at its next step, and the run resumes there; and the
time-based checkpoint interval (`train.checkpoint_minutes`)."""

import os
import signal

import pytest

from pipeline.checkpoint import NOTICE_POLL_S, Timer, read
from pipeline.config import ConfigError, load_config
from tests.corpus import as_overrides, metric_steps, prepared, run_config, start_train, train_run, wait_for


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_cluster):
    return prepared(tmp_path_factory.mktemp("preemption"), counts=(6, 2, 2), words=(2000, 4000))


def test_a_sigterm_checkpoints_the_current_step_and_the_run_resumes_there_in_the_same_mlflow_run(corpus):
    # step-based checkpoints at 60 and 119 (the last) only: the one a SIGTERM after step 60 asks for is neither
    job = start_train(run_config(corpus / "out", corpus / "corpus", "spot", steps=119, checkpoint_every=60,
                                 eval_every=1000, keep_checkpoints=10))
    run_dir = corpus / "out" / "train" / "spot"
    pid_file = run_dir / "workers" / "rank-1.pid"
    wait_for(job, lambda: pid_file.exists() and any(run_dir.glob("checkpoint_*/state.pt")),  # rank 0's at step 60
             "a checkpoint", seconds=120)
    os.kill(int(pid_file.read_text()), signal.SIGTERM)
    output, _ = job.communicate(timeout=180)
    assert job.returncode == 0, output[-3000:]

    steps = sorted(read(str(state.parent))["step"] for state in run_dir.glob("checkpoint_*/state.pt"))
    preempted = [step for step in steps if step not in (60, 119)]
    assert steps[0] == 60 and steps[-1] == 119 and len(preempted) == 1, steps
    assert f"[train] resumed from the checkpoint at step {preempted[0]}" in output, output[-5000:]

    run = train_run(corpus, "spot")
    assert run.info.status == "FINISHED" and max(metric_steps(run, "loss")) == 119
    # the restart starts at the step the SIGTERM'd worker saved: no step is lost, none trained twice
    assert list(metric_steps(run, "resumed_at_step")) == preempted


def test_checkpoint_minutes_checkpoints_between_the_step_based_ones(corpus):
    from pipeline.train import train_stage

    # step-based: only the last step; every 0.3 s of rank 0's clock: several before it
    tree = run_config(corpus / "out", corpus / "corpus", "minutes", steps=40, checkpoint_every=1000, eval_every=1000,
                      keep_checkpoints=100, checkpoint_minutes=0.005)
    train_stage(load_config(None, as_overrides(tree)))
    run_dir = corpus / "out" / "train" / "minutes"
    steps = sorted(read(str(state.parent))["step"] for state in run_dir.glob("checkpoint_*/state.pt"))
    assert steps[-1] == 40 and len(steps) > 1, steps


def test_checkpoint_minutes_is_measured_from_the_last_checkpoint_of_any_kind():
    now = [0.0]
    timer = Timer(minutes=0.5, clock=lambda: now[0])
    now[0] = 29.0
    assert not timer.save_due()
    now[0] = 30.0
    assert timer.save_due()
    now[0] = 40.0
    timer.saved()  # e.g. a step-based checkpoint: the next time-based one is half a minute after it
    now[0] = 69.0
    assert not timer.save_due()
    now[0] = 70.0
    assert timer.save_due()
    assert not Timer(minutes=0, clock=lambda: now[0] + 1e9).save_due()  # 0: off


def test_preemption_notice_is_looked_at_once_per_poll_interval():
    now = [0.0]
    timer = Timer(minutes=0, clock=lambda: now[0])
    assert not timer.look_due()
    now[0] = NOTICE_POLL_S
    assert timer.look_due() and not timer.look_due()


def test_checkpoint_minutes_is_checked_and_off_by_default():
    assert load_config(None, []).train.checkpoint_minutes == 0
    assert load_config(None, ["train.checkpoint_minutes=30"]).train.checkpoint_minutes == 30.0
    with pytest.raises(ConfigError, match="train.checkpoint_minutes"):
        load_config(None, ["train.checkpoint_minutes=-1"])
