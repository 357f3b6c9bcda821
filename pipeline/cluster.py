"""Connecting to Ray: a cluster given by address, or a local one started here. Every command reaches Ray through
`connect` before its first Ray call (the tests run with Ray's auto-connect off, so a call that skips it fails)."""

from __future__ import annotations

import os
import socket
import tempfile

from pipeline.config import RayConfig
from pipeline.logs import link_ray_session_logs

REACH_TIMEOUT_S = 10.0
"""How long a cluster's address may take to accept a connection before the command gives up with `ClusterError`."""


class ClusterError(Exception):
    """A Ray cluster that cannot be joined, said in one line with what to do."""


def connect(cfg: RayConfig) -> None:
    """Join the cluster at `ray.address` / $RAY_ADDRESS, else start a local one (`start_local`); idempotent. An
    address that does not answer within REACH_TIMEOUT_S is a `ClusterError` (Ray itself would retry it forever).

    Workers' output stays in Ray's session logs (`log_to_driver=False`): the stages show their own
    progress, and a worker's error reaches the driver as the exception Ray raises there.
    """
    import ray

    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS", "")
        quiet = {"log_to_driver": False, "configure_logging": False}  # `pipeline.logs` routes Ray's logging
        if address:
            check_reachable(address)
            ray.init(address=address, **quiet)
        else:
            start_local(cfg, quiet)
        if not address.startswith("ray://"):  # a Ray Client driver has no Ray session on this machine
            link_ray_session_logs()
    context = ray.data.DataContext.get_current()
    # results in input order: everything built from them is deterministic
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # each stage draws its own


def start_local(cfg: RayConfig, options: dict) -> None:
    """A new cluster on this machine, in a Ray temp folder of its own that names it. Ray's lookups of "this machine's
    cluster" made from inside a cluster read the address file in Ray's temp folder, where `ray start` (before or
    after this) writes the address of its own: Ray Train's placement-group cleaner makes one every second and, told by
    that other cluster that the run's controller did not exist, removed the run's placement group (the run died of
    "controller error"). An address an earlier cluster left there is not joined either."""
    import ray
    from ray._private.utils import write_ray_address  # private: the address file's own code

    saved = os.environ.get("RAY_TMPDIR")
    if saved:
        os.makedirs(saved, exist_ok=True)  # as Ray would
    own = tempfile.mkdtemp(prefix="gss-ray-", dir=saved or None)  # short below /tmp: Ray's socket paths live under it
    os.environ["RAY_TMPDIR"] = own  # while the cluster starts: its processes keep it, this one's children do not
    try:
        ray.init(address="local", num_cpus=cfg.num_cpus or None, include_dashboard=cfg.dashboard, **options)
        write_ray_address(ray.get_runtime_context().gcs_address, os.path.join(own, "ray"))  # Ray's layout
    finally:
        if saved is None:
            del os.environ["RAY_TMPDIR"]
        else:
            os.environ["RAY_TMPDIR"] = saved


def check_reachable(address: str) -> None:
    """Raise ClusterError unless `address` (host:port, ray://host:port, or "auto": the address file in Ray's temp
    folder) accepts a TCP connection within REACH_TIMEOUT_S."""
    from ray._private.utils import read_ray_address  # private: no public API finds "auto"'s address without joining

    target = read_ray_address() if address == "auto" else address.removeprefix("ray://")
    what_to_do = ("start it (`ray start --head`, or `ray up ray_cluster.yaml`), or unset RAY_ADDRESS and ray.address "
                  "to run on a new local cluster")
    if not target:
        raise ClusterError(f"ray address 'auto': no Ray cluster on this machine; {what_to_do}")
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        raise ClusterError(f"no Ray cluster answers at {target} ({e or type(e).__name__}); {what_to_do}") from None
