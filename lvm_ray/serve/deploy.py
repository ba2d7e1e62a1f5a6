"""Deploying a serve config file through the Python API: what `lvm serve` runs.

`serve run CONFIG` and `serve deploy CONFIG` do the same from the command line; this path applies
each `deployments` entry as deployment options, as Serve does, and says where it listens.
"""

import time
from pathlib import Path
from typing import Any

import yaml
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from lvm_ray.serve.app import make_app
from lvm_ray.serve.ensemble import ENSEMBLE_APP, EnsembleServer
from lvm_ray.serve.models import ModelServer

PRODUCT_APP = "lvm_ray.serve.app:build_app"
# The apps run_config deploys, by import path: the model deployment each one uses.
MODEL_DEPLOYMENTS = {PRODUCT_APP: ModelServer, ENSEMBLE_APP: EnsembleServer}


def app_from_config(app: dict[str, Any]) -> Application:
    """One `applications` entry of a serve config -> the app, its `deployments` entries applied
    as deployment options (what Serve does when it deploys the config)."""
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"}
               for d in app.get("deployments", [])}
    return make_app(app.get("args", {}), options,
                    model_deployment=MODEL_DEPLOYMENTS[app.get("import_path", PRODUCT_APP)])


def run_config(path: str | Path, blocking: bool = True) -> dict[str, DeploymentHandle]:
    """Deploy a serve config file (e.g. serve_configs/hybrid.yaml) on the current Ray (started
    locally if needed) through the Python API: what `serve run CONFIG` does, for `lvm serve`.
    With blocking=True it serves until interrupted. Returns the ingress handle of each app."""
    import ray
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(Path(path).read_text())
    cfg = ServeDeploySchema.model_validate(raw)  # the same checks `serve deploy` makes
    if not ray.is_initialized():
        ray.init()
    serve.start(http_options=raw.get("http_options") or {})
    handles = {}
    for app in raw["applications"]:
        if app["import_path"] not in MODEL_DEPLOYMENTS:
            raise ValueError(f"{path}: run_config deploys lvm_ray apps only "
                             f"({', '.join(MODEL_DEPLOYMENTS)}), got {app['import_path']}; "
                             f"use `serve run {path}`")
        handles[app["name"]] = serve.run(app_from_config(app), name=app["name"],
                                         route_prefix=app.get("route_prefix", "/"))
    host, port = cfg.http_options.host, cfg.http_options.port
    print(f"lvm_ray serving on http://{host}:{port}/ (OpenAPI at /docs); Ctrl-C stops it",
          flush=True)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return handles
