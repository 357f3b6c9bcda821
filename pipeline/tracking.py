"""MLflow for every stage: where the store is (`Tracking`, one per command), one run per stage (nested under a
parent when there is one), the names the stages use to find each other's results there (the `gss.*` tags, the
registered model name and its alias) and the queries that find them."""

from __future__ import annotations

import contextlib
import dataclasses
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
    SWEEP = "gss.sweep"  # a sweep cell's `gss run` parent run: the sweep's name; its axis values as `sweep_axis(..)`
    SWEEP_CELL = "gss.sweep.cell"  # and the cell's name
    PARENT_RUN = "mlflow.parentRunId"  # MLflow's own: the run a nested run belongs to

    @staticmethod
    def sweep_axis(axis: str) -> str:
        return f"{Tag.SWEEP}.{axis}"


ALIAS = "current"  # the alias `gss train` moves to each newly registered version (`latest` is reserved)
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param's value


def registered_name(cfg: RunConfig) -> str:
    """The registered model a run's training produces."""
    return cfg.train.register_as or f"gss-{cfg.name}"


def default_model_uri(cfg: RunConfig) -> str:
    """`eval.model`, else the run's registered model at its alias."""
    return cfg.eval.model or f"models:/{registered_name(cfg)}@{ALIAS}"


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


@dataclasses.dataclass(frozen=True)
class Tracking:
    """The MLflow store and experiment of one command: `Tracking.of(cfg)` where the command starts (the server's
    health and our credentials checked once, the experiment made if it is new), then handed to the stages it
    runs; a stage called alone makes its own. Training workers get `uri` in their payload."""

    uri: str
    experiment_id: str
    client: Any  # mlflow.MlflowClient(uri)

    @classmethod
    def of(cls, cfg: RunConfig) -> Tracking:
        import mlflow
        from mlflow import MlflowClient

        uri = tracking_uri(cfg)
        check_reachable(uri)
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            cfg.tracking.experiment, artifact_location=artifact_location(cfg, uri))
        # MLflow's module-level API (start_run, log_model, load_model of models:/...) takes its store from here
        # and nowhere else: this is the one place that sets it
        mlflow.set_tracking_uri(uri)
        return cls(uri, experiment_id, client)

    def resolve_model_uri(self, ref: str) -> str:
        """models:/name@alias -> models:/name/<version>, so results are recorded against a fixed version."""
        if ref.startswith("models:/") and "@" in ref:
            name, _, alias = ref.removeprefix("models:/").partition("@")
            return f"models:/{name}/{self.client.get_model_version_by_alias(name, alias).version}"
        return ref

    @contextlib.contextmanager
    def stage_run(self, cfg: RunConfig, stage: str, tags: dict[str, str]) -> Iterator[Any]:
        """An MLflow run for one stage, nested under the active run (the `gss run` parent) if there is one."""
        import mlflow

        parent = mlflow.active_run()
        with mlflow.start_run(
            experiment_id=self.experiment_id,
            run_name=f"{cfg.name}/{stage}",
            nested=parent is not None,
            tags={Tag.STAGE: stage, Tag.RUN_NAME: cfg.name, **tags},
        ) as run:
            yield run


def artifact_location(cfg: RunConfig, uri: str) -> str | None:
    """Where a new experiment keeps its artifacts (models, manifests, plots): beside the run's other files,
    `<root>/mlartifacts` (a local folder or gs://, written through google-cloud-storage with the usual Google
    credentials), unless a tracking server decides (infra/mlflow serves them from its own bucket)."""
    if uri.startswith(("http://", "https://")):
        return None
    return absolute(join(cfg.root, "mlartifacts"))


# ---------------------------------------------------------------------------------------------------
# Named queries: the one place that writes MLflow search filters.


def _tag_is(key: str, value: str) -> str:
    return f"tags.`{key}` = '{value}'"


def _search(client, experiment_ids: list[str], *conditions: str) -> list[Any]:
    """Every run matching all `conditions`, page after page."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, " AND ".join(conditions), max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


def run_tagged(client, experiment_ids: list[str], key: str, value: str) -> Any | None:
    """The run whose tag `key` is `value` (a name that identifies it), or None."""
    found = client.search_runs(experiment_ids, _tag_is(key, value), max_results=1)
    return found[0] if found else None


def find_or_create_run(client, experiment_id: str, key: str, run_name: str, tags: dict[str, str]) -> tuple[Any, bool]:
    """The run whose tag `key` is `tags[key]`, found again after an interruption or for a re-run, else a new one
    with `tags`; and whether it is new."""
    found = run_tagged(client, [experiment_id], key, tags[key])
    if found is not None:
        return found, False
    return client.create_run(experiment_id, run_name=run_name, tags=tags), True


def finished_evals(client, experiment_ids: list[str], model_uri: str = "", parent_run_id: str = "",
                   dataset: str = "", max_documents: int | None = None) -> list[Any]:
    """Finished eval runs, of a model version (`gss.model_uri`), of a `gss run` parent, on a dataset, of a
    `max_documents`: each given one narrows the search."""
    conditions = [_tag_is(Tag.STAGE, "eval"), "attributes.status = 'FINISHED'"]
    for key, value in ((Tag.MODEL_URI, model_uri), (Tag.PARENT_RUN, parent_run_id), (Tag.DATASET, dataset),
                       (Tag.MAX_DOCUMENTS, "" if max_documents is None else str(max_documents))):
        if value:
            conditions.append(_tag_is(key, value))
    return _search(client, experiment_ids, *conditions)


def sweep_cells(client, experiment_id: str, sweep: str) -> list[Any]:
    """The `gss run` parent runs of a sweep's finished cells."""
    return _search(client, [experiment_id], _tag_is(Tag.SWEEP, sweep))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}, the form MLflow params take."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def param_values(params: dict[str, Any]) -> dict[str, str]:
    """Nested params as MLflow takes them: flat keys, values as text cut to its limit."""
    return {key: str(value)[:MAX_PARAM_CHARS] for key, value in flatten(params).items()}


def log_params(params: dict[str, Any]) -> None:
    import mlflow

    mlflow.log_params(param_values(params))


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


class Outage:
    """Since when the tracking server has not answered, as one reader or writer of it sees it (the workers'
    background logger, the driver's bar): `failed` and `answered` each say whether this call changed that, so that
    each change is said once."""

    def __init__(self):
        self.since: float | None = None  # time.time() of the first failure in a row

    def failed(self) -> bool:
        """A request got no answer; True if that begins an outage."""
        if self.since is not None:
            return False
        self.since = time.time()
        return True

    def answered(self) -> float | None:
        """A request got an answer; the outage's length in seconds if that ends one."""
        if self.since is None:
            return None
        lasted, self.since = time.time() - self.since, None
        return lasted

    def clock(self) -> str:
        """When it began, as the terminal shows it."""
        return time.strftime("%H:%M:%S", time.localtime(self.since))


def refused(error: Exception) -> bool:
    """MLflow turned a request down for what it holds (a metric name it does not take, a run it does not have):
    sending it again cannot help. Unreachable, overloaded, failing (5xx) or refusing our credentials is an outage:
    that passes."""
    from mlflow.exceptions import MlflowException

    status = error.get_http_status_code() if isinstance(error, MlflowException) else 0
    return 400 <= status < 500 and status not in (401, 403, 408, 429)


class BackgroundLogger:
    """Metrics and tags for one MLflow run, sent from a thread so that a tracking server that is slow or down
    never stalls or stops training.

    An outage (no answer, a 5xx, credentials refused) keeps what cannot be sent in memory and tries again, every
    `retry_s` doubling up to a minute (MLflow's own client retries each request for about 4 minutes first); the
    outage and the recovery are each said in one line (`say`). A refusal (a 4xx: MLflow will never take that batch)
    sends the batch again one metric name and one tag at a time, says in one line which one MLflow refuses and why,
    drops that one and goes on. `close()` waits up to `flush_s` for what is still unsent and then for the request in
    flight, up to `in_flight_s`, before it calls anything lost. A batch whose reply was lost in an outage can be
    stored twice: readers key metrics by step."""

    BATCH = 1000  # MLflow's limit on metrics in one log_batch
    MAX_RETRY_S = 60.0

    def __init__(self, tracking_uri: str, run_id: str, say=print, retry_s: float = 5.0):
        from mlflow import MlflowClient

        self.client, self.run_id, self.uri, self.say, self.retry_s = MlflowClient(tracking_uri), run_id, \
            tracking_uri, say, retry_s
        self.metrics: list = []  # mlflow.entities.Metric, oldest first
        self.tags: dict[str, str] = {}
        self.lock, self.wake = threading.Lock(), threading.Event()
        self.closing = self.stopped = False  # stopped: no new request (close has waited long enough)
        self.in_flight = 0  # metric values in the request being sent
        self.outage = Outage()
        self.failures = 0  # tries in a row that found MLflow away
        self.refused_names: set[str] = set()  # said once each
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

    def close(self, flush_s: float = 300.0, in_flight_s: float = 30.0) -> str | None:
        """Send what is left; the line that says what is lost, if anything is."""
        self.closing = True
        self.wake.set()
        self.thread.join(flush_s)
        self.stopped = True
        self.wake.set()
        self.thread.join(in_flight_s)  # a request still out may yet deliver its batch
        with self.lock:
            metrics, tags = list(self.metrics), dict(self.tags)
            self.metrics, self.tags = [], {}  # a request still out after this removes nothing
            in_flight = self.in_flight if self.thread.is_alive() else 0
        if not (metrics or tags):
            return None
        steps = sorted({m.step for m in metrics})
        span = f" of steps {steps[0]}-{steps[-1]}" if steps else ""
        unsure = f" ({in_flight} of them in a request still unanswered, which may yet arrive)" if in_flight else ""
        return (f"MLflow at {self.uri} did not take them within {flush_s:.0f} s of the end: {len(metrics)} metric "
                f"values{span} and {len(tags)} tags of run {self.run_id} are lost{unsure}")

    def _send_until_closed(self) -> None:
        while True:
            self.wake.wait(None if self.outage.since is None else min(self.retry_s * 2 ** (self.failures - 1),
                                                                       self.MAX_RETRY_S))
            self.wake.clear()
            while not self.stopped and self._send_one_batch():
                pass
            with self.lock:
                if self.stopped or (self.closing and not (self.metrics or self.tags)):
                    return

    def _send_one_batch(self) -> bool:
        """Send the oldest batch; True if it went (or was refused) and more is waiting."""
        with self.lock:
            metrics, tags = self.metrics[: self.BATCH], dict(self.tags)
            self.in_flight = len(metrics)
        if not (metrics or tags):
            return False
        try:
            try:
                self._log(metrics, tags)
            except Exception as e:  # noqa: BLE001 - an outage or a refusal: both are sorted below
                if not refused(e):
                    raise
                self._log_each_name_alone(metrics, tags)
        except Exception as e:  # noqa: BLE001 - whatever the outage, keep the values and try again later
            self.failures += 1
            if self.outage.failed():
                self.say(f"MLflow at {self.uri} does not answer ({str(e).splitlines()[0][:160]}); training goes "
                         "on and its metrics are kept until it does")
            return False
        finally:
            self.in_flight = 0
        with self.lock:
            del self.metrics[: len(metrics)]
            for key, value in tags.items():
                if self.tags.get(key) == value:  # not set anew meanwhile
                    del self.tags[key]
            more = bool(self.metrics)
        lasted = self.outage.answered()
        if lasted is not None:
            self.say(f"MLflow at {self.uri} answers again after {lasted:.0f} s; the metrics kept meanwhile are sent")
            self.failures = 0
        return more

    def _log(self, metrics: list, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])

    def _log_each_name_alone(self, metrics: list, tags: dict[str, str]) -> None:
        """A refused batch again, one request per metric name and per tag: the one MLflow refuses is said (once
        per name) and dropped; an outage meanwhile raises (what went already may then be stored twice)."""
        by_name: dict[str, list] = {}
        for metric in metrics:
            by_name.setdefault(metric.key, []).append(metric)
        parts = [(f"metric {name!r}", values, {}) for name, values in by_name.items()]
        parts += [(f"tag {key!r}", [], {key: value}) for key, value in tags.items()]
        for name, values, tag in parts:
            try:
                self._log(values, tag)
            except Exception as e:  # noqa: BLE001 - an outage goes up to the caller
                if not refused(e):
                    raise
                if name not in self.refused_names:
                    self.refused_names.add(name)
                    self.say(f"MLflow at {self.uri} refuses {name} of run {self.run_id} "
                             f"({str(e).splitlines()[0][:200]}): its values are dropped, from now on without a word; "
                             "the rest goes on")
