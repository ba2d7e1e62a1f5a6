"""Serving benchmark: latency and throughput of the hybrid app over HTTP, gRPC and through
handles, beside the model's own forward time and Serve's no-op floor, all in one run.

    python bench/bench_serve.py            # ~5 min on 2 cores; writes BENCHMARKS.md (serve)
    python bench/bench_serve.py --smoke-test   # a few seconds of each, prints only

Deploys serve_configs/hybrid.yaml as shipped (the router app and one app per model; only paths,
port and the router's canary / latency limit changed, so long contexts reach Phase-3 and nothing
rolls back mid-run) on a local Ray started the way `lvm serve` starts it (Serve's
throughput-optimized mode), with gRPC on, loopback only, bounded load. Then a second Ray with
Serve's defaults measures the floor and the appends again, for comparison. Uses the demo's
checkpoints and bank when they exist, else random-init checkpoints of the demo model size (the
timings do not depend on the weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import concurrent.futures as cf
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The proxy (HTTP + gRPC) may take longer than Serve's 3 x 5 s readiness checks to start on a
# loaded 2-core machine; Serve then kills and restarts it until serve.start gives up.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")

import grpc  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, markdown_table, write_section  # noqa: E402
from harness.floor import floor_app  # noqa: E402
from harness.loadgen import percentiles  # noqa: E402
from harness.net import free_port  # noqa: E402
from harness.service import hybrid_config, wait_until_running  # noqa: E402
from lvm_ray.serve.deploy import FAST_SERVE_ENV  # noqa: E402
from lvm_ray.serve.protos import lvm_pb2, lvm_pb2_grpc  # noqa: E402
from lvm_ray.serve.schemas import encode_b64  # noqa: E402
from lvm_ray.serve.sessions import SessionState  # noqa: E402

GRPC_SERVICER = "lvm_ray.serve.protos.lvm_pb2_grpc.add_LVMServicer_to_server"
KEY = "bench-session-key-0123456789"

LENGTHS = (100, 500, 1000)
CONCURRENCY = (1, 16)


# ----------------------------------------------------------------------------- set-up


def assets(tmp: Path) -> tuple[str, str, str, str]:
    """(phase2, phase3, bank, description): the demo's outputs, or demo-size stand-ins."""
    p2, p3 = ROOT / "runs/demo/phase2/best", ROOT / "runs/demo/phase3/best"
    bank = ROOT / "data/sotu_demo_bank.parquet"
    if p2.is_dir() and p3.is_dir() and bank.exists():  # a file, or a sharded bank directory
        return str(p2), str(p3), str(bank), "the demo's trained checkpoints and bank"
    import torch

    from lvm_ray.config import load_config
    from lvm_ray.data.bank import save_bank
    from lvm_ray.data.synthetic import make_synthetic_bank
    from lvm_ray.model import build_model
    from lvm_ray.train.checkpoint import save_checkpoint

    from lvm_ray.data.bank import read_bank_meta

    model_cfg = load_config(presets=["demo"]).model
    # The demo's width: its bank's when there is one, else MiniLM's 384.
    dim = int(read_bank_meta(bank).get("dim") or 384) if bank.exists() else 384
    model_cfg = dataclasses.replace(model_cfg, d_in=dim)
    if not bank.exists():
        bank = tmp / "bank.parquet"
        save_bank(make_synthetic_bank(n_docs=40, doc_len=(80, 120), dim=dim), bank)
    torch.manual_seed(0)
    for path, ctx in ((tmp / "phase2", 500), (tmp / "phase3", 1000)):
        save_checkpoint(path, build_model(model_cfg), model_cfg, epoch=0, metrics={},
                        config={"window": {"context": ctx}})
    what = (f"random-init checkpoints of the demo model ({model_cfg.kind}, d_in {model_cfg.d_in}, "
            f"hidden {model_cfg.hidden}, layers {model_cfg.layers}, slots {model_cfg.slots}), "
            f"bank {bank.name}")
    return str(tmp / "phase2"), str(tmp / "phase3"), str(bank), what


def deploy(config: dict, models_uc: dict | None = None) -> None:
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    cfg = json.loads(json.dumps(config))
    for app in cfg["applications"]:
        for dep in app["deployments"]:
            if dep["name"] in ("Phase2Model", "Phase3Model") and models_uc:
                dep["user_config"] = {**dep["user_config"], **models_uc}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(cfg), _blocking=False)
    # Serve's own blocking deploy gives up after 60 s; replicas start slower on a loaded 2-core
    # machine. This waits longer and names a failed application's error.
    wait_until_running({a["name"] for a in cfg["applications"]}, timeout_s=300)


# ----------------------------------------------------------------------------- load


def run_http(url: str, body: bytes, conc: int, n: int, port: int, max_s: float) -> dict:
    """Up to n POSTs of `body` (at most max_s seconds) from `conc` threads, one keep-alive
    client each."""
    per = max(1, n // conc)
    headers = {"content-type": "application/json"}

    def worker(_):
        lat, dec, batch, tim = [], [], [], []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            c.post(url, content=body, headers=headers)  # warm the connection
            deadline = time.perf_counter() + max_s
            while len(lat) < per and time.perf_counter() < deadline:
                t = time.perf_counter()
                r = c.post(url, content=body, headers=headers)
                lat.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, (r.status_code, r.text[:300])
                out = r.json()
                dec.append(out.get("timings_ms", {}).get("decode", 0.0))
                if "batch_size" in out:
                    batch.append(out["batch_size"])
                    tim.append(out["timings_ms"])
        return lat, dec, batch, tim

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(conc) as pool:
        outs = list(pool.map(worker, range(conc)))
    wall = time.perf_counter() - t0
    lat = [x for o in outs for x in o[0]]
    batch = [x for o in outs for x in o[2]]
    return {"lat": lat, "decode": [x for o in outs for x in o[1]],
            "batch": float(np.mean(batch)) if batch else "-", "rps": len(lat) / wall,
            "timings": [x for o in outs for x in o[3]]}


def merge(parts: list[dict]) -> dict:
    """One result from several runs of the same load (interleaved rounds)."""
    n = sum(len(p["lat"]) for p in parts)
    batch = [p["batch"] for p in parts if p.get("batch", "-") != "-"]
    return {"lat": [x for p in parts for x in p["lat"]],
            "rps": n / sum(len(p["lat"]) / p["rps"] for p in parts),
            "batch": float(np.mean(batch)) if batch else "-",
            "timings": [x for p in parts for x in p.get("timings", [])]}


def run_handle(call, conc: int, n: int, max_s: float) -> dict:
    per = max(1, n // conc)

    def worker(_):
        call()
        lat, batch = [], []
        deadline = time.perf_counter() + max_s
        while len(lat) < per and time.perf_counter() < deadline:
            t = time.perf_counter()
            out = call()
            lat.append((time.perf_counter() - t) * 1000)
            assert "error" not in out, out
            batch.append(out["batch_size"])
        return lat, batch

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(conc) as pool:
        outs = list(pool.map(worker, range(conc)))
    lat = [x for o in outs for x in o[0]]
    return {"lat": lat, "batch": float(np.mean([x for o in outs for x in o[1]])),
            "rps": len(lat) / (time.perf_counter() - t0)}


def run_grpc(port: int, app: str, method: str, request, conc: int, n: int, max_s: float
             ) -> dict:
    """Up to n unary calls from `conc` threads, one channel each (as run_http)."""
    per = max(1, n // conc)
    meta = (("application", app),)

    def worker(_):
        lat, batch = [], []
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = getattr(lvm_pb2_grpc.LVMStub(ch), method)
            call(request, metadata=meta)  # warm the channel
            deadline = time.perf_counter() + max_s
            while len(lat) < per and time.perf_counter() < deadline:
                t = time.perf_counter()
                out = call(request, metadata=meta)
                lat.append((time.perf_counter() - t) * 1000)
                batch.append(out.batch_size)
        return lat, batch

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(conc) as pool:
        outs = list(pool.map(worker, range(conc)))
    lat = [x for o in outs for x in o[0]]
    return {"lat": lat, "batch": float(np.mean([x for o in outs for x in o[1]]) or 0),
            "rps": len(lat) / (time.perf_counter() - t0)}


def time_local(fn, n: int) -> list[float]:
    fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


# ----------------------------------------------------------------------------- the run


class Bench:
    def __init__(self, smoke: bool):
        self.scale = 0.1 if smoke else 1.0
        self.max_s = 2.0 if smoke else 3.0  # per row: bounds the run on a slow machine
        self.rows: list[list] = []
        self.results: dict[tuple, dict] = {}
        self.forward: dict[tuple, float] = {}
        self.decode: dict[tuple, float] = {}
        self.unbatched: dict[tuple, float] = {}
        self.load = os.getloadavg()
        self.breakdown: dict[int, dict] = {}

    def n(self, x: int) -> int:
        return max(16, int(x * self.scale))

    def record(self, scenario: str, path: str, conc: int, res: dict, forward_ms: float = 0.0):
        p50, p95, p99 = percentiles(res["lat"])
        self.results[(scenario, path, conc)] = {"p50": p50, "p95": p95, "p99": p99,
                                                "rps": res["rps"]}
        self.rows.append([scenario, path, conc, len(res["lat"]), p50, p95, p99, res["rps"],
                          res.get("batch", "-"), forward_ms or "-",
                          p50 / forward_ms if forward_ms else "-"])
        print(f"  {scenario:<30} {path:<13} c={conc:<3} p50 {p50:8.2f}  p95 {p95:8.2f}  "
              f"p99 {p99:8.2f} ms  {res['rps']:7.1f} req/s", flush=True)

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        import torch

        from lvm_ray.predictor import Predictor

        self.tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
        p2, p3, bank, self.what = assets(self.tmp)
        # threshold 500: long contexts reach Phase-3 so its path is measured, whatever the
        # production threshold (hybrid.yaml routes nothing there: docs/serve.md).
        self.config = hybrid_config(p2, p3, bank, router={"canary_fraction": 1.0,
                                                          "p95_limit_ms": 1e9, "threshold": 500})
        for app in self.config["applications"]:
            app["args"]["session_key"] = KEY
        self.config["grpc_options"] = {"port": 9000, "grpc_servicer_functions": [GRPC_SERVICER]}
        self.app_name = self.config["applications"][0]["name"]
        self.model_apps = {m: f"{self.app_name}-{m}" for m in ("phase2", "phase3")}
        # The model alone, in this process, one thread (as in a replica of < 1 CPU, where Ray
        # sets OMP_NUM_THREADS=1), with the served append step.
        torch.set_num_threads(1)
        step = self.config["applications"][1]["deployments"][0]["user_config"]["append_step"]
        self.local = {"phase2": Predictor.from_paths(p2, bank, device="cpu"),
                      "phase3": Predictor.from_paths(p3, bank, device="cpu")}
        for p in self.local.values():
            self.append_step = p.set_append_step(None if step == "eager" else step)
        ctx = np.random.default_rng(0).standard_normal((1000, self.local["phase2"].dim))
        self.ctx = (ctx / np.linalg.norm(ctx, axis=1, keepdims=True)).astype(np.float32)
        self.one = self.ctx[-1:]
        self.model_of = {L: "phase2" if L <= 500 else "phase3" for L in LENGTHS}

    def start(self, fast: bool = True) -> None:
        """A local Ray as `lvm serve` starts it (fast: Serve's throughput-optimized mode), Serve
        with HTTP and gRPC, the hybrid config and the floor app."""
        import ray
        from ray import serve

        for k, v in FAST_SERVE_ENV.items():  # read by the processes Ray starts
            if fast:
                os.environ[k] = v
            else:
                os.environ.pop(k, None)
        self.port, self.grpc_port = free_port(), free_port()
        self.config["http_options"]["port"] = self.port
        self.config["grpc_options"]["port"] = self.grpc_port
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        serve.start(http_options=self.config["http_options"],
                    grpc_options=self.config["grpc_options"])
        deploy(self.config)
        # Serve's floor: the same topology (proxy -> ingress -> model), no lvm_ray work.
        serve.run(floor_app(), name="floor", route_prefix="/floor")
        self.handles = {m: serve.get_deployment_handle(f"Phase{m[-1]}Model", self.model_apps[m])
                        for m in ("phase2", "phase3")}

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        for k in FAST_SERVE_ENV:
            os.environ.pop(k, None)

    def session(self, L: int) -> dict:
        """Open a session over L vectors through the router: its direct and router append URLs,
        an HTTP append body and a gRPC append request."""
        m = self.model_of[L]
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60) as c:
            s = c.post("/v1/sessions", json={**encode_b64(self.ctx[:L]), "model": m}).json()
        one = np.ascontiguousarray(self.one, dtype="<f4")
        return {"direct": s["append_url"], "router": f"/v1/sessions/{s['session_id']}/append",
                "body": json.dumps({"state": s["state"], **encode_b64(self.one)}).encode(),
                "grpc": lvm_pb2.AppendRequest(
                    session_id=s["session_id"], state=s["state"],
                    context=lvm_pb2.Context(vectors=one.tobytes(), rows=1, dim=one.shape[1]))}

    def state(self, L: int):
        """The SessionState after L vectors, for handle calls."""
        m = self.model_of[L]
        _, st = self.local[m].append(self.ctx[:L])
        fp = self.local[m].meta["sha256"]["model.safetensors"][:16]
        return SessionState("bench", m, fp, L, time.time(), st.h[:, 0].numpy(),
                            st.last[0].numpy())

    # ------------------------------------------------------------------ measurements

    def floor(self, tag: str = "") -> None:
        """Serve's floor: the same proxy and router, no model work (and one hop to a model)."""
        print("floor", flush=True)
        for conc in CONCURRENCY if not tag else (1,):
            for hops in ("router", "model"):
                res = run_http(f"/floor/noop?hops={hops}", b"{}", conc,
                               self.n(200 if conc == 1 else 480), self.port, self.max_s)
                self.record(f"no-op (ingress{' + model' if hops == 'model' else ''})",
                            "http" + tag, conc, res)
        res = run_grpc(self.grpc_port, "floor", "Predict", lvm_pb2.PredictRequest(), 1,
                       self.n(200), self.max_s)
        self.record("no-op (ingress)", "grpc" + tag, 1, res)

    def full_context(self) -> None:
        print("full context", flush=True)
        for L in LENGTHS:
            m, arr = self.model_of[L], self.ctx[:L]
            self.forward[("predict", L)] = float(np.median(time_local(
                lambda: self.local[m].predict(arr), self.n(30))))
            count = {100: 120, 500: 60, 1000: 40}[L]
            bodies = {"json": json.dumps({"vectors": arr.tolist()}).encode(),
                      "binary": json.dumps(encode_b64(arr)).encode()}
            for fmt, body in bodies.items():
                for conc in CONCURRENCY:
                    res = run_http("/v1/predict", body, conc, self.n(count * (1 + (conc > 1))),
                                   self.port, self.max_s)
                    self.decode[(fmt, L, conc)] = float(np.median(res["decode"]))
                    self.record(f"predict {L} ({fmt}, {len(body) // 1024} KiB)", "http", conc,
                                res, self.forward[("predict", L)])
            for conc in CONCURRENCY:
                res = run_handle(lambda: self.handles[m].predict.remote(arr, None, 5, False)
                                 .result(), conc, self.n(count * (1 + (conc > 1))), self.max_s)
                self.record(f"predict {L} (array)", "handle", conc, res,
                            self.forward[("predict", L)])

    def appends(self, tag: str = "", lengths=LENGTHS, rounds: int = 4) -> None:
        """Append one vector to sessions of L vectors: over HTTP straight to the model app (the
        shipped path), over HTTP through the router (the old path), over gRPC to the model app,
        and through a handle from this process (no proxy)."""
        print(f"session appends: 1 vector after L{tag}", flush=True)
        targets = {}
        for L in lengths:
            m = self.model_of[L]
            if ("append", L) not in self.forward:
                _, st = self.local[m].append(self.ctx[:L])
                self.forward[("append", L)] = float(np.median(time_local(
                    lambda: self.local[m].append(self.one, st), self.n(200))))
            targets[L] = (m, self.session(L), self.state(L))

        def via_handle(L):
            m, _, state = targets[L]
            return lambda: self.handles[m].append.remote(state, self.one, None, 5, False).result()

        paths = ("http", "http via router", "grpc", "handle") if not tag else \
            ("http", "http via router")
        # Concurrency 1: the lengths and paths take turns (rounds), so drift in the machine's
        # load hits them alike and the comparisons stay fair.
        parts = {(L, p): [] for L in lengths for p in paths}
        for _ in range(rounds):
            for L in lengths:
                m, sess, _ = targets[L]
                for p in paths:
                    n, max_s = self.n(50), self.max_s / rounds
                    if p == "http":
                        res = run_http(sess["direct"], sess["body"], 1, n, self.port, max_s)
                    elif p == "http via router":
                        res = run_http(sess["router"], sess["body"], 1, n, self.port, max_s)
                    elif p == "grpc":
                        res = run_grpc(self.grpc_port, self.model_apps[m], "Append",
                                       sess["grpc"], 1, n, max_s)
                    else:
                        res = run_handle(via_handle(L), 1, n, max_s)
                    parts[(L, p)].append(res)
        for L in lengths:
            for p in paths:
                res = merge(parts[(L, p)])
                self.record(f"append @{L}", p + tag, 1, res, self.forward[("append", L)])
                if p in ("http", "http via router") and not tag:
                    self.breakdown[(L, p)] = res
        if tag:
            return
        for L in lengths:
            _, sess, _ = targets[L]
            res = run_http(sess["direct"], sess["body"], 16, self.n(480), self.port, self.max_s)
            self.record(f"append @{L}", "http", 16, res, self.forward[("append", L)])
            res = run_handle(via_handle(L), 16, self.n(480), self.max_s)
            self.record(f"append @{L}", "handle", 16, res, self.forward[("append", L)])

    def without_batching(self) -> None:
        """The concurrency-16 loads again with max_batch_size 1 (a live reconfigure)."""
        print("unbatched (max_batch_size=1)", flush=True)
        deploy(self.config, {"max_batch_size": 1})
        time.sleep(1.0)
        sess = self.session(100)
        res = run_http(sess["direct"], sess["body"], 16, self.n(480), self.port, self.max_s)
        self.unbatched[("append @100", "http")] = res["rps"]
        self.record("append @100 UNBATCHED", "http", 16, res, self.forward[("append", 100)])
        state = self.state(100)
        res = run_handle(lambda: self.handles["phase2"].append.remote(
            state, self.one, None, 5, False).result(), 16, self.n(480), self.max_s)
        self.unbatched[("append @100", "handle")] = res["rps"]
        self.record("append @100 UNBATCHED", "handle", 16, res, self.forward[("append", 100)])
        for L in LENGTHS:
            m, arr = self.model_of[L], self.ctx[:L]
            res = run_handle(lambda: self.handles[m].predict.remote(arr, None, 5, False).result(),
                             16, self.n({100: 240, 500: 120, 1000: 80}[L]), self.max_s)
            self.unbatched[(f"predict {L} (array)", "handle")] = res["rps"]
            self.record(f"predict {L} (array) UNBATCHED", "handle", 16, res,
                        self.forward[("predict", L)])

    def model_alone(self) -> dict[str, tuple[float, float]]:
        """What batching can buy at most: the model alone, 16 requests one by one vs batched."""

        p2, p3, ctx, one = self.local["phase2"], self.local["phase3"], self.ctx, self.one
        st = self.state(100)
        h, last = st.h, st.last
        return {
            "predict 1000": (
                float(np.median(time_local(lambda: [p3.predict(ctx) for _ in range(16)], 3))),
                float(np.median(time_local(lambda: p3.predict_batch([ctx] * 16), 3)))),
            "append @100": (
                float(np.median(time_local(lambda: [p2.append_batch([one], [h], [last], 5)
                                                    for _ in range(16)], self.n(30)))),
                float(np.median(time_local(lambda: p2.append_batch([one] * 16, [h] * 16,
                                                                [last] * 16, 5), self.n(30))))),
        }

    def serve_defaults(self) -> None:
        """Floor and appends again on a fresh Ray with Serve's default settings (no
        throughput-optimized mode): what the shipped fast settings buy."""
        print("Serve defaults (RAY_SERVE_THROUGHPUT_OPTIMIZED unset)", flush=True)
        try:
            self.start(fast=False)
            self.floor(" (defaults)")
            self.appends(" (defaults)", lengths=(100, 1000), rounds=2)
        finally:
            self.stop()

    # ------------------------------------------------------------------ report

    def report(self, alone: dict[str, tuple[float, float]]) -> str:
        r, fw = self.results, self.forward
        floor1 = r[("no-op (ingress)", "http", 1)]
        floor2 = r[("no-op (ingress + model)", "http", 1)]
        app = {(L, p): r[(f"append @{L}", p, 1)] for L in LENGTHS
               for p in ("http", "http via router", "grpc")}
        worst = max(app[(L, "http")]["p95"] for L in LENGTHS)
        worst_grpc = max(app[(L, "grpc")]["p95"] for L in LENGTHS)
        spread = abs(app[(1000, "http")]["p50"] - app[(100, "http")]["p50"]) / \
            app[(100, "http")]["p50"]
        json_ms, bin_ms = self.decode[("json", 1000, 1)], self.decode[("binary", 1000, 1)]
        gains = {k: r[(k[0], k[1], 16)]["rps"] / v for k, v in self.unbatched.items()}
        dflt = {k: r.get(k) for k in (("no-op (ingress)", "http (defaults)", 1),
                                      ("append @1000", "http (defaults)", 1),
                                      ("append @1000", "http via router (defaults)", 1))}

        def verdict(ok: bool) -> str:
            return "**met**" if ok else "**not met**"

        def p(key) -> str:
            return f"{key['p50']:.1f} / {key['p95']:.1f} / {key['p99']:.1f}"

        goals = [
            ["session append P95 <= 10 ms end to end over HTTP, concurrency 1 (shipped path: "
             "straight to the model app, throughput-optimized Serve)",
             "P50 / P95 / P99 ms: " + "; ".join(f"@{L} {p(app[(L, 'http')])}" for L in LENGTHS)
             + ". gRPC: " + "; ".join(f"@{L} {p(app[(L, 'grpc')])}" for L in LENGTHS)
             + ". Through the router (the old path): "
             + "; ".join(f"@{L} {p(app[(L, 'http via router')])}" for L in LENGTHS)
             + f". Floor (no-op through the proxy to one replica) {p(floor1)}"
             + (f"; with Serve's defaults: floor {p(dflt[('no-op (ingress)', 'http (defaults)', 1)])}"
                f", append @1000 direct {p(dflt[('append @1000', 'http (defaults)', 1)])}, "
                f"via router {p(dflt[('append @1000', 'http via router (defaults)', 1)])}"
                if all(dflt.values()) else ""),
             verdict(worst <= 10.0) + f" (worst P95 {worst:.1f} ms; gRPC {worst_grpc:.1f} ms)"],
            ["appends at 100 and 1000 within 20% (P50, concurrency 1)",
             f"{app[(100, 'http')]['p50']:.2f} vs {app[(1000, 'http')]['p50']:.2f} ms "
             f"({spread:.0%})", verdict(spread <= 0.2)],
            ["binary >= 5x cheaper to decode than JSON at 1000 vectors (router decode, median)",
             f"JSON {json_ms:.1f} ms vs binary {bin_ms:.2f} ms (x{json_ms / max(bin_ms, 1e-9):.0f})",
             verdict(json_ms >= 5 * bin_ms)],
            ["batching >= 2x throughput at concurrency 16 (batched vs max_batch_size 1)",
             ", ".join(f"{k[0]} via {k[1]} x{g:.2f}" for k, g in gains.items())
             + "; the model alone, 16 requests batched vs one by one: "
             + ", ".join(f"{k} x{a / b:.2f} ({a:.1f} -> {b:.1f} ms)" for k, (a, b) in alone.items()),
             verdict(max(gains.values()) >= 2.0)],
        ]
        split_rows = []
        for (L, path), res in self.breakdown.items():
            def med(key):
                return float(np.median([t[key] for t in res["timings"]]))

            e2e = float(np.median(res["lat"]))
            split_rows.append([f"append @{L}", path, e2e, e2e - med("total"),
                               med("total") - med("model_call"), med("model_call") - med("model"),
                               med("model")])
        split = markdown_table(["concurrency 1 (P50 ms)", "path", "end to end",
                                "outside the endpoint (client, proxy, Serve + FastAPI)",
                                "endpoint (parse, verify, route, sign)",
                                "to the model and back (router hop or batch queue)",
                                "model (step + kNN)"], split_rows)
        notes = f"""
Load: loopback only, closed loop (each of `conc` client threads sends its next request when its
last one returns), at most {self.max_s:.0f} s per row; percentiles over all requests of a row.
Models: {self.what}. Config: serve_configs/hybrid.yaml as shipped (the router app `lvm` and the
model apps `lvm-phase2` / `lvm-phase3`), with the router's canary_fraction 1.0 and no latency
limit, so 100- and 500-vector contexts go to Phase2Model and 1000 to Phase3Model; appends use the
shipped append step ({self.append_step}). Ray started as `lvm serve` starts it: Serve's
throughput-optimized mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1, direct ingress off); `(defaults)`
rows: a second Ray with Serve's default settings.
Paths: `http` = an append sent to the session's `append_url`, the model app's own endpoint (proxy
-> model replica); `http via router` = the router's append URL (proxy -> router -> model
replica, the only path before); `grpc` = the gRPC Append of the model app (Serve's gRPC proxy ->
model replica); `handle` = the model deployment called from the benchmark process (no proxy).
Predict rows go through the router (HTTP) or a handle. `forward` is the model's own time
(Predictor.predict, or Predictor.append from the session's state) in the benchmark process, one
thread; `ratio` = end-to-end P50 / forward. `batch` = mean requests per model forward. HTTP
bodies: JSON numbers or base64 float32 (`binary`); appends send the state token plus one base64
vector.

Serve's floor in this run: a no-op through the proxy to one replica is P50 {floor1['p50']:.1f} /
P95 {floor1['p95']:.1f} ms, one more hop to a second replica P95 {floor2['p95']:.1f} ms. An append
adds ~{fw[('append', 100)]:.2f} ms of model work (step + kNN over the bank) and the endpoint's own
parse / verify / sign to that, whatever the session's length.

Machine load (1-minute load average) at the start and end of the run: {self.load[0]:.1f} /
{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; other work on the machine shows up as noise
in every row.
"""
        return (markdown_table(["scenario", "path", "conc", "n", "p50 ms", "p95 ms", "p99 ms",
                                "req/s", "batch", "forward ms", "ratio"], self.rows)
                + "\n\nGoals (2-core CPU, demo-size model):\n\n"
                + markdown_table(["goal", "measured", "verdict"], goals)
                + "\n\nWhere an append's time goes (medians of the parts, from the endpoint's "
                  "`timings_ms`):\n\n" + split + "\n" + notes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke-test", action="store_true", help="few requests, no BENCHMARKS.md")
    ap.add_argument("--skip-defaults", action="store_true",
                    help="skip the second Ray with Serve's default settings")
    args = ap.parse_args()
    t0 = time.perf_counter()
    b = Bench(args.smoke_test)
    b.setup()
    b.start()
    try:
        b.floor()
        b.full_context()
        b.appends()
        b.without_batching()
    finally:
        b.stop()
    alone = b.model_alone()
    if not args.skip_defaults:
        b.serve_defaults()
    body = b.report(alone)
    print(f"bench_serve: {time.perf_counter() - t0:.0f} s", flush=True)
    if args.smoke_test:
        print(body)
    else:
        write_section("serve", "Serving: Ray Serve hybrid router", body,
                      "python bench/bench_serve.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
