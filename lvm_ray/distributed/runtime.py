"""Connecting to Ray: the one place lvm_ray starts or joins a cluster.

Where it connects, in order: an explicit address (`--address local | auto | host:port`), then
RAY_ADDRESS (set for jobs submitted to a cluster), then the cluster an earlier `ray start`
recorded (Ray's current-cluster file), else a new local Ray. A recorded cluster is probed first
with a short TCP connect: a head that died without `ray stop` leaves its record behind, and a
plain `ray.init()` would wait ~10 minutes for it before failing.

Unless verbose, Ray's own chatter is kept off the screen (its INFO logs in the driver and every
worker, Ray Data's progress logging, deprecation warnings of Ray internals), so what a user reads
is lvm_ray's progress; `lvm -v` shows everything.
"""

from __future__ import annotations

import logging
import os
import socket

from lvm_ray.console import say

PROBE_TIMEOUT_S = 2.0


class RayUnreachable(RuntimeError):
    """The Ray cluster named by --address or RAY_ADDRESS does not answer."""


def recorded_address() -> str | None:
    """The address `ray start` recorded in Ray's current-cluster file, if any."""
    from ray._private.utils import read_ray_address

    return read_ray_address() or None


def answers(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether something listens at host:port (a GCS), within timeout_s. Other address forms
    (ray://, http://) are not probed here and count as answering."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return True
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def init_ray(num_cpus: int | None = None, address: str | None = None,
             verbose: bool = False) -> None:
    """Start or join Ray (see the module docstring for where it connects and what it shows)."""
    import ray

    if ray.is_initialized():
        return
    quiet = {} if verbose else _quiet()
    target = address or os.environ.get("RAY_ADDRESS") or None
    where = "--address" if address else "RAY_ADDRESS"
    if target == "local":
        _start_local(num_cpus, quiet)
        return
    if target and target != "auto":
        if not answers(target):
            raise RayUnreachable(f"no Ray cluster answers at {target} (from {where}); start it, "
                                 "or pass --address local for a new local Ray")
        ray.init(address=target, log_to_driver=True, **quiet)
        return
    recorded = recorded_address()
    if recorded and answers(recorded):
        say(f"joining the Ray cluster at {recorded} (recorded by `ray start`; --address local "
            "starts a separate one)")
        ray.init(address=recorded, log_to_driver=True, **quiet)
    elif recorded:
        if target == "auto":
            raise RayUnreachable(f"--address auto: the Ray cluster recorded at {recorded} does "
                                 "not answer (its head ended without `ray stop`); run `ray stop` "
                                 "to clear the record, or pass --address local")
        say(f"the Ray cluster recorded at {recorded} does not answer (its head ended without "
            "`ray stop`); starting a local Ray instead. `ray stop` clears the record.")
        _start_local(num_cpus, quiet)
    elif target == "auto":
        raise RayUnreachable("--address auto: no running Ray cluster was found; start one with "
                             "`ray start --head`, or pass --address local")
    else:
        _start_local(num_cpus, quiet)


def _start_local(num_cpus: int | None, quiet: dict) -> None:
    import ray

    if quiet:
        # Read by the processes this Ray starts (a cluster joined keeps its own environment):
        # Ray internals' deprecation warnings, and the preemption watcher, which only matters on
        # preemptible cloud nodes and logs an error line at every Train run here.
        os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The dashboard (bound to 127.0.0.1) also serves the state API Ray Train polls.
    ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True,
             **quiet)


def _quiet() -> dict:
    """ray.init arguments (and driver settings) that keep Ray's INFO chatter off the screen."""
    import ray
    import ray.data

    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    _quiet_ray_data_workers()
    return {"logging_level": logging.WARNING,
            "logging_config": ray.LoggingConfig(log_level="WARNING")}


def _quiet_ray_data_workers() -> None:
    """Ray Data configures its console logger at INFO in every process from its own config (not
    from ray.init's); RAY_DATA_LOGGING_CONFIG names another, the same with the console at
    WARNING. Its full log still goes to the session's ray-data.log."""
    import copy
    import tempfile

    import yaml

    try:
        from ray.data._internal import logging as data_logging
    except ImportError:  # another Ray version: its chatter stays, nothing breaks
        return
    if os.environ.get(data_logging.RAY_DATA_LOGGING_CONFIG_ENV_VAR_NAME):
        return  # the user's own config wins
    config = copy.deepcopy(data_logging.DEFAULT_CONFIG)
    config["handlers"]["console"]["level"] = "WARNING"
    # Its warning that progress bars are off is about the setting above, not news.
    config["loggers"]["ray.data._internal.progress"] = {"level": "ERROR"}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="lvm_ray_data_logging_",
                                     delete=False) as f:
        yaml.safe_dump(config, f)
    os.environ[data_logging.RAY_DATA_LOGGING_CONFIG_ENV_VAR_NAME] = f.name
    data_logging.configure_logging()
