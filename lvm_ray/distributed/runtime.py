"""Connecting to Ray: the one place lvm_ray starts or joins a cluster."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster a job was submitted to (RAY_ADDRESS), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # The dashboard (bound to 127.0.0.1) also serves the state API Ray Train polls.
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True)
