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
config, or its run) is reported and the others go on, except on a full disk (or bucket quota): then no further
cell starts, the running ones end, and the sweep stops in one line, without its summary.

The sweep ends with its summary (<root>/sweeps/<name>/summary.md, printed): a table per `panels` value, a row per
`lines` value with the mean and min-max over the other axes (seeds), and each panel's best line: the one with
the lowest token perplexity (loss) at the training length. So with `panels: arch` and `lines: lr`
(configs/sweep-lr.yaml) it names each architecture's best learning rate.
"""

from __future__ import annotations

import dataclasses
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
from pipeline.tracking import Tag, Tracking, sweep_cells, tracking_uri

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
    panels, lines = spec.get("panels", names[0]), spec.get("lines", names[min(1, len(names) - 1)])
    return Sweep(spec["name"], base, cells, panels, lines)


def select(spec: Sweep, only: list[str]) -> list[str]:
    """The names of the cells `--only AXIS=VALUE ...` picks: those with all of these values (no rule: all)."""
    axes = spec.cells[0].values if spec.cells else {}
    values = {axis: list(dict.fromkeys(cell.values[axis] for cell in spec.cells)) for axis in axes}
    wanted = dict(rule.partition("=")[::2] for rule in only)
    for axis, value in wanted.items():
        if value not in values.get(axis, []):
            known = "; ".join(f"{a}: {', '.join(v)}" for a, v in values.items())
            raise ConfigError(f"gss sweep --only {axis}={value}: not a value of the sweep's axes ({known})")
    return [cell.name for cell in spec.cells if all(cell.values[a] == v for a, v in wanted.items())]


def _run_cell(cfg: dict[str, Any]) -> dict[str, Any]:
    """(A Ray task.) One cell: `gss run` with its config; returns its parent run id and model."""
    from jobs.run import run_pipeline

    result = run_pipeline(from_dict(RunConfig, cfg))
    return {"parent_run_id": result["parent_run_id"], "model_uri": result["model_uri"]}


def with_store(cfg: RunConfig) -> RunConfig:
    """`cfg` with its MLflow store resolved here (`tracking.uri`, else this shell's $MLFLOW_TRACKING_URI, else the
    root's): a cell runs in a Ray worker, whose environment is the cluster's, and the sweep tags its run here."""
    return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=tracking_uri(cfg)))


def cells_at_once(cfg: RunConfig) -> int:
    """How many cells' trainers the cluster holds at once: its CPUs (GPUs, TPUs) ÷ what one trainer's workers ask."""
    import ray

    tc, have = cfg.train, ray.cluster_resources()
    per_worker = {"CPU": 1.0, **({"GPU": 1.0} if tc.backend == "cuda" else {}), **tc.worker_resources}
    fits = [have.get(resource, 0) / (amount * tc.num_workers) for resource, amount in per_worker.items() if amount]
    return max(1, math.floor(min(fits)))


def sweep(path: str, overrides: list[str] = (), only: list[str] = ()) -> dict[str, Any]:
    import ray

    from pipeline.cluster import connect
    from pipeline.dataset import dataset_dir, is_complete
    from pipeline.logs import route_library_logs
    from pipeline.prepare import prepare_stage
    from pipeline.storage import StorageError, disk_full, is_full_disk

    spec = load_sweep(path, overrides)
    chosen = select(spec, only)
    configs, failed = {}, {}  # of every cell, for the summary, which covers the sweep's finished cells under root
    for cell in spec.cells:
        try:
            configs[cell.name] = load_config(spec.base or None, cell.overrides)
        except ConfigError as e:
            if cell.name in chosen:
                failed[cell.name] = f"config: {e}"
                print(f"[sweep] {cell.name}: FAILED, {failed[cell.name]}")
    todo = [name for name in configs if name in chosen]
    if not todo:
        raise ConfigError(f"gss sweep: no cell of {path}{' picked by --only' if only else ''} has a valid config")
    first = configs[todo[0]]
    route_library_logs(first.root)
    connect(first.ray)
    tracking = Tracking.of(first)  # the store and experiment of every cell, its summary's too
    datasets = {dataset_dir(configs[name]): configs[name] for name in todo}  # one preparation per dataset
    for dataset, cfg in datasets.items():
        if not is_complete(dataset):
            try:
                prepare_stage(cfg, tracking=tracking)
            except Exception as e:
                if not is_full_disk(e):
                    raise
                raise StorageError(f"{cfg.root}: {disk_full(cfg.root)}. No cell was started; what {dataset} has so far "
                                   "is kept: run the same command again once there is room") from None
    at_once = cells_at_once(first)
    print(f"[sweep] {spec.name}: {len(todo)} cell(s) on {len(datasets)} dataset(s), {at_once} at a time")

    cells = {cell.name: cell for cell in spec.cells}
    total, running, done, full = len(todo), {}, {}, None
    task = ray.remote(num_cpus=0)(_run_cell)  # a driver, no CPU of its own: its trainer asks for the resources
    while todo or running:
        while todo and len(running) < at_once:
            name = todo.pop(0)
            running[task.remote(to_dict(with_store(configs[name])))] = name
        [ref], _ = ray.wait(list(running), num_returns=1)
        name = running.pop(ref)
        try:
            done[name] = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - a cell's failure is reported, the sweep goes on
            failed[name] = str(e).strip().splitlines()[-1]
            print(f"[sweep] {name}: FAILED, {failed[name]}")
            if is_full_disk(e) and full is None:  # the next cells would fail the same way: start none
                full, todo = name, []
            continue
        tags = {Tag.SWEEP: spec.name, Tag.SWEEP_CELL: name,
                **{Tag.sweep_axis(axis): value for axis, value in cells[name].values.items()}}
        for key, value in tags.items():
            tracking.client.set_tag(done[name]["parent_run_id"], key, value)
        print(f"[sweep] {name}: done ({len(done)}/{total})")

    if full is not None:  # no summary either: it would be written to the same disk
        root = configs[full].root
        raise StorageError(f"{root}: {disk_full(root)}. Cell {full} stopped on it, and no further cell was started; "
                           f"the {len(done)} finished cell(s) are kept and a re-run skips them: run the same command "
                           "again once there is room")
    comparison = compare_sweep(spec, first, configs, tracking)
    print(f"[sweep] {len(done)} cell(s) done, {len(failed)} failed"
          + "".join(f"\n  {n}: {e}" for n, e in failed.items()))
    return {"done": done, "failed": failed, **comparison}


def compare_sweep(spec: Sweep, cfg: RunConfig, configs: dict[str, RunConfig], tracking: Tracking) -> dict[str, Any]:
    """`gss compare` over the sweep's runs for each metric, into <root>/sweeps/<name>/<metric>/; then the sweep's
    own view: `summary.md` (each metric by length, a table per `panels` value, a row per `lines` value: the mean,
    min-max over the other axes, and each panel's best line) and `sweep.png` (perplexity against length, a panel
    per `panels` value, a line per `lines` value, the spread as a band, the training length marked), and when the
    `lines` values are numbers (a learning rate), `best.png`: the score against them, a line per panel."""
    from jobs.compare import METRICS, compare
    from pipeline.storage import filesystem, join

    parents = [r.info.run_id for r in sweep_cells(tracking.client, tracking.experiment_id, spec.name)]
    if not parents:
        return {"rows": {}, "best": {}}
    out = join(cfg.root, "sweeps", spec.name)
    split = cfg.eval.splits[0]
    rows = {metric: compare(cfg, parents, split=split, metric=metric, out=join(out, metric), tracking=tracking)
            for metric in METRICS}
    values = {cell.name: cell.values for cell in spec.cells}
    train_length = {name: c.data.pack.seq_len for name, c in configs.items()}
    groups = {metric: group_curves(spec, metric_rows, values, train_length) for metric, metric_rows in rows.items()}
    best = best_lines(groups["token_ppl"])
    summary = summarize(spec, split, groups, best)
    print(summary)
    fs, folder = filesystem(out)
    fs.pipe(join(folder, "summary.md"), summary.encode())
    what = f"{split} token perplexity"
    with tempfile.TemporaryDirectory() as tmp:
        _plot_lengths(spec, groups["token_ppl"], what, os.path.join(tmp, "sweep.png"))
        fs.put(os.path.join(tmp, "sweep.png"), join(folder, "sweep.png"))
        if _plot_best(spec, groups["token_ppl"], best, what, os.path.join(tmp, "best.png")):
            fs.put(os.path.join(tmp, "best.png"), join(folder, "best.png"))
    print(f"[sweep] comparison: {join(out, 'summary.md')}, sweep.png, <metric>/compare.md")
    return {"rows": rows, "best": best}


@dataclass
class Group:
    """The cells of one (panel, line) pair: their curves {length: value} and the training length scored as theirs."""

    curves: list[dict[int, float]]
    train_length: int

    def lengths(self) -> list[int]:
        return sorted(set.intersection(*(set(c) for c in self.curves)))

    def at(self, length: int) -> tuple[float, float, float]:
        """(mean, min, max) over the cells at `length`."""
        points = [c[length] for c in self.curves]
        return statistics.mean(points), min(points), max(points)

    def score(self) -> float:
        """The mean at the training length (the shortest evaluated length if that one was not)."""
        lengths = self.lengths()
        return self.at(self.train_length if self.train_length in lengths else lengths[0])[0]


def group_curves(spec: Sweep, rows: list[dict[str, Any]], values: dict[str, dict[str, str]],
                 train_length: dict[str, int]) -> dict[str, dict[str, Group]]:
    """{panel value: {line value: Group}} in the sweep file's order; runs without a finished eval are left out."""
    order = {axis: list(dict.fromkeys(cell.values[axis] for cell in spec.cells)) for axis in (spec.panels, spec.lines)}
    found: dict[tuple[str, str], Group] = {}
    for row in rows:
        if row["run"] in values and row["lengths"]:
            cell = values[row["run"]]
            key = cell[spec.panels], cell[spec.lines]
            found.setdefault(key, Group([], train_length[row["run"]])).curves.append(row["lengths"])
    groups: dict[str, dict[str, Group]] = {}
    for panel in order[spec.panels]:
        lines = {line: found[panel, line] for line in order[spec.lines] if (panel, line) in found}
        if lines:
            groups[panel] = lines
    return groups


def best_lines(groups: dict[str, dict[str, Group]]) -> dict[str, dict[str, Any]]:
    """Per panel: the line with the lowest score (token perplexity at the training length, i.e. the lowest loss)."""
    best = {}
    for panel, lines in groups.items():
        scores = {line: group.score() for line, group in lines.items()}
        winner = min(scores, key=scores.get)
        best[panel] = {"line": winner, "score": scores[winner], "scores": scores}
    return best


def _number(value: float) -> str:
    return f"{value:.2f}" if value < 1000 else f"{value:.1f}"


def summarize(spec: Sweep, split: str, groups: dict[str, dict[str, dict[str, Group]]],
              best: dict[str, dict[str, Any]]) -> str:
    """Markdown: for each panel, a row per line and metric (mean and min-max over the other axes at each length,
    and the longest length over the training length), then the panel's best line."""
    lines = [f"# Sweep {spec.name}: {split} split, mean (min-max) over the cells of each {spec.lines}", ""]
    for panel, by_line in groups["token_ppl"].items():
        lengths = sorted({n for g in by_line.values() for n in g.lengths()})
        train = next(iter(by_line.values())).train_length
        ratio = train in lengths and lengths[-1] > train  # how the score moves beyond the training length
        header = [spec.lines, "cells", "metric", *(f"L={n}" for n in lengths)]
        header += [f"L={lengths[-1]} / L={train}"] if ratio else []
        lines += [f"**{spec.panels} = {panel}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for line in by_line:
            for metric, metric_groups in groups.items():
                group = metric_groups.get(panel, {}).get(line)
                if group is None:
                    continue
                cells, have = [], group.lengths()
                for n in lengths:
                    if n not in have:
                        cells.append("")
                        continue
                    mean, low, high = group.at(n)
                    spread = f" ({_number(low)}–{_number(high)})" if len(group.curves) > 1 else ""
                    cells.append(_number(mean) + spread)
                if ratio:
                    cells.append(f"{group.at(lengths[-1])[0] / group.at(train)[0]:.3f}"
                                 if {train, lengths[-1]} <= set(have) else "")
                lines.append("| " + " | ".join([line, str(len(group.curves)), metric, *cells]) + " |")
        winner = best[panel]
        lines += ["", f"Best {spec.lines} for {spec.panels} = {panel}: **{winner['line']}** ({split} token perplexity "
                  f"{_number(winner['score'])} at the training length; "
                  + ", ".join(f"{line}: {_number(score)}" for line, score in winner["scores"].items()) + ")", ""]
    return "\n".join(lines)


def _plot_lengths(spec: Sweep, groups: dict[str, dict[str, Group]], what: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.evaluate import length_axis

    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], groups.items()):
        for line, group in lines.items():
            lengths = group.lengths()
            points = [group.at(n) for n in lengths]
            ax.plot(lengths, [p[0] for p in points], marker="o", label=f"{line} (n={len(group.curves)})")
            if len(group.curves) > 1:
                ax.fill_between(lengths, [p[1] for p in points], [p[2] for p in points], alpha=0.2)
        for n in {group.train_length for group in lines.values()}:
            ax.axvline(n, color="grey", linestyle="--", label=f"training length {n}")
        ax.set_title(f"{spec.panels} = {panel}")
        length_axis(ax, what)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_best(spec: Sweep, groups: dict[str, dict[str, Group]], best: dict[str, dict[str, Any]], what: str,
               path: str) -> bool:
    """The score against the `lines` values when they are numbers (log axis), a line per panel, the best marked;
    False (no plot) otherwise."""
    try:
        numeric = {line: float(line) for lines in groups.values() for line in lines}
    except ValueError:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for panel, lines in groups.items():
        xs = sorted(lines, key=numeric.get)
        ax.plot([numeric[x] for x in xs], [lines[x].score() for x in xs], marker="o", label=f"{spec.panels} = {panel}")
        ax.plot(numeric[best[panel]["line"]], best[panel]["score"], marker="*", markersize=14, color="black")
    ax.set_xscale("log")
    ax.set_xlabel(spec.lines)
    ax.set_ylabel(f"{what} at the training length")
    ax.set_title(f"sweep {spec.name}: the best {spec.lines} per {spec.panels} (stars)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
