"""One writer per run (pipeline/lease.py): the lease on a folder, on local paths and on gs:// (the local GCS server);
then two `gss train` of one run started together, and a holder killed mid-training."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.lease import HOST, LEASE, Lease, LeaseHeld, _store, hold_lease
from pipeline.storage import StorageError, absolute, explain, join, storage_failure
from tests.corpus import as_overrides, metric_steps, prepared, run_config, start_train, train_run, wait_for
from tests.gcs import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", pytest.param("gs", marks=pytest.mark.gcs)])
def folder(request, tmp_path) -> str:
    """A folder a command writes: local, or in a bucket of the local GCS server."""
    if request.param == "local":
        return str(tmp_path / "train" / "run")
    return f"{request.getfixturevalue('gcs').bucket('leases')}/{tmp_path.name}/train/run"


def url(folder: str) -> str:
    return join(absolute(folder), LEASE)


def record(folder: str) -> dict | None:
    data, _ = _store(url(folder)).read()
    return json.loads(data) if data else None


def race(folder: str, n: int, stale_s: float) -> tuple[list[Lease], list[LeaseHeld]]:
    """`n` threads take the lease at the same moment."""
    start = threading.Barrier(n)

    def take(_):
        start.wait()
        try:
            return Lease.take(url(folder), "gss train", stale_s)
        except LeaseHeld as e:
            return e

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(take, range(n)))
    return [r for r in results if isinstance(r, Lease)], [r for r in results if isinstance(r, LeaseHeld)]


def test_every_change_of_the_lease_file_is_a_compare_and_swap(folder):
    store = _store(url(folder))
    assert store.read() == (None, None)
    first = store.write(b'{"n": 1}', None)
    assert first is not None and store.write(b'{"n": 0}', None) is None  # create-only: it exists
    assert store.read() == (b'{"n": 1}', first)  # the version of the very bytes read
    second = store.write(b'{"n": 2}', first)
    assert second not in (None, first) and store.write(b'{"n": 3}', first) is None  # replacing a stale version
    assert store.read() == (b'{"n": 2}', second)
    assert store.delete(second) and store.read() == (None, None)
    assert not store.delete(second) and store.write(b'{"n": 3}', second) is None  # it is gone


def test_deleting_a_stale_version_leaves_the_newer_one(folder, request):
    if folder.startswith("gs://"):  # GCS honours the precondition; the tests' server does not
        request.applymarker(pytest.mark.xfail(strict=True, reason="fake-gcs-server ignores ifGenerationMatch on "
                                                                  "DELETE"))
    store = _store(url(folder))
    old = store.write(b'{"n": 1}', None)
    new = store.write(b'{"n": 2}', old)
    assert not store.delete(old) and store.read() == (b'{"n": 2}', new)


@pytest.mark.gcs
def test_a_lease_on_gs_the_storage_refuses_or_that_gets_no_answer_is_a_storage_failure_in_words(gcs, monkeypatch,
                                                                                                tmp_path):
    """As gcsfs's failures were, so that `gss` says them in one line (jobs/cli.py: storage_failure, explain)."""
    from google.api_core.exceptions import Forbidden
    from google.cloud.storage import Blob

    def said(lease_url: str) -> str:
        with pytest.raises(Exception) as failed:
            Lease.take(lease_url, "gss train")
        failure = storage_failure(failed.value)
        assert failure is not None, repr(failed.value)
        return explain(lease_url, failure)

    missing = f"gs://no-such-bucket/{tmp_path.name}/{LEASE}"
    assert said(missing).startswith(f"{missing}: the bucket 'no-such-bucket' does not exist")

    lease_url = f"{gcs.bucket('leases')}/{tmp_path.name}/{LEASE}"

    def refused(*args, **kwargs):  # as the server answers credentials without the role (the emulator cannot)
        raise Forbidden("POST /upload: caller does not have storage.objects.create access")

    with monkeypatch.context() as m:
        m.setattr(Blob, "upload_from_string", refused)
        assert said(lease_url).startswith(f"{lease_url}: permission denied (403 POST /upload: caller does not have")

    nobody = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", nobody)
    monkeypatch.setattr("pipeline.lease.GCS_RETRY_S", 1.0)
    assert said(lease_url).startswith(f"{lease_url}: the GCS emulator at STORAGE_EMULATOR_HOST={nobody} does not "
                                      "answer (")


def test_of_many_taking_a_lease_at_once_exactly_one_wins_and_the_others_are_told_who(folder):
    won, refused = race(folder, 8, stale_s=30)
    assert len(won) == 1 and len(refused) == 7
    assert record(folder)["token"] == won[0].record["token"]
    holder = re.escape(f"{folder} is being written by gss train on host {HOST}, pid {os.getpid()}, since ")
    remedy = re.escape(", when its lease lapses, or delete " + url(folder))
    expected = (holder + r"[-\d]+ [:\d]+ \w+ \(last heartbeat [01] s ago\): wait for it to finish, or stop it; if "
                r"that process is dead, run this again in (29|30) s" + remedy)
    assert re.fullmatch(expected, str(refused[0])), refused[0]
    won[0].release()
    assert record(folder) is None


def test_the_holder_renews_its_heartbeat_and_a_stalled_lease_is_taken_over_by_one(folder, capsys):
    held = Lease.take(url(folder), "gss prepare", stale_s=1.5)  # a heartbeat every 0.25 s
    first = record(folder)
    time.sleep(0.8)
    assert record(folder)["token"] == first["token"] and record(folder)["heartbeat"] > first["heartbeat"]

    held._stop.set()  # the holder freezes: no more heartbeats, and after 1.5 s its lease is anyone's
    held._thread.join()
    time.sleep(1.6)
    won, refused = race(folder, 4, stale_s=1.5)
    assert len(won) == 1 and len(refused) == 3  # the takeover is conditional too
    out = capsys.readouterr().out
    assert f"[lease] took over the lease of {folder} from gss prepare on host {HOST}, pid {os.getpid()}: last " \
           "heartbeat " in out and "s ago, past the 1.5 s timeout" in out

    held.renew()  # the frozen holder wakes up: not its lease any more
    assert "was taken over by gss train" in held.lost
    held.release()  # deletes only its own
    assert record(folder)["token"] == won[0].record["token"]
    won[0].release()
    assert record(folder) is None


def test_a_lease_whose_holder_on_this_host_has_ended_is_taken_over_at_once(folder, capsys):
    subprocess.run([sys.executable, "-c", "import os, sys; from pipeline.lease import Lease; "
                    "Lease.take(sys.argv[1], 'gss eval'); os._exit(0)", url(folder)], cwd=ROOT, check=True)
    dead = record(folder)
    lease = Lease.take(url(folder), "gss eval")  # the 60 s timeout has not passed, but that process is gone
    # 0 s, or 1 on a loaded machine: the child's exit and our reads lie between its heartbeat and the takeover
    assert re.search(f"from gss eval on host {HOST}, pid {dead['pid']}: last heartbeat [01] s ago, its process has "
                     "ended", capsys.readouterr().out)
    lease.release()


def test_hold_lease_is_reentrant_in_one_process_and_says_when_the_lease_was_taken_from_it(tmp_path):
    run, dataset = str(tmp_path / "train" / "run"), str(tmp_path / "datasets" / "d")
    with hold_lease(run, "gss run") as outer:
        with hold_lease(run, "gss train") as inner, hold_lease(dataset, "gss prepare"):  # as `gss run` does
            assert inner is outer and record(dataset)["what"] == "gss prepare"
            with pytest.raises(LeaseHeld, match="is being written by gss run"):  # as another process would be
                Lease.take(url(run), "gss train")
        assert record(run)["token"] == outer.record["token"] and record(dataset) is None
    assert record(run) is None

    with pytest.raises(ConnectionError), hold_lease(run, "gss train"):
        raise ConnectionError("the storage does not answer")
    assert record(run)["what"] == "gss train"  # not deleted (no waiting on retries): it lapses, or at once for the
    os.remove(url(run))  # next launch on this host, which finds this process gone

    with pytest.raises(StorageError, match="was deleted while this process held it"):
        with hold_lease(run, "gss train", stale_s=0.6) as lease:
            os.remove(url(run))  # e.g. someone deleting it by hand
            deadline = time.time() + 5
            while not lease.lost and time.time() < deadline:
                time.sleep(0.05)


# ---------------------------------------------------------------------------------------------------
# `gss train`, twice at once, and a holder killed mid-training


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_cluster):
    from pipeline.config import load_config
    from pipeline.tracking import Tracking

    root = prepared(tmp_path_factory.mktemp("lease"), counts=(4, 2, 2), words=(2000, 3000))
    # the MLflow store made once, here: two launches at once would both create its tables
    Tracking.of(load_config(None, as_overrides(run_config(root / "out", root / "corpus", "base"))))
    return root


def tree(corpus: Path, name: str, **train) -> dict:
    return run_config(corpus / "out", corpus / "corpus", name, num_workers=1, eval_every=1000, **train)


def versions(corpus: Path, name: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{corpus / 'out' / 'mlflow.db'}")
    return client.search_model_versions(f"name = 'gss-{name}'")


def test_two_launches_of_one_run_one_is_refused_in_one_line_and_the_other_trains_it(corpus):
    first = start_train(tree(corpus, "twice", steps=10, checkpoint_every=10))
    time.sleep(0.5)
    second = start_train(tree(corpus, "twice", steps=10, checkpoint_every=10))
    outputs = [job.communicate(timeout=300)[0] for job in (first, second)]
    codes = [job.returncode for job in (first, second)]
    assert sorted(codes) == [0, 1], outputs
    refused = outputs[codes.index(1)].strip().splitlines()
    assert refused[-1].startswith(f"gss train: {corpus / 'out' / 'train' / 'twice'} is being written by gss train on "
                                  f"host {HOST}, pid {[first, second][codes.index(0)].pid}, since "), refused[-5:]
    assert "[train] twice:" not in "\n".join(refused)  # it stopped before training
    assert "registered gss-twice version 1" in outputs[codes.index(0)]
    assert len(versions(corpus, "twice")) == 1
    assert not (corpus / "out" / "train" / "twice" / LEASE).exists()


def test_a_killed_holder_s_lease_is_taken_over_after_the_timeout_and_the_run_resumes(corpus):
    run_dir = corpus / "out" / "train" / "killed"
    stale = {"GSS_LEASE_STALE_S": "3"}
    job = start_train(tree(corpus, "killed", steps=20, checkpoint_every=5), **stale)
    wait_for(job, lambda: (run_dir / "checkpoint_manager_snapshot.json").exists(), "a checkpoint")
    job.send_signal(signal.SIGKILL)
    job.wait()
    lease = json.loads((run_dir / LEASE).read_text())
    assert lease["pid"] == job.pid
    # as if it had run on another machine, where this one cannot see that the process is gone: only the timeout tells
    (run_dir / LEASE).write_text(json.dumps({**lease, "host": "another-host"}))
    time.sleep(max(0.0, lease["heartbeat"] + 3 - time.time()))

    again = start_train(tree(corpus, "killed", steps=20, checkpoint_every=5), **stale)
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0, output[-3000:]
    assert f"[lease] took over the lease of {run_dir} from gss train on host another-host, pid {job.pid}: last " \
           "heartbeat " in output and "s ago, past the 3 s timeout" in output, output[-3000:]
    run = train_run(corpus, "killed")
    resumed = list(metric_steps(run, "resumed_at_step"))
    assert resumed and all(step > 0 and step % 5 == 0 for step in resumed), resumed  # from a whole checkpoint
    assert f"[train] resumed from the checkpoint at step {resumed[-1]}" in output
    assert run.info.status == "FINISHED" and max(metric_steps(run, "loss")) == 20
    assert len(versions(corpus, "killed")) == 1
