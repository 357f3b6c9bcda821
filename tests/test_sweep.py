"""`gss sweep` on the local Ray cluster: 2 architectures × 2 tiny corpora, a cell whose config is wrong, one
comparison; a re-run trains nothing."""

import pytest
import yaml

from jobs.sweep import Cell, Sweep, _plot_best, best_lines, group_curves, load_sweep, select, summarize, sweep
from pipeline.config import ConfigError
from pipeline.tracking import Tag, sweep_cells
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


def test_a_sweep_runs_every_cell_reports_the_broken_one_and_compares_them(sweep_file, monkeypatch):
    from mlflow import MlflowClient

    # the store as a user's $MLFLOW_TRACKING_URI names it, in this shell only: the cells run in the cluster's workers
    monkeypatch.setattr("pipeline.tracking._USER_URI", f"sqlite:///{sweep_file.parent / 'shell.db'}")
    first = sweep(str(sweep_file))
    assert sorted(first["done"]) == ["tiny-a-gss", "tiny-a-transformer", "tiny-b-gss", "tiny-b-transformer"]
    assert sorted(first["failed"]) == ["tiny-a-typo", "tiny-b-typo"]
    assert "train.preset='small-gsss'" in first["failed"]["tiny-a-typo"]
    client = MlflowClient()
    parents = sweep_cells(client, client.get_experiment_by_name("gss").experiment_id, "tiny")
    assert sorted(r.data.tags[Tag.sweep_axis("arch")] for r in parents) == ["gss", "gss", "transformer", "transformer"]
    assert all(r.info.status == "FINISHED" for r in parents)
    rows = first["rows"]["token_ppl"]
    assert len(rows) == 4 and all(set(r["lengths"]) == {64, 128} for r in rows)
    out = sweep_file.parent / "out" / "sweeps" / "tiny"
    assert (out / "sweep.png").exists() and (out / "word_ppl" / "compare.csv").read_text().count("\n") == 5
    for corpus in ("a", "b"):  # the best line of each panel: the architecture with the lower perplexity at L=64
        scores = {r["run"].rsplit("-", 1)[1]: r["lengths"][64] for r in rows if r["run"].startswith(f"tiny-{corpus}-")}
        assert first["best"][corpus]["line"] == min(scores, key=scores.get)
    summary = (out / "summary.md").read_text()
    assert "**corpus = a**" in summary and f"Best arch for corpus = b: **{first['best']['b']['line']}**" in summary

    trained = {r.info.run_id for r in client.search_runs([parents[0].info.experiment_id], "tags.`gss.stage` = 'train'")}
    again = sweep(str(sweep_file), only=["arch=gss"])  # finished cells: every stage skipped
    assert sorted(again["done"]) == ["tiny-a-gss", "tiny-b-gss"] and not again["failed"]  # the typo cells not picked
    assert again["best"] == first["best"]  # the summary still covers every finished cell
    assert {r.info.run_id for r in client.search_runs([parents[0].info.experiment_id],
                                                      "tags.`gss.stage` = 'train'")} == trained


def test_a_sweep_file_is_checked(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "x", "axes": {"a": {"1": {}}}, "exclude": [{"a": "2"}]}))
    with pytest.raises(ConfigError, match="exclude .* a=2 is not a value of the axes"):
        load_sweep(str(tmp_path / "s.yaml"))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"name": "x", "axes": {"a": {"1": {}}}, "axis": {}}))
    with pytest.raises(ConfigError, match="unknown: \\['axis'\\]"):
        load_sweep(str(tmp_path / "t.yaml"))
    axes = {"a": {"1": {}, "2": {}}, "b": {"3": {}, "4": {}}}
    (tmp_path / "u.yaml").write_text(yaml.safe_dump({"name": "x", "axes": axes}))
    spec = load_sweep(str(tmp_path / "u.yaml"))
    assert select(spec, []) == ["x-1-3", "x-1-4", "x-2-3", "x-2-4"]
    assert select(spec, ["a=2"]) == ["x-2-3", "x-2-4"] and select(spec, ["a=2", "b=3"]) == ["x-2-3"]
    with pytest.raises(ConfigError, match="--only a=5: not a value of the sweep's axes \\(a: 1, 2; b: 3, 4\\)"):
        select(spec, ["a=5"])


def test_the_summary_averages_over_seeds_and_names_each_panels_best_learning_rate(tmp_path):
    """A learning-rate search: panels arch, lines lr, 2 seeds; made-up results where the best mean is not the
    best single cell, so a best taken from one seed would be wrong."""
    results = {  # (arch, lr, seed): {length: token perplexity}
        ("gss", "1e-3", "0"): {8: 20.0, 16: 19.0}, ("gss", "1e-3", "1"): {8: 30.0, 16: 29.0},  # mean 25
        ("gss", "4e-3", "0"): {8: 22.0, 16: 21.0}, ("gss", "4e-3", "1"): {8: 24.0, 16: 23.0},  # mean 23: best
        ("dss", "1e-3", "0"): {8: 40.0, 16: 38.0}, ("dss", "1e-3", "1"): {8: 42.0, 16: 40.0},  # best
        ("dss", "4e-3", "0"): {8: 50.0, 16: 48.0},  # its seed 1 cell has no finished eval: left out
    }
    cells = [Cell(f"lr-{a}-{lr}-{seed}", {"arch": a, "lr": lr, "seed": seed}, [])
             for a in ("gss", "dss") for lr in ("1e-3", "4e-3") for seed in ("0", "1")]
    spec = Sweep("lr", "", cells, panels="arch", lines="lr")
    rows = [{"run": f"lr-{a}-{lr}-{seed}", "lengths": results.get((a, lr, seed), {})} for a, lr, seed in
            (c.values.values() for c in cells)]
    values = {c.name: c.values for c in cells}
    groups = group_curves(spec, rows, values, {c.name: 8 for c in cells})
    assert list(groups) == ["gss", "dss"] and list(groups["gss"]) == ["1e-3", "4e-3"]
    best = best_lines(groups)
    assert {panel: b["line"] for panel, b in best.items()} == {"gss": "4e-3", "dss": "1e-3"}
    assert best["gss"]["scores"] == {"1e-3": 25.0, "4e-3": 23.0}

    summary = summarize(spec, "validation", {"token_ppl": groups}, best)
    assert "| 1e-3 | 2 | token_ppl | 25.00 (20.00–30.00) | 24.00 (19.00–29.00) | 0.960 |" in summary
    assert "| 4e-3 | 1 | token_ppl | 50.00 | 48.00 | 0.960 |" in summary  # one cell: no range
    assert "Best lr for arch = gss: **4e-3** (validation token perplexity 23.00" in summary
    assert _plot_best(spec, groups, best, "validation token perplexity", str(tmp_path / "best.png"))
    assert (tmp_path / "best.png").stat().st_size > 0
    named = Sweep("lr", "", [Cell(c.name, {**c.values, "lr": {"1e-3": "low", "4e-3": "high"}[c.values["lr"]]}, [])
                             for c in cells], panels="arch", lines="lr")
    named_groups = group_curves(named, rows, {c.name: c.values for c in named.cells}, {c.name: 8 for c in cells})
    assert list(named_groups["gss"]) == ["low", "high"]
    assert not _plot_best(spec, named_groups, best_lines(named_groups), "", str(tmp_path / "none.png"))  # not numbers
