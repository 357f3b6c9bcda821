"""`gss sweep SWEEP.yaml [key.sub=value ...]`: a base config × the axes to vary, every cell a `gss run` on the Ray
cluster, side by side as far as its resources allow, ending in one comparison of the sweep's runs.

A sweep file (see configs/sweep-*.yaml):

    name: miniature          # cell runs are named <name>-<value>-<value>... and tagged gss.sweep=<name>
    base: local.yaml         # the config every cell starts from, relative to the sweep file
    set: {key.sub: value}    # overrides for every cell (command-line overrides come after them)
    axes:                    # every combination of one value per axis is a cell
      corpus: {pg19: {data.source.kind: pg19, data.source.path: ...}, arxiv: {...}}
      arch: {gss: {train.preset: small-gss}, dss: {train.preset: small-dss}}
    exclude: [{corpus: arxiv, seed: "1"}]   # combinations left out
    panels: corpus           # the comparison plot: one panel per value of this axis (default: the first),
    lines: arch              # one line per value of this one (default: the second), the mean over the others

Each dataset is prepared once, before any cell trains, and shared by the cells on it. A cell runs as a Ray task
driving its own `gss run` (its own MLflow parent run, tagged with the sweep and the cell's axis values); at most
as many run at once as the cluster's CPUs, GPUs and TPUs hold cells' trainers, the rest queue. Re-running a sweep
skips finished cells (each `gss run` skips what is complete) and finishes the others; a cell that fails (its
config, or its run) is reported and the others go on.
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError, RunConfig, from_dict, load_config, to_dict

SWEEP_TAG = "gss.sweep"  # on each cell's `gss run` parent run: the sweep's name
CELL_TAG = "gss.sweep.cell"  # and the cell's name; its axis values as gss.sweep.<axis>
KEYS = {"name", "base", "set", "axes", "exclude", "panels", "lines"}


@dataclass
class Cell:
    name: str
    values: dict[str, str]  # axis -> value name
    overrides: list[str]


@dataclass
class Sweep:
    name: str
    base: str
    cells: list[Cell]
    panels: str
    lines: str


def as_overrides(settings: dict[str, Any]) -> list[str]:
    """{dotted key: value} as `key=value` overrides (values in YAML, as on the command line)."""
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in (settings or {}).items()]


def load_sweep(path: str, overrides: list[str] = ()) -> Sweep:
    try:
        with open(path) as f:
            spec = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"sweep file {path!r} not found (see configs/sweep-*.yaml)") from None
    unknown = set(spec) - KEYS
    if unknown or not spec.get("name") or not spec.get("axes"):
        raise ConfigError(f"{path}: a sweep has name, axes and optionally base, set, exclude, panels, lines"
                          f"{f'; unknown: {sorted(unknown)}' if unknown else ''}")
    axes = {axis: {str(name): settings for name, settings in values.items()} for axis, values in spec["axes"].items()}
    excluded = [{axis: str(value) for axis, value in rule.items()} for rule in spec.get("exclude") or []]
    for rule in excluded:
        for axis, value in rule.items():
            if value not in axes.get(axis, {}):
                raise ConfigError(f"{path}: exclude {rule}: {axis}={value} is not a value of the axes")
    cells = []
    for combination in itertools.product(*(list(values.items()) for values in axes.values())):
        values = dict(zip(axes, (name for name, _ in combination)))
        if any(all(values[a] == v for a, v in rule.items()) for rule in excluded):
            continue
        name = "-".join([spec["name"], *values.values()])
        settings = [o for _, value_settings in combination for o in as_overrides(value_settings)]
        cells.append(Cell(name, values, [*as_overrides(spec.get("set")), *settings, *overrides, f"name={name}"]))
    base = spec.get("base")
    base = str(Path(path).resolve().parent / base) if base else ""
    names = list(axes)
    return Sweep(spec["name"], base, cells, spec.get("panels", names[0]), spec.get("lines", names[min(1, len(names) - 1)]))


def _run_cell(cfg: dict[str, Any]) -> dict[str, Any]:
    """(A Ray task.) One cell: `gss run` with its config; returns its parent run id and model."""
    from jobs.run import run_pipeline

    result = run_pipeline(from_dict(RunConfig, cfg))
    return {"parent_run_id": result["parent_run_id"], "model_uri": result["model_uri"]}


def cells_at_once(cfg: RunConfig) -> int:
    """How many cells' trainers the cluster holds at once: its CPUs (GPUs, TPUs) ÷ what one trainer's workers ask."""
    import ray

    tc, have = cfg.train, ray.cluster_resources()
    per_worker = {"CPU": 1.0, **({"GPU": 1.0} if tc.backend == "cuda" else {}), **tc.worker_resources}
    fits = [have.get(resource, 0) / (amount * tc.num_workers) for resource, amount in per_worker.items() if amount]
    return max(1, math.floor(min(fits)))


def sweep(path: str, overrides: list[str] = ()) -> dict[str, Any]:
    import ray
    from mlflow import MlflowClient

    from pipeline import tracking
    from pipeline.cluster import connect
    from pipeline.dataset import dataset_dir, is_complete
    from pipeline.logs import route_library_logs
    from pipeline.prepare import prepare_stage

    spec = load_sweep(path, overrides)
    configs, failed = {}, {}
    for cell in spec.cells:
        try:
            configs[cell.name] = load_config(spec.base or None, cell.overrides)
        except ConfigError as e:
            failed[cell.name] = f"config: {e}"
            print(f"[sweep] {cell.name}: FAILED, {failed[cell.name]}")
    if not configs:
        raise ConfigError(f"gss sweep: no cell of {path} has a valid config")
    first = next(iter(configs.values()))
    route_library_logs(first.root)
    connect(first.ray)
    datasets = {dataset_dir(cfg): cfg for cfg in configs.values()}  # one preparation per dataset
    for dataset, cfg in datasets.items():
        if not is_complete(dataset):
            prepare_stage(cfg)
    at_once = cells_at_once(first)
    print(f"[sweep] {spec.name}: {len(configs)} cell(s) on {len(datasets)} dataset(s), {at_once} at a time")

    tracking.setup(first)
    client = MlflowClient()
    cells = {cell.name: cell for cell in spec.cells}
    todo, running, done = list(configs), {}, {}
    task = ray.remote(num_cpus=0)(_run_cell)  # a driver, no CPU of its own: its trainer asks for the resources
    while todo or running:
        while todo and len(running) < at_once:
            name = todo.pop(0)
            running[task.remote(to_dict(configs[name]))] = name
        [ref], _ = ray.wait(list(running), num_returns=1)
        name = running.pop(ref)
        try:
            done[name] = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - a cell's failure is reported, the sweep goes on
            failed[name] = str(e).strip().splitlines()[-1]
            print(f"[sweep] {name}: FAILED, {failed[name]}")
            continue
        tags = {SWEEP_TAG: spec.name, CELL_TAG: name, **{f"{SWEEP_TAG}.{a}": v for a, v in cells[name].values.items()}}
        for key, value in tags.items():
            client.set_tag(done[name]["parent_run_id"], key, value)
        print(f"[sweep] {name}: done ({len(done)}/{len(configs)})")

    rows = compare_sweep(spec, first, configs)
    print(f"[sweep] {len(done)} cell(s) done, {len(failed)} failed" + "".join(f"\n  {n}: {e}" for n, e in failed.items()))
    return {"done": done, "failed": failed, "rows": rows}


def compare_sweep(spec: Sweep, cfg: RunConfig, configs: dict[str, RunConfig]) -> dict[str, list[dict[str, Any]]]:
    """`gss compare` over the sweep's runs for each metric, into <root>/sweeps/<name>/<metric>/, and the sweep's
    plot: perplexity against length, a panel per `panels` value, a line per `lines` value (mean over the rest,
    the spread as a band), the training length marked."""
    from mlflow import MlflowClient

    from jobs.compare import METRICS, compare
    from pipeline import tracking
    from pipeline.storage import filesystem, join

    experiment_id = tracking.setup(cfg)
    parents = [r.info.run_id for r in MlflowClient().search_runs([experiment_id], tracking.tag_is(SWEEP_TAG, spec.name))]
    if not parents:
        return {}
    out = join(cfg.root, "sweeps", spec.name)
    split = cfg.eval.splits[0]
    rows = {metric: compare(cfg, parents, split=split, metric=metric, out=join(out, metric)) for metric in METRICS}
    values = {cell.name: cell.values for cell in spec.cells}
    fs, folder = filesystem(out)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "sweep.png")
        _plot(spec, rows["token_ppl"], values, {n: c.data.pack.seq_len for n, c in configs.items()},
              f"{split} token perplexity", local)
        fs.put(local, join(folder, "sweep.png"))
    print(f"[sweep] comparison: {out}/<metric>/compare.md, {join(out, 'sweep.png')}")
    return rows


def _plot(spec: Sweep, rows: list[dict[str, Any]], values: dict[str, dict[str, str]], train_lengths: dict[str, int],
          what: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.evaluate import length_axis

    groups: dict[str, dict[str, list[dict[int, float]]]] = {}
    for row in rows:
        if row["run"] in values:
            cell = values[row["run"]]
            groups.setdefault(cell[spec.panels], {}).setdefault(cell[spec.lines], []).append(row["lengths"])
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], sorted(groups.items())):
        for line, curves in sorted(lines.items()):
            lengths = sorted(set.intersection(*(set(c) for c in curves)))
            points = [[c[n] for c in curves] for n in lengths]
            ax.plot(lengths, [statistics.mean(p) for p in points], marker="o", label=f"{line} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(lengths, [min(p) for p in points], [max(p) for p in points], alpha=0.2)
        trained = {train_lengths[r] for r, v in values.items() if v[spec.panels] == panel and r in train_lengths}
        for n in trained:
            ax.axvline(n, color="grey", linestyle="--", label=f"training length {n}")
        ax.set_title(f"{spec.panels} = {panel}")
        length_axis(ax, what)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

