import os
import tempfile

import pytest
import torch

# Ray's auto-connect off, for this process and every `gss` process a test starts: a Ray call that a command makes
# before `pipeline.cluster.connect` fails instead of joining whatever cluster /tmp/ray names.
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"

# Each pytest-xdist worker its own Ray temp folder, for its processes and theirs. A cluster started by `ray start` or
# `ray.cluster_utils.Cluster` writes its address to <temp>/ray/ray_current_cluster, and Ray Train's placement-group
# cleaner, started with each training run, asks the cluster named there whether the run's controller lives. Named the
# other worker's cluster, it was told no and removed a live run's placement group: the run died of "controller error".
if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["RAY_TMPDIR"] = os.path.join(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir(), f"ray-{worker}")

from tests.seed import TEST_SEED

# The files that take minutes, in this order before the rest: `make test-cpu`'s two workers take whole files in
# collection order (pytest-xdist's loadfile, not reordered), so none of them starts last and runs on alone at the end.
LONG_FILES = ("test_tracking_server.py", "test_gcs.py", "test_lost_node.py", "test_train.py", "test_pipeline.py",
              "test_fsdp.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        return LONG_FILES.index(item.path.name) if item.path.name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: each file's tests, and the other files, keep their order


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(TEST_SEED)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster, shared by the tests that need one; its dashboard serves `gss submit`."""
    import ray
    from ray._private.parameter import RayParams

    from pipeline.cluster import connect
    from pipeline.config import RayConfig

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RayParams, "__init__", _dashboard_agent_on_a_free_port(RayParams.__init__))
        connect(RayConfig(num_cpus=2, dashboard=True))
    yield
    ray.shutdown()


def _dashboard_agent_on_a_free_port(init):
    """`init` with the dashboard agent's port None unless given, which Ray makes a free port (as `ray.cluster_utils`
    does for its worker nodes). `ray.init` has no argument for it and leaves it on Ray's fixed 52365: with the two
    lanes of `make test` side by side, each with a cluster, the second agent found it taken and never served, and
    `gss submit` had no job agent to hand its job to."""

    def init_on_a_free_port(self, *args, dashboard_agent_listen_port=None, **kwargs):
        init(self, *args, dashboard_agent_listen_port=dashboard_agent_listen_port, **kwargs)

    return init_on_a_free_port


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A local GCS server (tests/gcs.py) for the whole session, its address in this process's environment."""
    import os

    from tests.gcs import LocalGCS

    server = LocalGCS(tmp_path_factory.mktemp("gcs")).start()
    saved = {key: os.environ.get(key) for key in server.env}
    os.environ.update(server.env)
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
