"""Deploying a serve config file through the Python API: what `lvm serve` runs.

`serve run CONFIG` and `serve deploy CONFIG` do the same from the command line; this path applies
each `deployments` entry as deployment options, as Serve does, gives every application one
session key when none is set, starts a local Ray in Serve's throughput-optimized mode, and says
where it actually listens.
"""

import functools
import os
import time
from pathlib import Path
from typing import Any

import yaml
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from lvm_ray.serve.app import make_app, make_model_app
from lvm_ray.serve.ensemble import ENSEMBLE_APP, EnsembleServer
from lvm_ray.serve.sessions import KEY_ENV, new_key

# The apps run_config deploys, by import path: how each is built from (args, options).
APPS = {"lvm_ray.serve.app:build_app": make_app,
        "lvm_ray.serve.app:build_model_app": make_model_app,
        ENSEMBLE_APP: functools.partial(make_app, model_class=EnsembleServer)}
# Serve's throughput-optimized mode (RAY_NOTES.md, docs/serve.md "Fast settings"): user code
# and the handle router on the replica's own event loop, gRPC between replicas, request logs
# buffered, GC frozen after start-up. Safe here because nothing lvm_ray runs on a replica's event
# loop blocks for long: model batches above a few vectors and the text encoder run in threads,
# and the rest (JSON parsing, a batch-1 append) takes a millisecond or two. Direct ingress (each
# ingress replica also serves HTTP on its own port, for a load balancer in front) is opt-in:
# clients use the proxy's address unless `lvm serve --direct-ingress`.
FAST_SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"


def use_fast_serve_settings(direct_ingress: bool = False) -> None:
    """Put FAST_SERVE_ENV in this process's environment (unless set otherwise), so a local Ray
    started after this call runs Serve in throughput-optimized mode; direct_ingress: every
    application's ingress replicas also answer HTTP on their own ports (direct_ingress_targets),
    which skips the proxy's hop and its call back for the request body (BENCHMARKS.md, scale).
    A Ray that is already running, or a cluster, keeps the settings it was started with."""
    if direct_ingress:
        os.environ[DIRECT_INGRESS_ENV] = "1"
    for k, v in FAST_SERVE_ENV.items():
        os.environ.setdefault(k, v)


def direct_ingress_targets() -> dict[str, list[str]]:
    """{application: its ingress replicas' own HTTP addresses} when Serve runs with direct
    ingress; {} otherwise (Serve then only lists its proxies). Replicas come and go with
    autoscaling: a load balancer reads these again (or runs Serve's HAProxy mode)."""
    from ray.serve.context import _get_global_client

    import ray

    controller = _get_global_client()._controller
    groups = ray.get(controller.get_target_groups.remote())
    # A replica binds Serve's HTTP host (as the proxy does): the node's address only when that
    # host is every interface.
    host = ray.get(controller.get_http_config.remote()).host
    out: dict[str, list[str]] = {}
    for g in groups:
        replicas = [t for t in g.targets if t.name.startswith("SERVE_REPLICA::")]
        if g.protocol == "HTTP" and g.app_name and replicas:  # a str enum
            out[g.app_name] = [f"http://{t.ip if host in ('0.0.0.0', '::') else host}:{t.port}"
                               for t in replicas]
    return out


def app_from_config(app: dict[str, Any]) -> Application:
    """One `applications` entry of a serve config -> the app, its `deployments` entries applied
    as deployment options (what Serve does when it deploys the config)."""
    build = APPS.get(app["import_path"])
    if build is None:
        raise ValueError(f"run_config deploys lvm_ray apps only ({', '.join(APPS)}), got "
                         f"{app['import_path']}; use `serve run`")
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"}
               for d in app.get("deployments", [])}
    if build is make_model_app:  # one deployment: its options apply directly
        return make_model_app(app.get("args", {}), next(iter(options.values()), None))
    return build(app.get("args", {}), options)


def serving_address() -> str:
    """The address Serve's HTTP proxy is bound to, read back from the running Serve (not from
    the config file: a Serve started earlier keeps its own options)."""
    from ray.serve.context import _get_global_client

    import ray

    cfg = ray.get(_get_global_client()._controller.get_http_config.remote())
    return f"http://{cfg.host}:{cfg.port}"


def grpc_address() -> str | None:
    """Where Serve's gRPC proxy listens, or None when no gRPC servicer is configured. Ray 2.60
    binds it to every interface ([::]), whatever http_options.host says."""
    from ray.serve.context import _get_global_client

    import ray

    cfg = ray.get(_get_global_client()._controller.get_grpc_config.remote())
    return f"[::]:{cfg.port} (all interfaces)" if cfg.grpc_servicer_functions else None


def run_config(path: str | Path, blocking: bool = True) -> dict[str, DeploymentHandle]:
    """Deploy a serve config file (e.g. serve_configs/hybrid.yaml) on the current Ray (started
    locally if needed, in Serve's throughput-optimized mode) through the Python API: what
    `serve run CONFIG` does, for `lvm serve`. With blocking=True it serves until interrupted.
    Returns the ingress handle of each app."""
    import ray
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(Path(path).read_text())
    ServeDeploySchema.model_validate(raw)  # the same checks `serve deploy` makes
    apps = raw["applications"]
    for app in apps:  # refuse a foreign app before starting anything
        if app["import_path"] not in APPS:
            raise ValueError(f"{path}: run_config deploys lvm_ray apps only ({', '.join(APPS)}), "
                             f"got {app['import_path']}; use `serve run {path}`")
    if not (os.environ.get(KEY_ENV) or all(a.get("args", {}).get("session_key") for a in apps)):
        # One key for every application of this deploy: the router signs, the models verify.
        # Sessions do not survive a restart of `lvm serve` unless LVM_SESSION_KEY is set.
        key = new_key()
        for app in apps:
            app.setdefault("args", {})["session_key"] = key
    if not ray.is_initialized():
        use_fast_serve_settings()  # read by the processes the local Ray starts
        ray.init()
    serve.start(http_options=raw.get("http_options") or {},
                grpc_options=raw.get("grpc_options") or None)
    handles = {app["name"]: serve.run(app_from_config(app), name=app["name"],
                                      route_prefix=app.get("route_prefix", "/"))
               for app in apps}
    grpc = grpc_address()
    print(f"lvm_ray serving on {serving_address()}/ (OpenAPI at /docs)"
          + (f", gRPC on {grpc}" if grpc else "") + "; Ctrl-C stops it", flush=True)
    for app, urls in direct_ingress_targets().items():
        print(f"  {app}: direct ingress (no proxy hop) at {', '.join(urls)}", flush=True)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return handles
