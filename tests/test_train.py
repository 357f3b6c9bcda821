"""`gss train` on a real local Ray cluster: two CPU workers, real checkpoints, a real MLflow store, a killed worker."""

import os

import numpy as np
import pytest
import torch

from models import build_model
from pipeline.config import TrainConfig, load_config
from pipeline.dataset import TrainRows, dataset_dir
from pipeline.progress import COMPILE_KEYS
from pipeline.train import TrainingError, learning_rate, make_optimizer, no_weight_decay, train_stage
from tests.corpus import (
    TINY_MODEL,
    as_overrides,
    metric_steps,
    prepared,
    run_config,
    train_killing_a_worker,
    train_run,
)
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_cluster):
    return prepared(tmp_path_factory.mktemp("train"))


def test_schedule():
    tc = TrainConfig(lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert learning_rate(0, tc) == pytest.approx(0.1) and learning_rate(9, tc) == pytest.approx(1.0)
    assert learning_rate(60, tc) == pytest.approx(0.55) and learning_rate(110, tc) == pytest.approx(0.1)


@pytest.mark.parametrize("arch", ["gss", "dss", "hybrid"])
def test_the_ssm_parameters_and_vectors_get_no_weight_decay(arch):
    model = build_model(tiny_config(arch))
    groups = make_optimizer(model, TrainConfig(weight_decay=0.1), no_weight_decay(model)).param_groups
    decay, no_decay = (group["params"] for group in groups)
    names = {id(p): name for name, p in model.named_parameters()}
    ssm = {name for name, _ in model.named_parameters() if ".ssm." in name}
    assert ssm and ssm <= {names[id(p)] for p in no_decay}  # Λ, C and D, matrices or not
    assert {names[id(p)] for p in decay} == {
        name for name, p in model.named_parameters() if p.dim() >= 2 and name not in ssm}


def test_row_order_is_seeded_resumable_and_covers_each_epoch_once(corpus):
    import pyarrow.parquet as pq

    cfg = load_config(None, as_overrides(run_config(corpus / "out", corpus / "corpus", "base")))
    rows = TrainRows(dataset_dir(cfg), seed=3)
    n = rows.rows_per_epoch
    epoch = rows.rows(0, n)
    assert epoch.shape == (n, 64 + 1)  # seq_len inputs and seq_len targets per row
    assert len({r.tobytes() for r in epoch}) == n  # every full row exactly once (rows are distinct text)
    lengths = [len(r) for f in rows.files for r in pq.read_table(os.path.join(rows.url, f))["tokens"].to_pylist()]
    assert set(lengths[:-1]) == {65} and n == lengths.count(65)  # the split's short last row is no training row
    np.testing.assert_array_equal(TrainRows(dataset_dir(cfg), seed=3).rows(n // 2, 5), epoch[n // 2: n // 2 + 5])
    assert not np.array_equal(TrainRows(dataset_dir(cfg), seed=4).rows(0, 5), epoch[:5])
    assert not np.array_equal(rows.rows(n, 5), epoch[:5])  # the next epoch is reshuffled


@pytest.mark.parametrize("workers", [2, 4])
def test_the_hosts_load_together_exactly_the_global_batch_of_one_host(corpus, workers):
    """Multi-host SPMD (torch_xla 2.9's CPU runtime cannot run two processes as one: each sees only its own
    devices), shown on the rows instead: at every step the workers' micro-batches are, together, the rows one
    worker loads for the same global batch; a resume at step k needs nothing but k."""
    from pipeline.backends import Backend
    from pipeline.train import StepBatches

    dataset = dataset_dir(load_config(None, as_overrides(run_config(corpus / "out", corpus / "corpus", "base"))))
    host = Backend("cpu", torch.device("cpu"), None)

    def loaded(num_workers: int, rank: int, step: int) -> list[bytes]:
        tc = TrainConfig(global_batch_tokens=16 * 64, num_workers=num_workers, micro_batch=2, seed=5)
        return [row.tobytes() for part in StepBatches(dataset, tc, rank, host).host_rows(step) for row in part]

    for step in (0, 1, 7, 1000):  # 1000: beyond the first epoch
        one_host = loaded(1, 0, step)
        assert len(one_host) == 16
        assert sorted(sum((loaded(workers, rank, step) for rank in range(workers)), [])) == sorted(one_host)


def test_two_workers_train_and_mlflow_has_run_params_metrics_and_model(corpus, record_property):
    import mlflow

    cfg = load_config(None, [*as_overrides(run_config(corpus / "out", corpus / "corpus", "two", steps=40,
                                                      eval_every=20, checkpoint_every=20)),
                             "eval.during_training=1", "eval.during_training_lengths=[32, 128]"])
    out = train_stage(cfg)
    client = mlflow.MlflowClient()
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2" and run.data.params["model.arch"] == "gss"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    record_property("loss_drop", losses[0] - losses[-1])
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5
    assert {"val_loss", "tokens_per_second", "grad_norm", "lr", "peak_memory_mb"} <= set(run.data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    # Ray Train's validation tasks scored each checkpoint (steps 20 and 40) at both lengths, into this run
    for length in (32, 128):
        during = client.get_metric_history(run.info.run_id, f"eval/validation/L{length}/token_ppl")
        assert sorted(m.step for m in during) == [20, 40] and all(1 < m.value < 1e4 for m in during), during
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "eval_during_training")}
    assert plots == {"eval_during_training/step_0000020.png", "eval_during_training/step_0000040.png"}
    [used] = run.inputs.dataset_inputs  # the dataset as an MLflow input, its digest the identity hash in its name
    dataset = dataset_dir(cfg)
    assert used.dataset.digest == dataset.rsplit("-", 1)[-1] and used.dataset.name == os.path.basename(dataset)
    assert [(t.key, t.value) for t in used.tags] == [("mlflow.data.context", "training")]
    version = client.get_model_version_by_alias("gss-two", "current")
    assert version.run_id == run.info.run_id
    model = mlflow.pyfunc.load_model("models:/gss-two@current").unwrap_python_model().model
    assert model.cfg.n_layers == 2
    assert train_stage(cfg)["skipped"]  # finished: a re-run does nothing
    other = load_config(None, [*as_overrides(run_config(corpus / "out", corpus / "corpus", "two", steps=40)),
                               "train.model.n_layers=3"])
    with pytest.raises(TrainingError, match="'two' already exists .* another model config or dataset"):
        train_stage(other)  # the same name for another model is an error, not a silent skip


def test_a_killed_worker_resumes_from_the_last_checkpoint_in_the_same_mlflow_run(corpus):
    output = train_killing_a_worker(corpus, run_config(corpus / "out", corpus / "corpus", "fault", steps=120,
                                                       checkpoint_every=20, eval_every=100))
    assert "[train] resumed from the checkpoint at step" in output, output[-5000:]

    run = train_run(corpus, "fault")
    assert run.info.status == "FINISHED" and max(metric_steps(run, "loss")) == 120
    resumed = list(metric_steps(run, "resumed_at_step"))
    assert resumed and resumed[0] % 20 == 0  # from a checkpoint


def test_a_compiled_run_reports_its_compile_and_a_later_run_finds_the_graphs_in_the_cache(corpus, capsys,
                                                                                          record_property):
    """train.compile=true on the cpu (off there by default): the run logs torch.compile's time and Inductor's cache
    lookups right after its first step, and the driver says them on the terminal. Inductor's cache is under the root,
    so a second run (as a restart on a fresh node would) finds every graph there. A model with no layers (embedding,
    norm, head): a cold compile of the tiny model's two layers alone takes about a minute on 2 CPU cores."""
    def compiled_run(name: str) -> tuple[dict[str, dict[int, float]], str]:
        tree = run_config(corpus / "out", corpus / "corpus", name, steps=2, num_workers=1, global_batch_tokens=256,
                          compile=True, log_every=1, eval_every=1000, checkpoint_every=1000)
        tree["train"]["model"] = {**TINY_MODEL, "n_layers": 0}
        train_stage(load_config(None, as_overrides(tree)))
        run = train_run(corpus, name)
        return {key: metric_steps(run, key) for key in COMPILE_KEYS}, capsys.readouterr().out

    def line(logged: dict[str, dict[int, float]]) -> str:  # what the driver says: the first step's compile
        seconds, hits, misses = (logged[key][1] for key in COMPILE_KEYS)
        return (f"[train] torch.compile compiled the model in {seconds:.1f} s; Inductor's cache had {hits:.0f} of its "
                f"{hits + misses:.0f} graphs\n")

    first, said = compiled_run("compiled")
    record_property("compile_seconds_cold", first["compile_seconds"][2])  # training and validation graphs
    assert first["compile_seconds"][1] > 0 and first["fx_graph_cache_misses"][1] > 0  # the training graphs
    assert first["fx_graph_cache_hits"][2] == 0
    assert first["fx_graph_cache_misses"][2] > first["fx_graph_cache_misses"][1]  # and validation's, at the last step
    assert line(first) in said and "had 0 of its" in line(first), said
    assert any((corpus / "out" / "inductor_cache" / "fxgraph").iterdir())

    again, said = compiled_run("compiled-again")
    record_property("compile_seconds_cached", again["compile_seconds"][2])
    assert again["fx_graph_cache_misses"][2] == 0  # every graph, the validation's too, came from the first run
    assert again["fx_graph_cache_hits"][2] == first["fx_graph_cache_misses"][2]
    graphs = first["fx_graph_cache_misses"][1]
    assert line(again) in said and f"had {graphs:.0f} of its {graphs:.0f} graphs" in line(again), said


def test_a_diverging_loss_stops_with_a_clear_error(corpus):
    import mlflow

    # an absurd learning rate: the first update is fine to store, the next forward overflows
    tree = run_config(corpus / "out", corpus / "corpus", "nan", steps=40, lr=1e37, warmup_steps=1,
                      checkpoint_every=1)
    with pytest.raises(TrainingError, match=r"NaN/inf at step \d+; the last good checkpoint is kept \(/"):
        train_stage(load_config(None, as_overrides(tree)))
    runs = mlflow.search_runs(experiment_names=["gss"], filter_string="tags.`gss.train_name` = 'nan'",
                              output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_after_the_last_step_the_bar_says_what_training_waits_for(tmp_path):
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from pipeline.progress import TrainingProgress

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("bar")).info.run_id
    descriptions = []
    with TrainingProgress(uri, run_id, steps=4, tokens_per_step=10, finishing="scoring the final checkpoint",
                          poll_s=3600) as progress:
        for step in (2, 4):
            client.log_batch(run_id, [Metric(key, value, 0, step) for key, value in
                                      {"loss": 1.0, "tokens_per_second": 5.0, "tokens_seen": 10.0 * step}.items()])
            progress._update()
            descriptions.append((progress.bar.n, progress.bar.desc))
    assert descriptions == [(2, "[train]"), (4, "[train] scoring the final checkpoint")]
    assert progress.bar.desc == "[train]"  # closed: the bar is the steps alone


def test_a_bar_closed_while_mlflow_is_away_says_so_beside_its_steps():
    """Workers buffer their metrics through an outage, so training can end inside one: the bar then stops short
    of its steps, and says why."""
    from pipeline.progress import TrainingProgress

    with TrainingProgress("http://127.0.0.1:9", "no-run", steps=4, tokens_per_step=10, finishing="",
                          poll_s=3600) as progress:
        pass
    assert progress.bar.n == 0
    assert progress.bar.desc.startswith("[train] MLflow unreachable since ")
