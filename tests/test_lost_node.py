"""A node lost mid-command (tests/lost_node.py, on Ray's multi-node test cluster) costs time and nothing else: Ray
Data tokenizes the lost node's units again, Ray Train restarts the worker group from the last checkpoint once a node
is back, and `gss eval` hands a lost scorer's batches to the one left; each ends as the same command without the
loss ends."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.corpus import fresh_process_env


@pytest.fixture(scope="module")
def commands(tmp_path_factory) -> tuple[dict[str, str], Path]:
    root = tmp_path_factory.mktemp("lost_node")
    job = subprocess.run([sys.executable, "-m", "tests.lost_node", str(root)], env=fresh_process_env(),
                         capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    return json.loads(job.stdout.strip().splitlines()[-1])["outputs"], root


def test_gss_prepare_writes_the_dataset_of_an_uninterrupted_prepare(commands):
    _, root = commands
    shards = {name: {path.relative_to(root / name): path.read_bytes()
                     for path in (root / name / "datasets").rglob("*") if path.suffix in (".parquet", ".model")}
              for name in ("whole", "lost")}
    assert len(shards["whole"]) > 12 and shards["lost"] == shards["whole"]


def test_gss_train_waits_for_the_node_then_resumes_in_the_same_mlflow_run_to_the_same_loss(commands):
    outputs, root = commands
    said = [line for line in outputs["train-lost"].splitlines() if line.startswith("[train] ") and "%|" not in line]
    assert said[1:4] == [
        "[train] waiting for the cluster: the workers need worker 2 (the cluster has 1); a node was lost or is not up "
        "yet, and training goes on from its last checkpoint once the nodes are there",
        next(line for line in said if line.startswith("[train] the cluster has room for the workers again (short "
                                                      "since ")),
        "[train] resumed from the checkpoint at step 10"], said
    losses = {}
    for name in ("whole", "lost"):
        client = mlflow.MlflowClient(f"sqlite:///{root / name / 'mlflow.db'}")
        [run] = client.search_runs(client.get_experiment_by_name("gss").experiment_id, "tags.`gss.train_name` = "
                                   "'lost-node'")
        assert run.info.status == "FINISHED"
        losses[name] = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
        resumed = [m.step for m in client.get_metric_history(run.info.run_id, "resumed_at_step")]
        assert resumed == ([10] if name == "lost" else [])
    assert losses["lost"] == losses["whole"] and max(losses["lost"]) == 40


def test_gss_eval_hands_a_lost_scorer_s_batches_to_the_one_left_and_scores_as_without_the_loss(commands):
    outputs, root = commands
    assert "[eval] a scorer was lost (ActorDiedError: its node or its process ended); its batches go to the 1 left" \
           in outputs["eval-lost"].splitlines()
    rows = {name: json.loads((root / name / "eval" / "lost-node" / "results.json").read_text())["rows"]
            for name in ("whole", "lost")}
    assert [(r["split"], r["length"]) for r in rows["lost"]] == [("test", 64), ("test", 256)]
    for lost, whole in zip(rows["lost"], rows["whole"], strict=True):
        assert lost["loss"] == pytest.approx(whole["loss"], rel=1e-12)  # the sums in another order
