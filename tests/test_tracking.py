"""MLflow store resolution and the fail-fast check for an unreachable tracking server."""

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.tracking import flatten, setup, tracking_uri


def test_default_store_is_sqlite_in_the_root(tmp_path):
    cfg = load_config(None, [f"root={tmp_path}"])
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ConfigError, match="sqlite MLflow store cannot live in a bucket"):
        tracking_uri(load_config(None, ["root=gs://bucket/x"]))


def test_unreachable_tracking_server_is_a_clear_error_before_any_work(tmp_path):
    cfg = load_config(None, [f"root={tmp_path}", "tracking.uri=http://127.0.0.1:9"])
    with pytest.raises(ConfigError, match="http://127.0.0.1:9 is not reachable.*infra/mlflow"):
        setup(cfg)


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": [2], "e": "x"}

