"""`gss sweep` on the local Ray cluster: 2 architectures × 2 tiny corpora, a cell whose config is wrong, one
comparison; a re-run trains nothing."""

import pytest
import yaml

from jobs.sweep import SWEEP_TAG, load_sweep, sweep
from pipeline.config import ConfigError
from tests.corpus import run_config, write_pg19


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("sweep")
    for seed, corpus in enumerate(("a", "b")):
        write_pg19(root / corpus, counts=(6, 1, 1), words=(1500, 3000), seed=seed)
    base = run_config(root / "out", root / "a", "unused", steps=10, eval_every=10, checkpoint_every=10)
    base["eval"] = {"lengths": [64, 128], "piece_tokens": 64}
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    (root / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "base": "base.yaml", "set": {"train.steps": 10},
        "axes": {"corpus": {"a": {"data.source.path": str(root / "a")}, "b": {"data.source.path": str(root / "b")}},
                 "arch": {"gss": {"train.preset": "small-gss"}, "transformer": {"train.preset": "small-transformer"},
                          "typo": {"train.preset": "small-gsss"}}},
    }, sort_keys=False))  # the axes in this order: cells are named <sweep>-<corpus>-<arch>
    return root / "sweep.yaml"


def test_a_sweep_runs_every_cell_reports_the_broken_one_and_compares_them(sweep_file):
    from mlflow import MlflowClient

    first = sweep(str(sweep_file))
    assert sorted(first["done"]) == ["tiny-a-gss", "tiny-a-transformer", "tiny-b-gss", "tiny-b-transformer"]
    assert sorted(first["failed"]) == ["tiny-a-typo", "tiny-b-typo"]
    assert "train.preset='small-gsss'" in first["failed"]["tiny-a-typo"]
    client = MlflowClient()
    parents = client.search_runs(client.get_experiment_by_name("gss").experiment_id, f"tags.`{SWEEP_TAG}` = 'tiny'")
    assert sorted(r.data.tags[f"{SWEEP_TAG}.arch"] for r in parents) == ["gss", "gss", "transformer", "transformer"]
    assert all(r.info.status == "FINISHED" for r in parents)
    rows = first["rows"]["token_ppl"]
    assert len(rows) == 4 and all(set(r["lengths"]) == {64, 128} for r in rows)
    out = sweep_file.parent / "out" / "sweeps" / "tiny"
    assert (out / "sweep.png").exists() and (out / "word_ppl" / "compare.csv").read_text().count("\n") == 5

    trained = {r.info.run_id for r in client.search_runs([parents[0].info.experiment_id], "tags.`gss.stage` = 'train'")}
    again = sweep(str(sweep_file))  # finished cells: every stage skipped
    assert sorted(again["done"]) == sorted(first["done"])
    assert {r.info.run_id for r in client.search_runs([parents[0].info.experiment_id],
                                                      "tags.`gss.stage` = 'train'")} == trained


def test_a_sweep_file_is_checked(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "x", "axes": {"a": {"1": {}}}, "exclude": [{"a": "2"}]}))
    with pytest.raises(ConfigError, match="exclude .* a=2 is not a value of the axes"):
        load_sweep(str(tmp_path / "s.yaml"))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"name": "x", "axes": {"a": {"1": {}}}, "axis": {}}))
    with pytest.raises(ConfigError, match="unknown: \\['axis'\\]"):
        load_sweep(str(tmp_path / "t.yaml"))
