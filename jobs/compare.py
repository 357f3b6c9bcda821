"""`gss compare`: perplexity against evaluation length across runs, from the MLflow store alone.

One row per evaluated model (the results of every finished eval run of that model version on that
dataset merged, so a model topped up by `gss reeval` shows all its lengths): arch, parameters,
training tokens and throughput, and the chosen metric at each length. Printed, and saved as CSV,
Markdown and a plot.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from pipeline.config import RunConfig
from pipeline.tracking import Tag, Tracking, finished_evals

METRICS = ("token_ppl", "word_ppl", "bits_per_byte")


def eval_runs(client, experiment_id: str, run_ids: list[str]) -> list[Any]:
    """Finished eval runs: of the experiment, or the given runs (an eval run, or a `gss run` parent's evals)."""
    if not run_ids:
        return finished_evals(client, [experiment_id])
    runs = []
    for run_id in run_ids:
        run = client.get_run(run_id)
        if run.data.tags.get(Tag.STAGE) == "eval":
            runs.append(run)
        else:
            runs += finished_evals(client, [run.info.experiment_id], parent_run_id=run_id)
    return runs


def compare(cfg: RunConfig, run_ids: list[str] = (), split: str = "", metric: str = "token_ppl",
            out: str = "", tracking: Tracking | None = None) -> list[dict[str, Any]]:
    from pipeline.storage import filesystem, join

    if metric not in METRICS:
        raise SystemExit(f"gss compare: --metric must be one of {', '.join(METRICS)}")
    split = split or cfg.eval.splits[0]
    tracking = tracking or Tracking.of(cfg)
    client = tracking.client
    runs = eval_runs(client, tracking.experiment_id, list(run_ids))
    models: dict[tuple[str, str], dict[str, Any]] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        key = (tags.get(Tag.MODEL_URI, run.info.run_id), tags.get(Tag.DATASET, ""))
        row = models.setdefault(key, {
            "run": tags.get(Tag.RUN_NAME, ""), "arch": tags.get(Tag.ARCH, ""), "model": key[0],
            "parameters": int(params.get("model.parameters", 0)), "train_tokens": metrics.get("train.tokens"),
            "train_tokens_per_s": metrics.get("train.tokens_per_second"), "lengths": {},
        })
        for point in client.get_metric_history(run.info.run_id, f"{split}.{metric}"):
            row["lengths"][point.step] = point.value  # later runs overwrite earlier ones
    rows = list(models.values())
    if not rows:
        raise SystemExit(f"gss compare: no finished eval runs in experiment {cfg.tracking.experiment!r}"
                         f"{' among the given runs' if run_ids else ''}; run `gss eval` or `gss run` first")
    lengths = sorted({n for r in rows for n in r["lengths"]})
    table = _markdown(rows, lengths, f"{split} {metric}")
    print(table)

    out = out or join(cfg.root, "compare", cfg.tracking.experiment)
    fs, folder = filesystem(out)
    fs.makedirs(folder, exist_ok=True)
    fs.pipe(join(folder, "compare.md"), table.encode())
    fs.pipe(join(folder, "compare.csv"), _csv(rows, lengths).encode())
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "compare.png")
        _plot(rows, f"{split} {metric}", local)
        fs.put(local, join(folder, "compare.png"))
    print(f"saved {join(out, 'compare.md')}, compare.csv, compare.png")
    return rows


def _cells(row: dict[str, Any], lengths: list[int]) -> list[str]:
    def number(value, fmt):
        return format(value, fmt) if value is not None else ""

    return [row["run"], row["arch"], f"{row['parameters'] / 1e6:.1f}M", number(row["train_tokens"], ",.0f"),
            number(row["train_tokens_per_s"], ",.0f")] + [number(row["lengths"].get(n), ".3f") for n in lengths]


HEADER = ["run", "arch", "params", "train tokens", "train tok/s"]


def _markdown(rows: list[dict[str, Any]], lengths: list[int], what: str) -> str:
    header = HEADER + [f"L={n}" for n in lengths]
    lines = [f"{what} by evaluation length", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cells(r, lengths)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]], lengths: list[int]) -> str:
    header = ["run", "arch", "parameters", "train_tokens", "train_tokens_per_s", "model"] + [str(n) for n in lengths]
    lines = [",".join(header)]
    for r in rows:
        values = [r["run"], r["arch"], r["parameters"], r["train_tokens"], r["train_tokens_per_s"], r["model"]]
        lines.append(",".join("" if v is None else str(v) for v in values + [r["lengths"].get(n) for n in lengths]))
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], what: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.evaluate import length_axis

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        points = sorted(r["lengths"].items())
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{r['run']} ({r['arch']})")
    length_axis(ax, what)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
