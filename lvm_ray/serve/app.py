"""The Ray Serve application: two model deployments, a text encoder and the router.

    HTTP / gRPC -> proxy -> Router (lvm_ray.serve.router: parse, decode, route, sign sessions)
                       |-> Phase2Model (lvm_ray.serve.models: 500-context checkpoint, batched)
                       |-> Phase3Model (lvm_ray.serve.models: 1000-context checkpoint, batched)
                       '-> TextEncoder (the bank's encoder, for text input)

    serve run serve_configs/hybrid.yaml                     # the config names paths in `args`
    serve run lvm_ray.serve.app:build_app phase2_checkpoint=... phase3_checkpoint=... bank=...

With `model_apps: "lvm-"` (serve_configs/hybrid.yaml) each model is its own application
(build_model_app, route prefix /lvm-phase2 and /lvm-phase3): the router reaches it through a
handle as before, and session appends go straight to it:

    HTTP / gRPC -> proxy -> Phase2Model (POST /lvm-phase2/v1/sessions/{id}/append, gRPC Append)
"""

import os
from pathlib import Path
from typing import Any

from ray.serve import Application

from lvm_ray.config import IndexConfig, from_dict
from lvm_ray.data.index import build_index_files
from lvm_ray.serve.config import AppArgs, ModelAppArgs, ServedBankArgs
from lvm_ray.serve.models import DEPLOYMENT_NAMES, ModelServer, TextEncoder, model_deployment
from lvm_ray.serve.router import Router
from lvm_ray.serve.routing import PHASE2, PHASE3
from lvm_ray.serve.sessions import new_key
from lvm_ray.storage import is_uri


def build_app(args: dict[str, Any]) -> Application:
    """The whole app from its args (see AppArgs): what `serve run` / `serve deploy` import."""
    return make_app(args)


def make_app(args: dict[str, Any] | AppArgs, options: dict[str, dict[str, Any]] | None = None,
             model_class: type = ModelServer) -> Application:
    """build_app with per-deployment option overrides for Python callers (tests, benchmarks),
    e.g. {"Router": {"user_config": {...}}}: what a serve config's `deployments` list does.
    `model_class` (a ModelServer subclass) replaces ModelServer for both models: an ensemble, or
    a test harness's fault injection.
    Paths are resolved here, in the process that builds the app; without a session key each
    build makes a fresh one."""
    a = args if isinstance(args, AppArgs) else from_dict(AppArgs, dict(args or {}), "args")
    options = dict(options or {})
    key = os.environ.get("LVM_SESSION_KEY") or a.session_key or new_key()

    def path(p: str) -> str:
        return p if is_uri(p) else str(Path(p).expanduser().resolve())

    def opts(name: str) -> dict[str, Any]:
        return {"name": name, **options.pop(name, {})}

    bank = path(a.bank)
    if a.model_apps is not None:
        if not (os.environ.get("LVM_SESSION_KEY") or a.session_key):
            raise ValueError(_NO_SHARED_KEY)
        phase2, phase3 = (model_app_name(a.model_apps, m) for m in (PHASE2, PHASE3))
    else:
        _prepare_index(a, bank)
        deployment = model_deployment(model_class)
        phase2 = deployment.options(**opts(DEPLOYMENT_NAMES[PHASE2])).bind(
            PHASE2, path(a.phase2_checkpoint), bank, a.device, key, a.allow_bank_mismatch,
            a.index)
        phase3 = deployment.options(**opts(DEPLOYMENT_NAMES[PHASE3])).bind(
            PHASE3, path(a.phase3_checkpoint), bank, a.device, key, a.allow_bank_mismatch,
            a.index)
    encoder = TextEncoder.options(**opts("TextEncoder")).bind(bank, a.encoder)
    app = Router.options(**opts("Router")).bind(phase2, phase3, encoder, key)
    if options:
        raise ValueError(f"unknown deployment(s) {sorted(options)}; the app has Router, "
                         f"{', '.join(DEPLOYMENT_NAMES.values())}, TextEncoder")
    return app


def _prepare_index(a: ServedBankArgs, bank: str) -> None:
    """Build the bank's index files once, here, before any replica starts: replicas only
    memory-map them. (A missing bank is the replicas' error to report; a config is still checked
    without one.)"""
    if a.build_index and not is_uri(bank) and Path(bank).exists():
        build_index_files(bank, IndexConfig(factory=a.index))


_NO_SHARED_KEY = ("model_apps: the router application signs session tokens that the model "
                  "applications verify, so they need one key: set LVM_SESSION_KEY in the "
                  "cluster's environment or the same args.session_key in every application "
                  "(`lvm serve` sets one for a local Ray)")


def model_app_name(prefix: str, model: str) -> str:
    """The application (and route prefix, /<name>) of `model` when models are their own apps."""
    return f"{prefix}{model}"


def build_model_app(args: dict[str, Any]) -> Application:
    """One model as its own application (see ModelAppArgs): its ModelServer is the ingress, so it
    serves its sessions' appends over HTTP and gRPC without the router."""
    return make_model_app(args)


def make_model_app(args: dict[str, Any] | ModelAppArgs,
                   options: dict[str, Any] | None = None) -> Application:
    a = args if isinstance(args, ModelAppArgs) else from_dict(ModelAppArgs, dict(args or {}),
                                                              "args")
    key = os.environ.get("LVM_SESSION_KEY") or a.session_key
    if not key:
        raise ValueError(_NO_SHARED_KEY)

    def path(p: str) -> str:
        return p if is_uri(p) else str(Path(p).expanduser().resolve())

    bank = path(a.bank)
    _prepare_index(a, bank)
    deployment = model_deployment(ModelServer, ingress=True)
    return deployment.options(name=DEPLOYMENT_NAMES[a.model], **(options or {})).bind(
        a.model, path(a.checkpoint), bank, a.device, key, a.allow_bank_mismatch, a.index)


__all__ = ["build_app", "build_model_app", "make_app", "make_model_app", "model_app_name"]
