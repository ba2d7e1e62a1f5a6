"""The served app as the tests drive it: tiny assets (a 32-d bank with a text encoder and
random-init checkpoints), and a Service that deploys the app the way `serve deploy` does (a config
with user_config blocks, so config changes are live reconfigures) and waits until it is live.

Service deploys harness.faults:build_app by default: the product's app whose model deployments
also accept inject_latency_ms / inject_error_rate, for the guardrail tests; pass
import_path="lvm_ray.serve.app:build_app" for the product app itself.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import yaml

from lvm_ray.config import ModelConfig
from lvm_ray.data.bank import save_bank
from lvm_ray.data.encoders import HashingEncoder
from lvm_ray.data.synthetic import make_synthetic_bank
from lvm_ray.eval.lanes import Lanes, lane_document, lane_metrics
from lvm_ray.model import build_model
from lvm_ray.predictor import Predictor
from lvm_ray.train.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FAULTY_APP = "harness.faults:build_app"
PRODUCT_APP = "lvm_ray.serve.app:build_app"

APP = "lvm_test"
KEY = "test-session-key-0123456789abcdef"
DIM = 32
# Test defaults: "long" starts at 11 vectors so routing tests stay cheap, and the latency limit is
# out of reach unless a test lowers it.
ROUTER = {"threshold": 10, "canary_fraction": 0.0, "p95_limit_ms": 60_000.0, "window": 200,
          "min_samples": 20}


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_assets(root: Path) -> dict:
    """A 32-d bank with a text encoder (hashing-32) and three random-init checkpoints."""
    bank = make_synthetic_bank(n_docs=20, doc_len=(60, 100), dim=DIM, seed=0)
    enc = HashingEncoder(DIM)
    bank.texts = np.array([f"speech {d} part {p} about topic {p % 7}"
                           for d, p in zip(bank.doc_ids, bank.positions)], dtype=object)
    bank.vectors = enc.encode(list(bank.texts))
    bank.meta["encoder"] = enc.name
    save_bank(bank, root / "bank.parquet")
    syn = make_synthetic_bank(n_docs=4, doc_len=(20, 30), dim=DIM, seed=3)
    save_bank(syn, root / "synthetic_bank.parquet")
    cfg = ModelConfig(d_in=DIM, hidden=24, layers=2, slots=4)
    paths = {}
    for name, ctx, seed in [("phase2", 500, 0), ("phase3", 1000, 1), ("phase3b", 1000, 2)]:
        torch.manual_seed(seed)
        paths[name] = save_checkpoint(root / name, build_model(cfg), cfg, epoch=0, metrics={},
                                      config={"window": {"context": ctx}})
        (paths[name] / "test_metrics.json").write_text(json.dumps({"bank_hit@5": 0.1 * seed}))
    refs = {n: Predictor.from_paths(paths[n], root / "bank.parquet", device="cpu")
            for n in ("phase2", "phase3")}
    # The references search the bank's memory-mapped index like the replicas; `bank_data` is the
    # bank itself, for the tests' expected texts, ids and vectors.
    return {"root": root, "bank": root / "bank.parquet", "paths": paths, "refs": refs,
            "bank_data": bank, "encoder": enc,
            "synthetic_bank": root / "synthetic_bank.parquet"}


def hybrid_config(phase2: str, phase3: str, bank: str, router: dict | None = None,
                  models: dict | None = None, port: int = 8000) -> dict:
    """serve_configs/hybrid.yaml (the router app and one app per model) with these paths and
    user_config overrides: what tests and the serve benchmark deploy with run_config."""
    cfg = yaml.safe_load((ROOT / "serve_configs/hybrid.yaml").read_text())
    cfg["http_options"]["port"] = port
    for app in cfg["applications"]:
        args = app["args"]
        args["bank"] = str(bank)
        if "model" in args:
            args["checkpoint"] = str(phase2 if args["model"] == "phase2" else phase3)
        for dep in app["deployments"]:
            extra = (router or {}) if dep["name"] == "Router" else \
                (models or {}) if dep["name"].endswith("Model") else None
            if extra is not None:
                dep["user_config"] = {**dep["user_config"], **extra}
    return cfg


def wait_until_running(app_names: set[str], timeout_s: float) -> None:
    from ray import serve

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        apps = serve.status().applications
        states = {n: apps[n].status for n in app_names if n in apps}
        failed = {n: apps[n].message for n, st in states.items() if st == "DEPLOY_FAILED"}
        if failed:
            raise RuntimeError(f"Serve deploy failed: {failed}")
        if len(states) == len(app_names) and set(states.values()) == {"RUNNING"}:
            return
        time.sleep(0.5)
    raise TimeoutError(f"Serve applications {sorted(app_names)} not running after {timeout_s} s")


class Service:
    def __init__(self, assets, port: int, import_path: str = FAULTY_APP):
        self.assets = assets
        self.import_path = import_path
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        self.args = {"phase2_checkpoint": str(assets["paths"]["phase2"]),
                     "phase3_checkpoint": str(assets["paths"]["phase3"]),
                     "bank": str(assets["bank"]), "session_key": KEY}
        self.deploys = 0

    def deploy(self, router=None, phase2=None, phase3=None, args=None, name=APP, prefix="/"):
        """Apply a config as `serve deploy` does and wait until it is live."""
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        # A fresh rollout per deploy: no test inherits another's guardrail window or rollback.
        self.deploys += 1
        router_uc = {**ROUTER, "rollout_id": f"deploy-{self.deploys}", **(router or {})}
        model_uc = {"phase2": phase2 or {}, "phase3": phase3 or {}}
        app_args = {**self.args, **(args or {})}
        app = {"name": name, "route_prefix": prefix, "import_path": self.import_path,
               "args": app_args,
               "deployments": [{"name": "Router", "user_config": router_uc},
                               {"name": "Phase2Model", "user_config": model_uc["phase2"]},
                               {"name": "Phase3Model", "user_config": model_uc["phase3"]}]}
        others = [] if name == APP else [self.current]
        cfg = ServeDeploySchema.model_validate({"applications": others + [app]})
        # Not _blocking=True: Ray waits a fixed 60 s for it, which a loaded 2-core machine can
        # exceed (replicas import torch and load checkpoints); a failed deploy still fails fast.
        _get_global_client().deploy_apps(cfg)
        wait_until_running({a.name for a in cfg.applications}, timeout_s=300)
        if name == APP:
            self.current = app
        # deploy_apps returns as soon as the app reports RUNNING, which the previous version
        # also did: wait until every replica answers with the new user_config.
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                st = self.http.get(f"{prefix.rstrip('/')}/v1/status").json()
                models = self.http.get(f"{prefix.rstrip('/')}/v1/models").json()["models"]
                if st["user_config"].items() >= router_uc.items() and all(
                        models[m]["user_config"].items() >= model_uc[m].items()
                        and models[m]["checkpoint"] == app_args[f"{m}_checkpoint"]
                        for m in ("phase2", "phase3")):
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.3)
        raise TimeoutError("the new config did not become live")

    def replicas(self) -> dict[str, str]:
        models = self.http.get("/v1/models").json()["models"]
        return {"router": self.http.get("/v1/status").json()["replica"],
                **{m: models[m]["replica"] for m in models}}

    def predict(self, **body) -> httpx.Response:
        return self.http.post("/v1/predict", json=body)


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, (r.status_code, r.text)
    return r.json()


def lane_doc(lane3_hit_rate: float) -> dict:
    """A real lanes.json document (lvm_ray.eval.lanes) for 4 lanes of 200 seeded windows each:
    lanes 0-2 hit half the time, lane 3 at `lane3_hit_rate`."""
    rng = np.random.default_rng(0)
    target_lanes = np.repeat(np.arange(4), 200)
    rates = np.array([0.5, 0.5, 0.5, lane3_hit_rate])[target_lanes]
    hits = (rng.random(len(target_lanes)) < rates).astype(np.float64)
    results = {"phase3": lane_metrics(hits, target_lanes, bootstrap=200, seed=0)}
    return lane_document(results, "phase3", Lanes(np.arange(4), "corpus", {}), "test")
