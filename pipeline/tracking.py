"""MLflow for every stage: where the store is, one run per stage (nested under a parent when there is one),
and the names the stages use to find each other's results there: the `gss.*` tags, the registered model
name and its alias."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from pipeline.config import ConfigError, RunConfig
from pipeline.storage import absolute, filesystem, join

# The user's $MLFLOW_TRACKING_URI, read once: mlflow.set_tracking_uri() writes that variable itself, so a
# later read would see the store of whichever config ran last in this process.
_USER_URI = os.environ.get("MLFLOW_TRACKING_URI", "")


class Tag:
    """The `gss.*` tags on MLflow runs (and on registered model versions where marked)."""

    STAGE = "gss.stage"  # prepare | train | eval
    RUN_NAME = "gss.run_name"  # the config's `name` (runs and model versions)
    PIPELINE = "gss.pipeline"  # a `gss run` parent run: its name, to find it again after an interruption
    TRAIN_NAME = "gss.train_name"  # a training run: its name, the same run across restarts and re-runs
    MODEL_DATA = "gss.model_data"  # a training run: fingerprint of (model config, dataset); a reused name must match
    DATASET = "gss.dataset"  # the dataset folder (runs and model versions)
    TOKENIZER_SHA256 = "gss.tokenizer_sha256"  # prepare runs and model versions
    ARCH = "gss.arch"  # train and eval runs
    CHECKPOINT = "gss.checkpoint"  # a training run: its final checkpoint folder
    MODEL_URI = "gss.model_uri"  # train: the registered model; eval: the model version scored
    SKIPPED = "gss.skipped"  # prepare: the dataset was complete already
    MAX_DOCUMENTS = "gss.max_documents"  # eval: how many documents per split were scored (0: all)
    EVAL_DONE = "gss.eval_done"  # eval: the split:length pairs covered, set as the run's last act
    XLA_FALLBACKS = "gss.xla_fallbacks"  # training on XLA: ops that ran on the host, with counts
    NOTICE = "gss.notice."  # + the time in ns: a training worker's line for the user, which the driver prints


ALIAS = "current"  # the alias `gss train` moves to each newly registered version (`latest` is reserved)


def tag_is(key: str, value: str) -> str:
    """An MLflow search filter on a tag."""
    return f"tags.`{key}` = '{value}'"


def registered_name(cfg: RunConfig) -> str:
    """The registered model a run's training produces."""
    return cfg.train.register_as or f"gss-{cfg.name}"


def default_model_uri(cfg: RunConfig) -> str:
    """`eval.model`, else the run's registered model at its alias."""
    return cfg.eval.model or f"models:/{registered_name(cfg)}@{ALIAS}"


def resolve_model_uri(ref: str) -> str:
    """models:/name@alias -> models:/name/<version>, so results are recorded against a fixed version."""
    if ref.startswith("models:/") and "@" in ref:
        from mlflow import MlflowClient

        name, _, alias = ref.removeprefix("models:/").partition("@")
        return f"models:/{name}/{MlflowClient().get_model_version_by_alias(name, alias).version}"
    return ref


def tracking_uri(cfg: RunConfig) -> str:
    """`tracking.uri`, else $MLFLOW_TRACKING_URI, else a sqlite store in the run's root folder."""
    uri = cfg.tracking.uri or _USER_URI
    if uri:
        return uri
    fs, root = filesystem(cfg.root)
    if not isinstance(fs, LocalFileSystem):
        raise ConfigError(
            f"root is {cfg.root!r}, and a sqlite MLflow store cannot live in a bucket: set tracking.uri "
            "(or MLFLOW_TRACKING_URI) to your tracking server (infra/mlflow), or to a local store, e.g. "
            f"tracking.uri=sqlite:///{os.path.expanduser('~')}/gss-mlflow.db (artifacts still go to the bucket)"
        )
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{os.path.abspath(join(root, 'mlflow.db'))}"


def unreachable(uri: str, timeout_s: float = 10.0) -> str | None:
    """Why the tracking server at `uri` does not answer its health check, or None (also for a local store)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            response.read()
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        return str(e)
    return None


def check_reachable(uri: str) -> None:
    """Fail before any work starts if a tracking server does not answer, or refuses our credentials."""
    why = unreachable(uri)
    if why is not None:
        raise ConfigError(
            f"MLflow tracking server {uri} is not reachable ({why}); start it (infra/mlflow) "
            "or point tracking.uri / MLFLOW_TRACKING_URI at one that runs"
        )
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as e:
        if e.get_http_status_code() not in (401, 403):
            raise
        user = os.environ.get("MLFLOW_TRACKING_USERNAME") or "from ~/.mlflow/credentials, or none"
        raise ConfigError(
            f"MLflow tracking server {uri} refuses the credentials given (user: {user}; HTTP "
            f"{e.get_http_status_code()}): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            "~/.mlflow/credentials) to your MLflow user's (infra/README.md, MLflow)"
        ) from None


def setup(cfg: RunConfig) -> str:
    """Point MLflow at the store and experiment of this config; returns the experiment id."""
    import mlflow

    uri = tracking_uri(cfg)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location(cfg, uri))


def artifact_location(cfg: RunConfig, uri: str) -> str | None:
    """Where a new experiment keeps its artifacts (models, manifests, plots): beside the run's other files,
    `<root>/mlartifacts` (a local folder or gs://, written through google-cloud-storage with the usual Google
    credentials), unless a tracking server decides (infra/mlflow serves them from its own bucket)."""
    if uri.startswith(("http://", "https://")):
        return None
    return absolute(join(cfg.root, "mlartifacts"))


@contextlib.contextmanager
def stage_run(cfg: RunConfig, stage: str, tags: dict[str, str]) -> Iterator[Any]:
    """An MLflow run for one stage, nested under the active run (the `gss run` parent) if there is one."""
    import mlflow

    experiment_id = setup(cfg)
    parent = mlflow.active_run()
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=f"{cfg.name}/{stage}",
        nested=parent is not None,
        tags={Tag.STAGE: stage, Tag.RUN_NAME: cfg.name, **tags},
    ) as run:
        yield run


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}, the form MLflow params take."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def log_params(params: dict[str, Any]) -> None:
    import mlflow

    mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})


def log_dataset_input(client, run_id: str, dataset: str, digest: str, context: str) -> None:
    """Record a packed dataset folder (local or gs://) as an MLflow dataset input of a run, its digest the
    dataset's identity hash (the suffix of its folder name)."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns that it cannot choose
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(dataset)  # a local path or gs://: MLflow's artifact dataset sources
    entity = MetaDataset(source, name=dataset.rstrip("/").rsplit("/", 1)[-1], digest=digest)._to_mlflow_entity()
    client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])])


class BackgroundLogger:
    """Metrics and tags for one MLflow run, sent from a thread so that a tracking server that is slow or down
    never stalls or stops training: what cannot be sent yet is kept in memory and sent once the server answers
    again (MLflow's own client retries each request for about 4 minutes first). The outage and the recovery
    are each said in one line (`say`); `close()` waits up to `flush_s` for what is still unsent, then returns
    the line that says what is lost, if anything is. A batch whose reply was lost in the outage can be stored twice: readers key metrics by step."""

    BATCH = 1000  # MLflow's limit on metrics in one log_batch

    def __init__(self, tracking_uri: str, run_id: str, say=print, retry_s: float = 5.0):
        from mlflow import MlflowClient

        self.client, self.run_id, self.uri, self.say, self.retry_s = MlflowClient(tracking_uri), run_id, \
            tracking_uri, say, retry_s
        self.metrics: list = []  # mlflow.entities.Metric, oldest first
        self.tags: dict[str, str] = {}
        self.lock, self.wake, self.closing = threading.Lock(), threading.Event(), False
        self.down_since: float | None = None
        self.thread = threading.Thread(target=self._send_until_closed, name="mlflow-metrics", daemon=True)
        self.thread.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self.lock:
            self.metrics += [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.wake.set()

    def set_tag(self, key: str, value: str) -> None:
        with self.lock:
            self.tags[key] = value
        self.wake.set()

    def close(self, flush_s: float = 300.0) -> str | None:
        self.closing = True
        self.wake.set()
        self.thread.join(flush_s)
        with self.lock:
            metrics, tags = list(self.metrics), dict(self.tags)
            self.metrics, self.tags = [], {}  # the thread, if still in a request, sends nothing more after this
        if not (metrics or tags):
            return None
        steps = sorted({m.step for m in metrics})
        span = f" of steps {steps[0]}-{steps[-1]}" if steps else ""
        return (f"MLflow at {self.uri} did not take them within {flush_s:.0f} s of the end: {len(metrics)} metric "
                f"values{span} and {len(tags)} tags of run {self.run_id} are lost")

    def _send_until_closed(self) -> None:
        while True:
            self.wake.wait(None if self.down_since is None else self.retry_s)
            self.wake.clear()
            while self._send_one_batch():
                pass
            with self.lock:
                if self.closing and not (self.metrics or self.tags):
                    return

    def _send_one_batch(self) -> bool:
        """Send the oldest batch; True if sent and more is waiting."""
        from mlflow.entities import RunTag

        with self.lock:
            metrics, tags = self.metrics[: self.BATCH], dict(self.tags)
        if not (metrics or tags):
            return False
        try:
            self.client.log_batch(self.run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
        except Exception as e:  # noqa: BLE001 - whatever the failure, keep the values and try again later
            if self.down_since is None:
                self.down_since = time.time()
                self.say(f"MLflow at {self.uri} does not answer ({str(e).splitlines()[0][:160]}); training goes "
                         "on and its metrics are kept until it does")
            return False
        with self.lock:
            del self.metrics[: len(metrics)]
            for key, value in tags.items():
                if self.tags.get(key) == value:  # not set anew meanwhile
                    del self.tags[key]
            more = bool(self.metrics)
        if self.down_since is not None:
            self.say(f"MLflow at {self.uri} answers again after {time.time() - self.down_since:.0f} s; "
                     "the metrics kept meanwhile are sent")
            self.down_since = None
        return more
