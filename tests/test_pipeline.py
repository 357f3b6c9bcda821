"""End to end on a real local Ray cluster and a real MLflow store: run, eval, compare, reeval, generate."""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.compare import compare
from jobs.reeval import reeval
from jobs.run import run_pipeline
from pipeline.config import load_config
from pipeline.evaluate import EvalError, eval_stage, suite_todo
from tests.corpus import as_overrides, fresh_process_env, run_config, write_pg19
from tests.ray_head import free_port

LENGTHS = [64, 128, 256, 1_000_000]  # the last is longer than every document: capped, not computed


@pytest.fixture(scope="module")
def finished(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    write_pg19(root / "corpus", counts=(8, 2, 2), words=(1500, 3000))
    tree = run_config(root / "out", root / "corpus", "e2e", steps=10, eval_every=10, checkpoint_every=10)
    tree["eval"] = {"lengths": LENGTHS, "splits": ["validation", "test"], "piece_tokens": 48, "batch_tokens": 256}
    overrides = as_overrides(tree)
    return overrides, run_pipeline(load_config(None, overrides))


def children(result):
    from mlflow import MlflowClient

    client = MlflowClient()
    parent = client.get_run(result["parent_run_id"])
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return client, runs


def test_run_nests_three_stages_with_metrics_per_length(finished):
    _, result = finished
    client, runs = children(result)
    assert sorted(r.data.tags["gss.stage"] for r in runs) == ["eval", "prepare", "train"]
    assert all(r.info.status == "FINISHED" for r in runs)
    evaluation = next(r for r in runs if r.data.tags["gss.stage"] == "eval")
    for split in ("validation", "test"):
        for metric in ("token_ppl", "word_ppl", "bits_per_byte"):
            history = client.get_metric_history(evaluation.info.run_id, f"{split}.{metric}")
            assert sorted(m.step for m in history) == [64, 128, 256], (split, metric)
            assert all(0 < m.value < float("inf") for m in history)
    artifacts = {a.path for a in client.list_artifacts(evaluation.info.run_id, "eval")}
    assert {"eval/ppl_vs_length.png", "eval/results.csv", "eval/results.json"} <= artifacts


def test_rerun_skips_every_stage(finished, capsys):
    overrides, result = finished
    again = run_pipeline(load_config(None, overrides))
    assert again["parent_run_id"] == result["parent_run_id"] and again["skipped"]
    out = capsys.readouterr().out
    assert "[prepare] skipped" in out and "already finished" in out and "[eval] skipped" in out
    _, runs = children(result)
    assert len(runs) == 3  # no new stage runs


def elsewhere(tmp_path):
    """Point MLflow at another store, as a fresh process would be: commands must find their own."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")


def test_compare_reads_the_results_back(finished, tmp_path):
    overrides, _ = finished
    elsewhere(tmp_path)
    rows = compare(load_config(None, overrides), out=str(tmp_path))
    assert len(rows) == 1 and rows[0]["arch"] == "gss" and sorted(rows[0]["lengths"]) == [64, 128, 256]
    assert rows[0]["train_tokens"] == 10 * 1024 and rows[0]["parameters"] > 0
    assert {"compare.md", "compare.csv", "compare.png"} <= {p.name for p in tmp_path.iterdir()}
    assert "L=256" in (tmp_path / "compare.md").read_text()


def test_reeval_evaluates_only_what_is_missing_and_then_nothing(finished, tmp_path):
    overrides, _ = finished
    elsewhere(tmp_path)
    assert reeval(load_config(None, overrides)) == []  # the run's eval covered the suite
    grown = load_config(None, [*overrides, f"eval.lengths={[32, *LENGTHS]}"])
    done = reeval(grown)
    assert [d["todo"] for d in done] == [{"validation": [32], "test": [32]}]
    assert reeval(grown) == []


def test_an_interrupted_eval_counts_for_nothing(finished):
    overrides, result = finished
    cfg = load_config(None, [*overrides, "eval.lengths=[16]"])
    with pytest.raises(EvalError, match="split 'nope' is not in"):  # after test at 16 was scored and logged
        eval_stage(cfg, todo={"test": [16], "nope": [16]})
    assert suite_todo(cfg, result["model_uri"]) == {"validation": [16], "test": [16]}


def test_generate_decodes_greedily_from_the_registered_model(finished, capsys, tmp_path):
    import mlflow
    import torch

    from pipeline.dataset import dataset_dir, read_tokenizer

    overrides, result = finished
    elsewhere(tmp_path)
    main(["generate", *overrides, "--prompt", "The river", "--max-new-tokens", "12", "--temperature", "0"])
    printed = capsys.readouterr().out.rstrip("\n")
    # the same continuation, computed here from the registered version and the dataset's tokenizer
    model = mlflow.pyfunc.load_model(result["model_uri"]).unwrap_python_model().model
    tokenizer = read_tokenizer(dataset_dir(load_config(None, overrides)))
    prompt = [tokenizer.eod_id] + tokenizer.sp.encode("The river")
    expected = tokenizer.decode(model.generate(torch.tensor([prompt]), 12, temperature=0)[0].tolist())
    assert printed == expected and printed.startswith("The river") and len(printed) > len("The river")


def test_the_console_shows_the_stages_and_the_libraries_talk_to_the_log_file(tmp_path):
    """`gss run` as users run it (a fresh process, its own local Ray cluster): a few dozen lines at most."""
    import subprocess
    import sys

    write_pg19(tmp_path / "corpus", counts=(6, 1, 1), words=(1500, 3000))
    tree = run_config(tmp_path / "out", tmp_path / "corpus", "quiet", steps=10, eval_every=10, checkpoint_every=10)
    tree["eval"] = {"lengths": [64, 128], "piece_tokens": 64}
    env = fresh_process_env()
    job = subprocess.run([sys.executable, "-m", "jobs.cli", "run", *as_overrides(tree)], env=env,
                         capture_output=True, text=True, timeout=600)
    printed = job.stdout + job.stderr
    assert job.returncode == 0, printed[-3000:]
    lines = printed.splitlines()
    assert len(lines) < 60, printed
    for stage in ("[prepare] tokenize", "[prepare] dataset", "[train]",
                  "[train] registering the final model as gss-quiet", "[eval] test       L=    64", "logs:"):
        assert stage in printed, stage
    for chatter in ("INFO", "WARNING", "Traceback", "PlacementGroupCleaner", "Reporting training result",
                    "Successfully registered model", "core_worker.cc"):
        assert chatter not in printed, chatter
    log = (tmp_path / "out" / "logs" / "gss.log").read_text()
    assert "Starting execution of Dataset" in log and "Successfully registered model 'gss-quiet'" in log
    # Ray's C++ core worker's line about the tokenizer actors, restartable as Ray Data makes them, is in the log
    assert "MapWorker(MapBatches(_TokenizeUnits))' and ID" in log and "max_restarts > 0" in log
    assert "pickle" not in log.lower()  # the model is logged as tensors and code (pipeline/registered_model.py)
    assert (tmp_path / "out" / "logs" / "ray").is_dir()  # the workers' logs: Ray's session folder


LOAD_ELSEWHERE = """
import importlib.util, json, sys
import numpy as np
# no way back to this repository: not its editable install, not the working folder
sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks = [h for h in sys.path_hooks if "editable" not in getattr(h, "__qualname__", "").lower()]
assert importlib.util.find_spec("models") is None and importlib.util.find_spec("pipeline") is None
import mlflow, torch
mlflow.set_tracking_uri(sys.argv[1])
loaded = mlflow.pyfunc.load_model(sys.argv[2])
ids = np.load(sys.argv[3])
np.save(sys.argv[4], loaded.unwrap_python_model().model(torch.as_tensor(ids))[0].detach().numpy())
np.save(sys.argv[5], np.array(loaded.predict(ids.tolist())))
print(json.dumps(loaded.predict(["The river"], params={"temperature": 0.0, "max_new_tokens": 8})))
"""


def test_the_registered_model_loads_where_this_repository_is_not_importable(finished, tmp_path):
    """A fresh Python in another folder, with neither `models` nor `pipeline` importable: the registered model
    loads, its logits are the final checkpoint's, and it generates the text it does here."""
    import json
    import subprocess
    import sys

    import mlflow
    import numpy as np
    import torch

    from models import ModelConfig, build_model
    from pipeline import checkpoint

    _, result = finished
    state = checkpoint.read(result["checkpoint"])
    model = build_model(ModelConfig(**state["model_config"])).eval()
    model.load_state_dict(state["model"])
    ids = torch.randint(0, model.cfg.vocab_size, (2, 20))
    np.save(tmp_path / "ids.npy", ids.numpy())
    job = subprocess.run([sys.executable, "-c", LOAD_ELSEWHERE, mlflow.get_tracking_uri(), result["model_uri"],
                          "ids.npy", "logits.npy", "predicted.npy"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"})
    assert job.returncode == 0, job.stderr[-3000:]
    with torch.no_grad():
        expected = model(ids)[0]
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), expected.numpy())
    np.testing.assert_allclose(np.load(tmp_path / "predicted.npy"),
                               torch.log_softmax(expected[:, -1], -1).numpy(), rtol=1e-6)
    greedy = {"temperature": 0.0, "max_new_tokens": 8}  # as LOAD_ELSEWHERE generates
    assert json.loads(job.stdout.splitlines()[-1]) == mlflow.pyfunc.load_model(result["model_uri"]).predict(
        ["The river"], params=greedy)


def gss(*args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """A `gss` command as a separate process (its own Ray connection), killed after `timeout` seconds."""
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=fresh_process_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def test_eval_and_reeval_run_on_a_new_cluster_whatever_address_an_old_one_left(finished):
    """A cluster stopped long ago left its address in Ray's temp folder (a closed port): `gss eval` and `gss reeval`
    start their own cluster and finish, where Ray's defaults would wait on that address forever."""
    overrides, _ = finished
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live under it
    (Path(ray_tmp) / "ray").mkdir()
    (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    for command in (["eval", *overrides, "eval.lengths=[48]"], ["reeval", *overrides, "eval.lengths=[40]"]):
        job = gss(*command, timeout=300, RAY_TMPDIR=ray_tmp)
        assert job.returncode == 0, job.stderr[-3000:]
        assert "(Scorer pid=" not in job.stdout + job.stderr  # workers' output stays in the logs


def test_a_dead_ray_address_is_one_line_within_a_minute(finished):
    overrides, _ = finished
    address = f"127.0.0.1:{free_port()}"
    for where in ({"RAY_ADDRESS": address}, {}):
        config = [*overrides] if where else [*overrides, f"ray.address={address}"]
        started = time.monotonic()
        job = gss("eval", *config, "eval.lengths=[48]", timeout=120, **where)
        assert time.monotonic() - started < 60
        assert job.returncode != 0
        last = job.stderr.strip().splitlines()[-1]
        assert last.startswith(f"gss eval: no Ray cluster answers at {address}") and "ray start --head" in last, last
