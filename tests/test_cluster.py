"""`pipeline.cluster.connect` starting a local cluster beside another one on the same machine."""

import subprocess
import sys
import tempfile
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

from tests.corpus import fresh_process_env
from tests.ray_head import ray_head, without_ray_auth

REPO = Path(__file__).resolve().parents[1]

# A `gss` driver's local cluster, then the lookup Ray Train's placement-group cleaner makes every second from a
# process of that cluster: the State API of "this machine's cluster", asked for an actor of this one.
LOOKUP = textwrap.dedent("""
    import time
    import ray
    from pipeline.cluster import connect
    from pipeline.config import RayConfig

    connect(RayConfig(num_cpus=1))

    @ray.remote(num_cpus=0)
    class Probe:
        pass

    @ray.remote(num_cpus=0)
    def found(actor_id):
        from ray.util.state import get_actor
        from ray.util.state.exception import RayStateApiException

        for _ in range(120):
            try:
                return get_actor(actor_id) is not None
            except RayStateApiException:  # the dashboard is still starting
                time.sleep(0.5)
        return "the State API never answered"

    probe = Probe.remote()
    ray.get(probe.__ray_ready__.remote())
    print("found:", ray.get(found.remote(probe._actor_id.hex())))
""")


def serves(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/api/version", timeout=5)
    except urllib.error.HTTPError:
        return True  # it answers
    except OSError:
        return False
    return True


def test_a_local_cluster_beside_a_live_one_finds_itself(tmp_path):
    """A cluster from `ray start --head` on this machine names itself in Ray's temp folder; a `gss` command on a
    local cluster starts its own all the same, and lookups from that cluster's processes reach it, not the other
    (the placement-group cleaner, told by the other that the run's controller does not exist, removed a live run's
    workers)."""
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live under it
    env = without_ray_auth(fresh_process_env(RAY_TMPDIR=ray_tmp))
    address_file = Path(ray_tmp) / "ray" / "ray_current_cluster"  # what the lookups read: written once it is up
    with ray_head(tmp_path / "head.log", env, lambda url: address_file.exists() and serves(url)):
        done = subprocess.run([sys.executable, "-c", LOOKUP], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "found: True" in done.stdout, (done.stdout[-2000:], done.stderr[-3000:])
