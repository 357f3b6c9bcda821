"""`gss reeval`: evaluate the registered models that lack results for the current evaluation suite.

The suite is the config's dataset × `eval.splits` × `eval.lengths` (× `eval.max_documents`). For each
registered model's `current` version trained with the dataset's tokenizer, the (split, length) pairs
that no finished eval run of that version covers are evaluated, and only those. An eval run marks what
it covered as its last act, so an interrupted one counts for nothing and the next `reeval` redoes it;
with nothing missing, `reeval` does nothing. Safe to run on a schedule (infra/kuberay).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.config import RunConfig


def reeval(cfg: RunConfig) -> list[dict[str, Any]]:
    from mlflow.exceptions import MlflowException

    from pipeline.dataset import dataset_dir, load_manifest
    from pipeline.evaluate import eval_stage, suite_todo
    from pipeline.tracking import ALIAS, Tag, Tracking

    tracking = Tracking.of(cfg)
    dataset = dataset_dir(cfg)
    tokenizer = load_manifest(dataset)["tokenizer"]["sha256"]
    client = tracking.client
    done = []
    for registered in client.search_registered_models(max_results=1000):
        try:
            version = client.get_model_version_by_alias(registered.name, ALIAS)
        except MlflowException:
            continue  # not one of ours (`gss train` always sets the alias)
        uri = f"models:/{registered.name}/{version.version}"
        if version.tags.get(Tag.TOKENIZER_SHA256) != tokenizer:
            print(f"[reeval] {uri}: trained with another tokenizer than {dataset}; not evaluated with this config")
            continue
        todo = suite_todo(cfg, uri, tracking)
        if not todo:
            print(f"[reeval] {uri}: up to date")
            continue
        print(f"[reeval] {uri}: evaluating {todo}")
        named = dataclasses.replace(cfg, name=version.tags.get(Tag.RUN_NAME, registered.name))
        done.append({"model": uri, "todo": todo, **eval_stage(named, uri, todo, tracking)})
    print(f"[reeval] {len(done)} model(s) evaluated")
    return done
