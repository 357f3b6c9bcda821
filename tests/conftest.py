import os

import pytest
import torch

# Ray's auto-connect off, for this process and every `gss` process a test starts: a Ray call that a command makes
# before `pipeline.cluster.connect` fails instead of joining whatever cluster /tmp/ray names.
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"

from tests.seed import TEST_SEED


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(TEST_SEED)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster, shared by the tests that need one; its dashboard serves `gss submit`."""
    import ray

    from pipeline.cluster import connect
    from pipeline.config import RayConfig

    connect(RayConfig(num_cpus=2, dashboard=True))
    yield
    ray.shutdown()


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
