"""The production tracking stack (tests/tracking_server.py): PostgreSQL, `mlflow server` with basic auth as
infra/mlflow runs it, its artifacts on the local GCS server, the pipeline's credentials in the environment as
the README documents. Then its faults: the server killed and back, its database restarted, an
outage longer than MLflow's retries, wrong credentials; and many writers at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from tests.corpus import as_overrides, fresh_process_env, run_config, wait_for, write_pg19
from tests.tracking_server import ADMIN_PASSWORD, LocalMlflowServer, LocalPostgres

pytestmark = pytest.mark.gcs


class Stack:
    def __init__(self, folder, gcs):
        self.gcs = gcs
        gcs.bucket("team")  # the server's artifacts; the runs' own files stay local (tests/test_gcs.py: gs:// roots)
        self.root = str(folder / "runs")
        (folder / "mlflow").mkdir()
        self.postgres = LocalPostgres()
        self.server = LocalMlflowServer(folder / "mlflow", self.postgres, "gs://team/mlflow", gcs.env).start()
        self.server.create_pipeline_user()
        self.corpus = folder / "corpus"
        write_pg19(self.corpus, counts=(6, 1, 1), words=(2000, 4000))

    def env(self, **extra: str) -> dict[str, str]:
        return fresh_process_env() | self.gcs.env | self.server.client_env() | extra

    def config(self, name: str, **train) -> dict:
        tree = run_config(self.root, self.corpus, name, **{"num_workers": 1, "checkpoint_every": 20, **train})
        tree["eval"] = {"lengths": [64, 128], "max_documents": 1, "piece_tokens": 64}
        return tree

    def gss(self, command: str, tree: dict, **env: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "jobs.cli", command, *as_overrides(tree)], env=self.env(**env),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def admin(self):
        """The admin's view of the server (every run, every user's)."""
        from mlflow.tracking import MlflowClient

        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD)
        return MlflowClient(self.server.url)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, gcs):
    stack = Stack(tmp_path_factory.mktemp("stack"), gcs)
    prepare = stack.gss("prepare", stack.config("prepared"))
    output, _ = prepare.communicate(timeout=300)
    assert prepare.returncode == 0, output[-3000:]
    yield stack
    stack.server.stop()
    stack.postgres.stop()
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ.pop(key, None)


@pytest.fixture(autouse=True)
def server_back_after_each_test(stack):
    """A test that fails while the server is stopped leaves it running, so the next test fails only for itself."""
    yield
    if not stack.server.running:
        stack.server.start()


def training_run(client, name: str):
    experiment = client.get_experiment_by_name("gss")
    runs = client.search_runs([experiment.experiment_id], f"tags.`gss.train_name` = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def logged_steps(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


def assert_finished_once(stack: Stack, name: str, steps: int, log_every: int = 5) -> None:
    """One FINISHED training run, one registered version, every logged step exactly once."""
    client = stack.admin()
    run = training_run(client, name)
    assert run.info.status == "FINISHED"
    assert [v.version for v in client.search_model_versions(f"name = 'gss-{name}'")] == ["1"]
    assert logged_steps(client, run.info.run_id) == list(range(log_every, steps + 1, log_every))
    artifacts = stack.gcs.filesystem().find("team/mlflow")  # the server alone wrote them, into the bucket
    assert any(path.endswith("model_config.json") for path in artifacts)


def reached_step(stack: Stack, name: str, step: int):
    def ready() -> bool:
        try:
            client = stack.admin()
            found = client.search_runs([client.get_experiment_by_name("gss").experiment_id],
                                       f"tags.`gss.train_name` = '{name}'")
            return bool(found) and max(logged_steps(client, found[0].info.run_id), default=0) >= step
        except Exception:  # noqa: BLE001 - not created yet
            return False

    return ready


def test_wrong_credentials_are_one_clear_line_before_any_work(stack):
    job = stack.gss("train", stack.config("refused"), MLFLOW_TRACKING_PASSWORD="not-the-password")
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines[-1] == (f"gss train: MLflow tracking server {stack.server.url} refuses the credentials given (user: "
                         "gss-pipeline; HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                         "~/.mlflow/credentials) to your MLflow user's (infra/README.md, MLflow)"), output[-2000:]
    assert "Traceback" not in output and "[train]" not in output


def test_training_outlives_the_tracking_server_and_its_database(stack):
    """The server killed at step 10 and back 15 s later (MLflow's own retries bridge that), then PostgreSQL
    restarted under it: the run finishes once, with every metric. What the bar says of the outage is the next
    test's: the workers buffer their metrics and do not slow down, so on a fast machine training ends inside the
    outage and the bar closes before the server is back (CI saw that)."""
    name, steps = "outage", 40
    job = stack.gss("train", stack.config(name, steps=steps))
    wait_for(job, reached_step(stack, name, 10), "step 10 in MLflow")
    stack.server.stop()
    time.sleep(15)
    stack.server.start()
    wait_for(job, reached_step(stack, name, 25), "step 25 in MLflow")
    stack.postgres.restart(down_s=3)
    output, _ = job.communicate(timeout=1200)  # a hang guard: 89 s alone, 221 s beside another test file
    assert job.returncode == 0, output[-3000:]
    assert_finished_once(stack, name, steps)


def test_once_the_server_is_back_the_bar_says_so_without_waiting_out_a_read_in_mlflows_retries(stack, capsys,
                                                                                                 monkeypatch):
    """A read of the bar's that went out while the server was away sleeps in MLflow's retries for minutes; once the
    server answers its health check, the bar reads afresh instead of waiting for that one (CI once saw a training
    run end while its bar still said MLflow was unreachable)."""
    from pipeline.progress import TrainingProgress

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "120")  # after two tries at once, 120 s of sleep
    client = stack.admin()
    run_id = client.create_run(client.create_experiment("bar")).info.run_id
    with TrainingProgress(stack.server.url, run_id, steps=4, tokens_per_step=10, finishing="", poll_s=3600) as bar:
        stack.server.stop()
        bar.reading, bar.reading_since = bar._read_in_background(), time.monotonic()
        time.sleep(2)  # the read is now asleep in the retries
        bar._update()
        assert bar.outage.since is not None
        stack.server.start()
        bar._update()  # waiting for the old read would take answer_s (10 s) and find it still asleep
        assert bar.outage.since is None
    said = "".join(capsys.readouterr())
    assert "MLflow does not answer" in said and "MLflow answers again" in said, said


def test_an_outage_longer_than_mlflows_retries_loses_no_metric(stack, monkeypatch):
    """What a training worker logs through (tracking.BackgroundLogger), with MLflow's retries cut to nothing so
    that a short outage here is as long as a 5-minute one: the metrics of the gap are kept and sent later."""
    from pipeline.tracking import BackgroundLogger

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = stack.admin()
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    said = []
    sender = BackgroundLogger(stack.server.url, run_id, say=said.append, retry_s=0.5)
    sender.log(1, {"loss": 1.0})
    stack.server.stop()
    for step in range(2, 6):
        sender.log(step, {"loss": 1.0 / step})  # returns at once, as a training step must
    deadline = time.monotonic() + 30
    while not any("does not answer" in line for line in said):
        assert time.monotonic() < deadline, said
        time.sleep(0.1)
    stack.server.start()
    assert sender.close(flush_s=60) is None
    assert any("answers again" in line for line in said), said
    assert logged_steps(client, run_id) == [1, 2, 3, 4, 5]


def test_a_metric_the_server_refuses_is_said_once_and_dropped_and_the_rest_arrives(stack):
    """A 400 for one batch (a metric name MLflow does not take) is not an outage: it used to be retried forever,
    holding back every metric behind it."""
    from pipeline.tracking import BackgroundLogger

    client = stack.admin()
    run_id = client.create_run(client.create_experiment("refused")).info.run_id
    said = []
    sender = BackgroundLogger(stack.server.url, run_id, say=said.append)
    for step in range(1, 4):
        sender.log(step, {"loss": 1.0 / step, "bad key!": 1.0})
    assert sender.close(flush_s=60) is None
    assert len(said) == 1 and said[0].startswith(f"MLflow at {stack.server.url} refuses metric 'bad key!' of run "
                                                 f"{run_id} (INVALID_PARAMETER_VALUE"), said
    assert logged_steps(client, run_id) == [1, 2, 3]


def test_at_close_a_batch_still_in_a_request_is_waited_for_not_called_lost(stack):
    """The server frozen (SIGSTOP) while the batch goes out, and thawed 3 s into close's wait for it: nothing is
    called lost, and everything arrives (close used to call lost what a request still out went on to deliver)."""
    import threading

    from pipeline.tracking import BackgroundLogger

    client = stack.admin()
    run_id = client.create_run(client.create_experiment("in-flight")).info.run_id
    sender = BackgroundLogger(stack.server.url, run_id)
    stack.server.pause()
    try:
        for step in range(1, 6):
            sender.log(step, {"loss": 1.0 / step})
        threading.Timer(3, stack.server.resume).start()
        assert sender.close(flush_s=1, in_flight_s=120) is None
    finally:
        stack.server.resume()
    assert logged_steps(client, run_id) == [1, 2, 3, 4, 5]


def test_two_cells_at_once_with_two_workers_each_lose_no_metric_and_duplicate_no_run(stack, tmp_path):
    base = stack.config("unused", num_workers=2, steps=20, checkpoint_every=10)
    base["ray"] = {"num_cpus": 4}  # two cells' trainers at once
    base["eval"].update(during_training=1, during_training_lengths=[64])  # validation tasks log too
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "writers", "base": str(tmp_path / "base.yaml"),
        "axes": {"seed": {"a": {"train.seed": 1}, "b": {"train.seed": 2}}}}))
    job = subprocess.Popen([sys.executable, "-m", "jobs.cli", "sweep", str(tmp_path / "sweep.yaml")],
                           env=stack.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # A hang guard, not a time limit: 149 s alone, 460 s beside another test file (`make test-cpu` runs two at once)
    output, _ = job.communicate(timeout=1200)
    assert job.returncode == 0, output[-3000:]
    assert "2 at a time" in output
    client = stack.admin()
    experiment = client.get_experiment_by_name("gss").experiment_id
    for cell in ("writers-a", "writers-b"):
        runs = client.search_runs([experiment], f"tags.`gss.run_name` = '{cell}'")
        assert sorted(r.data.tags.get("gss.stage", "pipeline") for r in runs) == ["eval", "pipeline", "train"]
        assert_finished_once(stack, cell, 20)
        train = training_run(client, cell)
        validated = client.get_metric_history(train.info.run_id, "eval/validation/L64/token_ppl")
        assert sorted(m.step for m in validated) == [10, 20]
