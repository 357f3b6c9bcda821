"""Connecting to Ray: a cluster given by address, or a local one started here."""

from __future__ import annotations

import os

from pipeline.config import RayConfig
from pipeline.logs import link_ray_session_logs


def connect(cfg: RayConfig) -> None:
    """Join the cluster at `ray.address` / $RAY_ADDRESS, else start a local one; idempotent.

    Workers' output stays in Ray's session logs (`log_to_driver=False`): the stages show their own
    progress, and a worker's error reaches the driver as the exception Ray raises there.
    """
    import ray

    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS", "")
        quiet = {"log_to_driver": False, "configure_logging": False}  # `pipeline.logs` routes Ray's logging
        if address:
            ray.init(address=address, **quiet)
        else:
            # "local": a new cluster even if another one on this machine left its address behind in /tmp/ray
            ray.init(address="local", num_cpus=cfg.num_cpus or None, include_dashboard=cfg.dashboard, **quiet)
        link_ray_session_logs()
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # results in input order: everything built from them is deterministic
    context.enable_progress_bars = False  # each stage draws its own
