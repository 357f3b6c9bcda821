import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster, shared by the tests that need one; its dashboard serves `gss submit`."""
    import ray

    from pipeline.cluster import connect
    from pipeline.config import RayConfig

    connect(RayConfig(num_cpus=2, dashboard=True))
    yield
    ray.shutdown()
