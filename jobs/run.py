"""`gss run`: prepare -> train -> eval as stage runs nested under one MLflow parent run.

Each stage is skipped when its output exists and is complete (the dataset's `_COMPLETE`, a FINISHED
training run, an eval run that finished the suite for this model version), so re-running an interrupted
`gss run` resumes it, and the parent run is found again by name instead of duplicated.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, load_config, to_dict
from pipeline.tracking import Tag, Tracking, find_or_create_run, log_params

SHARED_PG19 = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "pg19"


def local_config(overrides: list[str]) -> RunConfig:
    """The README's main job: a small GSS on real local text, offline.

    The PG-19 sample of ../shared/corpora when it is there, else the Python standard library's own
    source (real code every machine has), with a held-out tenth as validation and test. Overrides that name
    a `data.source` of their own replace this choice whole, so none of the fallback's settings leak into it.
    """
    if any(o.startswith("data.source") for o in overrides):
        source = []
    elif SHARED_PG19.is_dir():
        source = [f"data.source.path={SHARED_PG19}", "data.source.kind=pg19"]
    else:
        stdlib = sysconfig.get_paths()["stdlib"]
        source = [f"data.source.path={stdlib}", "data.source.kind=files", "data.source.holdout_fraction=0.1",
                  "data.source.splits.train=**/*.py", "data.source.exclude=['site-packages/*', 'dist-packages/*']",
                  "eval.max_documents=20"]  # source files are short: score more of them than one book
    return load_config(Path(__file__).resolve().parents[1] / "configs" / "local.yaml", [*source, *overrides])


def _parent_run(tracking: Tracking, cfg: RunConfig):
    """The parent run of this run name: found again after an interruption, else created."""
    tags = {Tag.PIPELINE: cfg.name, Tag.RUN_NAME: cfg.name}
    return find_or_create_run(tracking.client, tracking.experiment_id, Tag.PIPELINE, cfg.name, tags)[0]


def run_pipeline(cfg: RunConfig, tracking: Tracking | None = None) -> dict[str, Any]:
    import mlflow

    from pipeline.dataset import dataset_dir, is_complete
    from pipeline.evaluate import eval_stage, suite_todo
    from pipeline.lease import hold_lease
    from pipeline.logs import log_folder
    from pipeline.prepare import prepare_stage
    from pipeline.train import run_folder, train_stage

    # one `gss run` of a name at a time: its training run folder's lease, taken before the parent run is found or
    # made; the stages take their folders' leases inside (the training run's again: reentrant in one process)
    tracking = tracking or Tracking.of(cfg)
    with hold_lease(run_folder(cfg), "gss run"), \
            mlflow.start_run(run_id=_parent_run(tracking, cfg).info.run_id) as parent:
        if not parent.data.params:
            log_params(to_dict(cfg))
        dataset = dataset_dir(cfg)
        if is_complete(dataset):
            print(f"[prepare] skipped: {dataset} is complete")
        else:
            prepare_stage(cfg, tracking=tracking)
        trained = train_stage(cfg, tracking)  # a finished training run is a no-op
        todo = suite_todo(cfg, trained["model_uri"], tracking)
        if todo:
            evaluated = eval_stage(cfg, trained["model_uri"], todo, tracking)
        else:
            print(f"[eval] skipped: {trained['model_uri']} already has results for the suite")
            evaluated = {}
    result = {"parent_run_id": parent.info.run_id, "dataset": dataset, **trained, "eval": evaluated}
    print(f"\ndone: MLflow run {cfg.name} ({parent.info.run_id}) in experiment {cfg.tracking.experiment!r}")
    uri = tracking.uri
    if uri.startswith(("http://", "https://")):  # a tracking server shows it itself
        print(f"  look:  {uri.rstrip('/')}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}")
    else:
        print(f"  look:  mlflow ui --backend-store-uri {uri}   (then http://127.0.0.1:5000)")
    if evaluated:
        print(f"  plot:  {evaluated['plot']}")
    print(f"  files: {cfg.root}")
    print(f"  logs:  {log_folder(cfg.root)} (gss.log: Ray, MLflow; ray/: the workers)", flush=True)
    return result
