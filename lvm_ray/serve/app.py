"""The Ray Serve application: two model deployments, a text encoder and the router.

    HTTP -> proxy -> Router (lvm_ray.serve.router: parse, decode, route, sign sessions)
                       |-> Phase2Model (lvm_ray.serve.models: 500-context checkpoint, batched)
                       |-> Phase3Model (lvm_ray.serve.models: 1000-context checkpoint, batched)
                       '-> TextEncoder (the bank's encoder, for text input)

    serve run serve_configs/hybrid.yaml                     # the config names paths in `args`
    serve run lvm_ray.serve.app:build_app phase2_checkpoint=... phase3_checkpoint=... bank=...
"""

import os
from pathlib import Path
from typing import Any

from ray.serve import Application
from ray.serve.deployment import Deployment

from lvm_ray.config import IndexConfig, from_dict
from lvm_ray.data.index import build_index_files
from lvm_ray.serve.config import AppArgs
from lvm_ray.serve.models import DEPLOYMENT_NAMES, ModelServer, TextEncoder
from lvm_ray.serve.router import Router
from lvm_ray.serve.routing import PHASE2, PHASE3
from lvm_ray.serve.sessions import new_key
from lvm_ray.storage import is_uri


def build_app(args: dict[str, Any]) -> Application:
    """The whole app from its args (see AppArgs): what `serve run` / `serve deploy` import."""
    return make_app(args)


def make_app(args: dict[str, Any] | AppArgs, options: dict[str, dict[str, Any]] | None = None,
             model_deployment: Deployment = ModelServer) -> Application:
    """build_app with per-deployment option overrides for Python callers (tests, benchmarks),
    e.g. {"Router": {"user_config": {...}}}: what a serve config's `deployments` list does.
    `model_deployment` replaces ModelServer for both models (a test harness's fault injection).
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
    if a.build_index and not is_uri(bank) and Path(bank).exists():
        # Once, here, before any replica starts: replicas only memory-map the files. (A missing
        # bank is the replicas' error to report; a config is still checked without one.)
        build_index_files(bank, IndexConfig(factory=a.index))
    phase2 = model_deployment.options(**opts(DEPLOYMENT_NAMES[PHASE2])).bind(
        PHASE2, path(a.phase2_checkpoint), bank, a.device, a.allow_bank_mismatch, a.index)
    phase3 = model_deployment.options(**opts(DEPLOYMENT_NAMES[PHASE3])).bind(
        PHASE3, path(a.phase3_checkpoint), bank, a.device, a.allow_bank_mismatch, a.index)
    encoder = TextEncoder.options(**opts("TextEncoder")).bind(bank, a.encoder)
    app = Router.options(**opts("Router")).bind(phase2, phase3, encoder, key)
    if options:
        raise ValueError(f"unknown deployment(s) {sorted(options)}; the app has Router, "
                         f"{', '.join(DEPLOYMENT_NAMES.values())}, TextEncoder")
    return app


__all__ = ["build_app", "make_app"]
