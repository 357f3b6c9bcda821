"""MLflow store resolution and the fail-fast check for an unreachable tracking server."""

import time

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.tracking import Tracking, flatten, tracking_uri


def test_default_store_is_sqlite_in_the_root(tmp_path):
    cfg = load_config(None, [f"root={tmp_path}"])
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ConfigError, match="sqlite MLflow store cannot live in a bucket"):
        tracking_uri(load_config(None, ["root=gs://bucket/x"]))


def test_unreachable_tracking_server_is_a_clear_error_before_any_work(tmp_path):
    cfg = load_config(None, [f"root={tmp_path}", "tracking.uri=http://127.0.0.1:9"])
    with pytest.raises(ConfigError, match="http://127.0.0.1:9 is not reachable.*infra/mlflow"):
        Tracking.of(cfg)


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": [2], "e": "x"}



def sqlite_run_and_logger(tmp_path):
    """A run in a sqlite store under `tmp_path`, and a background logger of it whose lines go to `said`."""
    from mlflow import MlflowClient

    from pipeline.tracking import BackgroundLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    said = []
    return client, uri, run_id, BackgroundLogger(uri, run_id, say=said.append), said


def test_the_background_logger_sends_everything_in_order_of_steps(tmp_path):
    client, uri, run_id, sender, said = sqlite_run_and_logger(tmp_path)
    for step in range(1, 1201):  # more than one batch of MLflow's 1000
        sender.log(step, {"loss": 1.0 / step})
    sender.set_tag("gss.some", "value")
    assert sender.close(flush_s=60) is None and said == []
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 1201))
    assert client.get_run(run_id).data.tags["gss.some"] == "value"


def test_a_tracking_server_that_never_answers_costs_metrics_not_training_and_says_what_is_lost(monkeypatch):
    from pipeline.tracking import BackgroundLogger

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries would take minutes
    said = []
    sender = BackgroundLogger("http://127.0.0.1:9", "run-1", say=said.append, retry_s=0.1)
    for step in (5, 10, 15):
        sender.log(step, {"loss": 1.0, "lr": 0.1})  # returns at once: nothing waits for the server
    lost = sender.close(flush_s=1)
    assert len(said) == 1 and said[0].startswith("MLflow at http://127.0.0.1:9 does not answer")
    assert lost == ("MLflow at http://127.0.0.1:9 did not take them within 1 s of the end: 6 metric values of "
                    "steps 5-15 and 0 tags of run run-1 are lost")


def test_a_metric_mlflow_refuses_is_said_once_and_dropped_and_the_rest_goes_on(tmp_path):
    client, uri, run_id, sender, said = sqlite_run_and_logger(tmp_path)
    for step in range(1, 4):
        sender.log(step, {"loss": 1.0 / step, "loss?": 1.0})  # MLflow takes no '?' in a name
    sender.set_tag("gss.some", "value")
    assert sender.close(flush_s=60) is None
    assert len(said) == 1 and said[0].startswith(f"MLflow at {uri} refuses metric 'loss?' of run {run_id} (Invalid "
                                                 "value"), said
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3]
    assert client.get_run(run_id).data.tags["gss.some"] == "value"


def test_at_close_a_request_still_unanswered_is_waited_for_then_said_to_be_unsure():
    """A server that takes the connection and never answers (a listening socket nobody accepts from): close waits
    `in_flight_s` for the request out, then says its values are lost, or may yet arrive."""
    import socket

    from pipeline.tracking import BackgroundLogger

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        sender = BackgroundLogger(uri, "run-1", say=print)
        sender.log(5, {"loss": 1.0, "lr": 0.1})
        started = time.monotonic()
        lost = sender.close(flush_s=1, in_flight_s=1)
        assert 1.9 < time.monotonic() - started < 10
    assert lost == (f"MLflow at {uri} did not take them within 1 s of the end: 2 metric values of steps 5-5 and 0 "
                    "tags of run run-1 are lost (2 of them in a request still unanswered, which may yet arrive)")
