"""Connecting to Ray: a cluster given by address, or a local one started here."""

from __future__ import annotations

import os

from pipeline.config import RayConfig


def connect(cfg: RayConfig) -> None:
    """Join the cluster at `ray.address` / $RAY_ADDRESS, else start a local one; idempotent."""
    import ray

    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS", "")
        if address:
            ray.init(address=address, logging_level="WARNING")
        else:
            ray.init(num_cpus=cfg.num_cpus or None, include_dashboard=cfg.dashboard, logging_level="WARNING")
    # Results in input order, so that everything built from them is deterministic.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
