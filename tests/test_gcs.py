"""Every stage on gs:// against a local GCS server (tests/gcs.py): the run's root in one bucket, the corpus in
another laid out like the public gs://deepmind-gutenberg and read as configs/paper-pg19.yaml reads it; the
cloud's usual failures as errors that say what to do."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from pipeline.config import load_config
from pipeline.sources import SourceError, split_files
from tests.corpus import (
    as_overrides,
    fresh_process_env,
    kill_rank_1_once_checkpointed,
    run_config,
    wait_for,
    write_pg19,
)

pytestmark = pytest.mark.gcs
ROOT = Path(__file__).resolve().parents[1]


def upload(fs, folder: Path, url: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{url.removeprefix('gs://')}/{path.relative_to(folder)}", path.read_bytes())


@pytest.fixture(scope="module")
def gutenberg(gcs, tmp_path_factory):
    """A bucket named and laid out like gs://deepmind-gutenberg (train/, validation/, test/ of .txt books)."""
    corpus = tmp_path_factory.mktemp("pg19")
    write_pg19(corpus, counts=(8, 2, 2), words=(1500, 3000))
    upload(gcs.filesystem(), corpus, gcs.bucket("deepmind-gutenberg"))
    return load_config(ROOT / "configs" / "paper-pg19.yaml").data.source  # its path, kind and storage options


def gss(command: list[str], env: dict, cwd: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *command], env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def finished(job: subprocess.Popen) -> str:
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, output[-3000:]
    return output


def test_the_public_pg19_bucket_layout_reads_anonymously(gutenberg):
    assert gutenberg.path == "gs://deepmind-gutenberg" and gutenberg.storage_options == {"token": "anon"}
    files = split_files(gutenberg, ["train", "validation", "test"])
    assert [len(files[s]) for s in ("train", "validation", "test")] == [8, 2, 2]
    assert all(f.startswith("gs://deepmind-gutenberg/train/") and f.endswith(".txt") for f in files["train"])


def test_a_whole_run_on_gs_with_a_worker_killed_then_reeval_compare_generate(gcs, gutenberg, tmp_path):
    """`gss run` with root=gs://: dataset, checkpoints, eval results, plots and MLflow artifacts land in the
    bucket (the tracking store stays local), a SIGKILLed worker resumes from its gs:// checkpoint, and the
    other commands work from that state. Nothing lands in the working folder."""
    import mlflow

    root = f"{gcs.bucket('gss-runs')}/e2e"
    tree = run_config(root, "unused", "gcs", steps=40, checkpoint_every=10, eval_every=20)
    tree["data"]["source"] = {"kind": gutenberg.kind, "path": gutenberg.path,
                              "storage_options": gutenberg.storage_options}
    tree["eval"] = {"lengths": [64, 128], "piece_tokens": 64}
    tree["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    config = tmp_path / "gcs.yaml"  # one config for every command, as a user keeps it
    config.write_text(yaml.safe_dump(tree))
    env = fresh_process_env(**gcs.env)
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    fs = gcs.filesystem()
    bucket_root = root.removeprefix("gs://")
    output = kill_rank_1_once_checkpointed(gss(["run", str(config)], env, cwd), fs, f"{bucket_root}/train/gcs")
    assert "[train] resumed from the checkpoint at step" in output, output[-5000:]

    fs.invalidate_cache()
    stored = fs.find(bucket_root)
    assert any(p.endswith("/manifest.json") for p in stored if "/datasets/" in p), stored
    assert any("/train/gcs/checkpoint_" in p and p.endswith("/state.pt") for p in stored), stored
    assert {f"{bucket_root}/eval/gcs/{name}" for name in ("results.json", "ppl_vs_length.png")} <= set(stored)
    artifacts = [p for p in stored if "/mlartifacts/" in p]
    assert any(p.endswith("/MLmodel") for p in artifacts) and any(p.endswith("ppl_vs_length.png") for p in artifacts)

    mlflow.set_tracking_uri(tree["tracking"]["uri"])
    runs = mlflow.search_runs(experiment_names=["gss"], filter_string="tags.`gss.train_name` = 'gcs'",
                              output_format="list")
    assert len(runs) == 1 and runs[0].info.artifact_uri.startswith(f"{root}/mlartifacts/")
    history = mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "resumed_at_step")
    assert history and history[0].value % 10 == 0  # from a checkpoint

    reevaluated = finished(gss(["reeval", str(config), "eval.lengths=[32, 64, 128]"], env, cwd))
    assert "L=    32" in reevaluated, reevaluated[-3000:]
    finished(gss(["compare", str(config)], env, cwd))
    fs.invalidate_cache()
    assert fs.exists(f"{bucket_root}/compare/gss/compare.png")
    text = finished(gss(["generate", str(config), "--prompt", "The river", "--max-new-tokens", "8"], env, cwd))
    assert "The river" in text
    assert list(cwd.iterdir()) == []  # nothing of the run on local disk (logs: a cache under the temp folder)


def test_a_root_in_a_bucket_that_does_not_exist_fails_before_any_work(gcs, tmp_path):
    tree = run_config("gs://no-such-bucket/run", tmp_path, "missing")
    with pytest.raises(SystemExit, match=r"gss prepare: cannot write to root: gs://no-such-bucket/run: the bucket "
                                         r"'no-such-bucket' does not exist.*gcloud storage buckets create"):
        main(["prepare", *as_overrides(tree)])


@pytest.fixture
def forbidden(gcs):
    """gs:// through a client whose every request the server refuses with 403, as gcsfs sees a bucket these
    credentials have no rights on (the emulator itself cannot refuse)."""
    import fsspec
    import gcsfs
    from gcsfs.retry import validate_response

    class Forbidding(gcsfs.GCSFileSystem):
        async def _request(self, method, path, *args, **kwargs):
            body = b'{"error": {"code": 403, "message": "caller does not have storage.objects.create access"}}'
            validate_response(403, body, path, args)

    fsspec.register_implementation("gs", Forbidding, clobber=True)
    yield
    fsspec.register_implementation("gs", gcsfs.GCSFileSystem, clobber=True)


def test_no_permission_on_the_root_or_the_corpus_says_which_role_is_missing(forbidden, tmp_path):
    tree = run_config("gs://someone-elses/run", tmp_path, "denied")
    with pytest.raises(SystemExit, match=r"gss prepare: cannot write to root: gs://someone-elses/run: permission "
                                         r"denied \(Forbidden.*roles/storage.objectAdmin on gs://someone-elses"):
        main(["prepare", *as_overrides(tree)])
    source = load_config(None, ["data.source.path=gs://someone-elses/pg19", "data.source.kind=pg19"]).data.source
    with pytest.raises(SourceError, match="cannot read the corpus.*permission denied.*roles/storage.objectViewer"):
        split_files(source, ["train"])


def test_storage_going_away_mid_write_leaves_nothing_half_done_and_the_same_command_goes_on(gcs, tmp_path):
    """The server is killed while `gss prepare` writes its units, then while `gss train` checkpoints: each
    command ends with one line saying what happened and what to do, nothing half-written
    counts as done, and with the server back the same command goes on: the dataset whole (every shard as its
    manifest says; that a resumed prepare writes the bytes of an uninterrupted one is tests/test_prepare.py's), the
    training resumed from its last whole checkpoint."""
    import mlflow
    import pyarrow.parquet as pq

    from pipeline.dataset import dataset_dir, is_complete, verify_shards

    fs = gcs.filesystem()
    write_pg19(tmp_path / "corpus", counts=(12, 2, 2), words=(1500, 3000), seed=3)
    upload(fs, tmp_path / "corpus", f"{gcs.bucket('flaky-corpus')}/pg19")
    env = fresh_process_env(**gcs.env)

    def overrides(root: str) -> list[str]:
        tree = run_config(f"{gcs.bucket('flaky-runs')}/{root}", "gs://flaky-corpus/pg19", "flaky", steps=20,
                          checkpoint_every=5, eval_every=1000)
        tree["data"]["source"] |= {"storage_options": {"token": "anon"}, "unit_bytes": 20_000}  # a book a unit
        tree["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
        return as_overrides(tree)

    def fails_while_the_server_is_down(command: list[str], written: Path) -> str:
        """Start `command`, kill the server once `written` exists on its disk, restart it once the command ended."""
        job = gss(command, env, tmp_path)
        wait_for(job, written.exists, str(written), seconds=240)
        gcs.stop()
        output, _ = job.communicate(timeout=300)
        gcs.start()
        last = output.strip().splitlines()[-1]  # what the command says, after Ray's own one-line error reports
        assert job.returncode != 0 and last.startswith(f"gss {command[0]}"), output[-3000:]
        assert "does not answer" in last and "run the same command again" in last, output[-3000:]
        fs.invalidate_cache()
        return output

    dataset = dataset_dir(load_config(None, overrides("interrupted")))
    on_disk = gcs.folder / "data" / dataset.removeprefix("gs://")

    first_unit = on_disk / "_work" / "units" / "train" / "unit-00000.json"  # its sidecar, written last
    fails_while_the_server_is_down(["prepare", *overrides("interrupted")], first_unit)
    assert not is_complete(dataset)
    for shard in fs.glob(f"{dataset.removeprefix('gs://')}/**/*.parquet"):
        pq.read_metadata(fs.open(shard, "rb"))  # whole, or not there at all
    finished(gss(["prepare", *overrides("interrupted")], env, tmp_path))
    fs.invalidate_cache()
    assert is_complete(dataset) and verify_shards(dataset, ["train", "validation", "test"]) == []

    run_dir = gcs.folder / "data" / "flaky-runs" / "interrupted" / "train" / "flaky"
    fails_while_the_server_is_down(["train", *overrides("interrupted")], run_dir / "checkpoint_manager_snapshot.json")
    output = finished(gss(["train", *overrides("interrupted")], env, tmp_path))
    assert "registered gss-flaky version 1" in output, output[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["gss"], filter_string="tags.`gss.train_name` = 'flaky'",
                             output_format="list")[0]
    client = mlflow.MlflowClient()
    resumed = [m.value for m in client.get_metric_history(run.info.run_id, "resumed_at_step")]
    assert resumed and all(step > 0 and step % 5 == 0 for step in resumed), resumed  # from a whole checkpoint
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == 20
