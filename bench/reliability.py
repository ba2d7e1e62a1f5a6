"""Reliability: load, faults and bad input, with figures. Writes RELIABILITY.md.

    python bench/reliability.py                  # ~15 min on 2 cores; writes RELIABILITY.md
    python bench/reliability.py --smoke-test     # a few seconds per part; prints, writes nothing
    python bench/reliability.py --only serve     # serve | train | input (repeatable)
    python bench/reliability.py --report-only    # RELIABILITY.md again from runs/reliability.json

serve: the hybrid app (serve_configs/hybrid.yaml, the demo's checkpoints and bank when they exist)
on a local Ray, loaded by lvm_ray.loadgen (loopback only, capped in requests and seconds) at
concurrency 1, 8 and 32 with mixed request kinds while a sampler records replica counts; then a
model replica process is killed by its pid under load, and sessions opened before the kill are
continued after it; then every malformed request of lvm_ray.loadgen.bad_requests.
train: jobs submitted to a real `ray start --head` (tests/ray_cluster_utils.py): uninterrupted
runs (the noise), a worker killed mid-epoch, the driver killed mid-run and the job re-submitted
under the same run name, a resume from a corrupted checkpoint, a checkpoint write killed halfway.
input: malformed corpora and configs through the CLI and the job scripts.

Loopback only; every Ray process this starts is stopped by its pid. The tests
(tests/test_reliability_*.py, tests/test_bad_input_cli.py) call the same functions with small
numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # ray_cluster_utils: the heads the tests start

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import markdown_table, stamp  # noqa: E402
from lvm_ray.loadgen import (AppMix, LoadResult, app_kinds, bad_requests, check_bad,  # noqa: E402
                             percentiles, run_load, send_bad)

RELIABILITY = ROOT / "RELIABILITY.md"
RESULTS = ROOT / "runs" / "reliability.json"  # the last run's raw results (--report-only)
APP = "lvm"
MODELS = ("Phase2Model", "Phase3Model")
SESSION_KEY = "reliability-session-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def verdict(ok: bool) -> str:
    return "met" if ok else "not met"


def fmt_ms(x: float) -> str:
    return "-" if x != x else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


# ============================================================================= serve


def replica_pids(app: str, deployment: str) -> dict[str, int]:
    """replica tag -> pid of each live replica actor of a deployment, asked of the replica
    actor itself (Ray's named actors; no dashboard needed)."""
    import ray

    out = {}
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    for a in ray.util.list_named_actors(all_namespaces=True):
        if not a["name"].startswith(prefix):
            continue
        try:
            actor = ray.get_actor(a["name"], namespace=a["namespace"])
            out[a["name"][len(prefix):]] = ray.get(
                actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)
        except Exception:  # noqa: BLE001  a replica dying while we ask is simply not live
            continue
    return out


def running_replicas(app: str = APP) -> dict[str, dict[str, int]]:
    """deployment -> {replica state: count} from serve.status()."""
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None:
        return {}
    return {name: {str(getattr(k, "value", k)): int(v) for k, v in d.replica_states.items()}
            for name, d in st.deployments.items()}


def ongoing_requests(app: str = APP) -> dict[str, float]:
    """deployment -> requests running in its replicas plus requests queued for it in handles,
    from Serve's own metrics on this node's Prometheus endpoint: what its autoscaler compares
    with target_ongoing_requests (per replica)."""
    import re

    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(("ray_serve_replica_processing_queries{",
                                "ray_serve_deployment_queued_queries{")):
            continue
        labels, value = line.rsplit(" ", 1)
        dep = re.search(r'deployment="([^"]+)"', labels)
        if dep and f'application="{app}"' in labels:
            out[dep.group(1)] = out.get(dep.group(1), 0.0) + float(value)
    return out


class ReplicaSampler:
    """Replica counts of every deployment, and their ongoing requests, every `period_s`
    seconds, in a thread."""

    def __init__(self, app: str = APP, period_s: float = 2.0):
        self.app, self.period_s = app, period_s
        self.samples: list[tuple[float, dict[str, dict[str, int]]]] = []
        self.ongoing: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="replica-sampler")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), running_replicas(self.app)))
            except Exception:  # noqa: BLE001  the controller may be busy; skip one sample
                pass
            try:
                self.ongoing.append((time.time(), ongoing_requests(self.app)))
            except Exception:  # noqa: BLE001  metrics are optional
                pass
            self._stop.wait(self.period_s)

    def mean_ongoing(self, deployment: str, t0: float, t1: float) -> float:
        xs = [o.get(deployment, 0.0) for t, o in self.ongoing if t0 <= t <= t1]
        return float(np.mean(xs)) if xs else float("nan")

    def __enter__(self) -> "ReplicaSampler":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def between(self, t0: float, t1: float) -> list[tuple[float, dict]]:
        return [(t, s) for t, s in self.samples if t0 <= t <= t1]


def replica_summary(samples: list[tuple[float, dict]], deployment: str, t0: float) -> str:
    """'1 -> 2 at 14 s' style: RUNNING replicas over time, changes only."""
    out, last = [], None
    for t, s in samples:
        n = s.get(deployment, {}).get("RUNNING", 0)
        if n != last:
            out.append(f"{n}" if last is None else f"{n} at {t - t0:.0f} s")
            last = n
    return " -> ".join(out) if out else "-"


@dataclass
class ServeTarget:
    """A deployed hybrid app: where it answers and what its requests look like."""

    base_url: str
    dim: int
    n_concepts: int
    texts: list[str] | None  # None: the bank has no text encoder
    phase2: Any = None  # local Predictor of the Phase-2 checkpoint (session checks)
    router_config: dict = field(default_factory=dict)  # the Router's user_config as deployed
    deploy_router: Any = None  # callable(user_config dict) -> None: a live reconfigure
    app: str = APP  # the Serve application's name


def load_levels(t: ServeTarget, levels: tuple[int, ...], seconds: float, max_requests: int,
                mix: AppMix | None = None) -> list[dict[str, Any]]:
    """run_load at each concurrency for `seconds`, sampling replica counts; the Phase-3 rollout
    is re-armed before each level so each level starts from the deployed routing."""
    kinds = app_kinds(t.dim, t.n_concepts, t.texts, mix)
    out = []
    for conc in levels:
        if t.deploy_router is not None:
            rollout = f"level-{conc}-{uuid.uuid4().hex[:6]}"
            t.deploy_router({**t.router_config, "rollout_id": rollout})
        with ReplicaSampler(t.app) as sampler:
            res = run_load(t.base_url, kinds, concurrency=conc, max_requests=max_requests,
                           max_seconds=seconds, seed=conc)
            time.sleep(sampler.period_s)  # one more sample after the level
        status = httpx.get(f"{t.base_url}/v1/status", timeout=30).json()["routing"]
        s = res.summary()
        samples = sampler.between(res.started_at - 1, res.started_at + res.wall_s + 5)
        s.update(level=conc, routing=status["state"], rollbacks=len(status["rollbacks"]),
                 decisions=status["decisions"],
                 replicas={d: replica_summary(samples, d, res.started_at) for d in MODELS},
                 max_replicas={d: max((x.get(d, {}).get("RUNNING", 0) for _, x in samples),
                                      default=0) for d in MODELS},
                 ongoing={d: sampler.mean_ongoing(d, res.started_at + 10,
                                                  res.started_at + res.wall_s)
                          for d in ("Router", "TextEncoder", *MODELS)})
        print(f"  c={conc:<3} {s['requests']:6d} req  {s['rps']:6.1f}/s  p50 {fmt_ms(s['p50_ms'])}"
              f"  p95 {fmt_ms(s['p95_ms'])}  p99 {fmt_ms(s['p99_ms'])} ms  errors "
              f"{s['errors']} {s['errors_by_status']}  replicas {s['replicas']}  routing "
              f"{s['routing']}", flush=True)
        out.append(s)
    return out


def open_sessions(t: ServeTarget, n: int, length: int, seed: int = 11) -> list[dict]:
    """n sessions on Phase-2, each opened with `length` vectors then one append."""
    from lvm_ray.loadgen import unit_vectors
    from lvm_ray.serve.schemas import encode_b64

    rng = np.random.default_rng(seed)
    out = []
    with httpx.Client(base_url=t.base_url, timeout=60) as http:
        for _ in range(n):
            ctx = unit_vectors(length + 2, t.dim, rng)
            s = http.post("/v1/sessions", json={**encode_b64(ctx[:length]), "model": "phase2"})
            s.raise_for_status()
            s = s.json()
            a = http.post(f"/v1/sessions/{s['session_id']}/append",
                          json={"state": s["state"], **encode_b64(ctx[length:length + 1])})
            a.raise_for_status()
            out.append({"session_id": s["session_id"], "state": a.json()["state"], "ctx": ctx})
    return out


def continue_sessions(t: ServeTarget, sessions: list[dict]) -> tuple[int, float]:
    """Append each session's last vector; (sessions whose answer matches the local Phase-2
    prediction over the whole context, max |difference|)."""
    from lvm_ray.serve.schemas import encode_b64

    good, worst = 0, 0.0
    with httpx.Client(base_url=t.base_url, timeout=60) as http:
        for s in sessions:
            r = http.post(f"/v1/sessions/{s['session_id']}/append",
                          json={"state": s["state"], **encode_b64(s["ctx"][-1:]),
                                "return_vector": True})
            if r.status_code != 200:
                print(f"  session {s['session_id']}: {r.status_code} {r.text[:200]}", flush=True)
                continue
            want = t.phase2.predict(s["ctx"]).vector
            diff = float(np.abs(np.asarray(r.json()["vector"]) - want).max())
            worst = max(worst, diff)
            good += diff < 1e-4
    return good, worst


def kill_replica_under_load(t: ServeTarget, deployment: str = "Phase2Model",
                            concurrency: int = 8, kill_at_s: float = 20.0,
                            total_s: float = 80.0, max_requests: int = 1_000_000,
                            n_sessions: int = 5, mix: AppMix | None = None) -> dict[str, Any]:
    """Mixed load at `concurrency`; at kill_at_s SIGKILL one replica process of `deployment` (its
    pid asked of the replica actor); measure failures around the kill, the time until Serve
    runs a replacement, failures after that, and whether sessions opened before the kill
    continue exactly afterwards."""
    kinds = app_kinds(t.dim, t.n_concepts, t.texts, mix)
    sessions = open_sessions(t, n_sessions, length=8) if t.phase2 is not None else []
    before = replica_pids(t.app, deployment)
    if not before:
        raise RuntimeError(f"no live {deployment} replica of app {t.app!r} to kill")
    n_before = len(before)
    box: dict[str, Any] = {}

    def load() -> None:
        box["res"] = run_load(t.base_url, kinds, concurrency=concurrency,
                              max_requests=max_requests, max_seconds=total_s, seed=99)

    with ReplicaSampler(t.app, period_s=1.0) as sampler:
        th = threading.Thread(target=load, daemon=True)
        t_load = time.time()
        th.start()
        time.sleep(kill_at_s)
        tag, pid = sorted(before.items())[0]
        os.kill(pid, signal.SIGKILL)  # this one replica process, by its pid
        t_kill = time.time()
        print(f"  killed {deployment} replica {tag} (pid {pid}) at {t_kill - t_load:.1f} s",
              flush=True)
        t_recovered = None
        while t_recovered is None and time.time() - t_kill < total_s:
            now = replica_pids(t.app, deployment)
            running = running_replicas(t.app).get(deployment, {}).get("RUNNING", 0)
            if tag not in now and len(now) >= n_before and running >= n_before:
                t_recovered = time.time()
                break
            time.sleep(0.5)
        th.join()
    res: LoadResult = box["res"]
    k = t_kill - res.started_at
    rec = (t_recovered - res.started_at) if t_recovered else None
    around = res.window(k - 15, k + 15)
    failed_around = [r for r in around if not res.ok(r)]
    after = res.window(rec, res.wall_s + 1) if rec is not None else []
    failed = [r for r in res.records if not res.ok(r)]
    last_fail = max((r.start_s + r.latency_ms / 1000 for r in failed), default=None)
    good, worst = continue_sessions(t, sessions) if sessions else (0, float("nan"))
    lat_around = [r.latency_ms for r in around if res.ok(r)]
    out = {
        "deployment": deployment, "concurrency": concurrency, "replicas_before": n_before,
        "killed": {"tag": tag, "pid": pid}, "kill_at_s": k, "wall_s": res.wall_s,
        "requests": len(res.records), "failed": len(failed),
        "around": len(around), "failed_around": len(failed_around),
        "failed_around_pct": 100 * len(failed_around) / max(1, len(around)),
        "errors_around": sorted({f"{r.status} {r.error[:80]}" for r in failed_around}),
        "recovery_s": (rec - k) if rec is not None else None,
        "after": len(after), "failed_after": sum(not res.ok(r) for r in after),
        "last_failure_after_kill_s": (last_fail - k) if last_fail is not None else None,
        "p50_ms_around": percentiles(lat_around)[0], "p99_ms_around": percentiles(lat_around)[2],
        "max_ms_around": max(lat_around, default=float("nan")),
        "sessions": len(sessions), "sessions_continued": good, "session_max_diff": worst,
        "replicas": replica_summary(sampler.samples, deployment, res.started_at),
        "replacement": sorted(set(replica_pids(t.app, deployment)) - set(before)),
    }
    print(f"  {out['failed_around']}/{out['around']} failed in the 30 s around the kill "
          f"({out['failed_around_pct']:.2f}%), recovery {out['recovery_s']}, "
          f"{out['failed_after']}/{out['after']} failed after recovery, sessions "
          f"{good}/{len(sessions)} continued; errors: {out['errors_around'][:3]}", flush=True)
    return out


def http_bad_inputs(t: ServeTarget, max_context: int, max_body: int, max_k: int,
                    key: str) -> list[dict[str, Any]]:
    """Every malformed request of loadgen.bad_requests against the app; then a good request and
    a good append prove it still answers."""
    from lvm_ray.loadgen import unit_vectors
    from lvm_ray.serve.schemas import encode_b64
    from lvm_ray.serve.sessions import SessionCodec

    rows = []
    with httpx.Client(base_url=t.base_url, timeout=120) as http:
        s = http.post("/v1/sessions", json={"vectors": unit_vectors(2, t.dim,
                                                                   np.random.default_rng(1))
                                            .tolist()}).json()
        other = SessionCodec(b"another-key-0123456789").encode(
            SessionCodec(key.encode()).decode(s["state"]))
        for case in bad_requests(t.dim, s["state"], max_context, max_body, max_k, other):
            try:
                r = send_bad(http, case, s["session_id"])
                problem = check_bad(r, case)
                status, detail = r.status_code, r.json().get("detail", "") if r.headers.get(
                    "content-type", "").startswith("application/json") else r.text
            except httpx.HTTPError as e:
                status, detail, problem = 0, "", f"no answer: {type(e).__name__}: {e}"
            rows.append({"name": case.name, "method": case.method, "path": case.path,
                         "expected": case.status, "status": status,
                         "detail": detail if isinstance(detail, str) else json.dumps(detail),
                         "problem": problem})
        ok_predict = http.post("/v1/predict", json=encode_b64(
            unit_vectors(3, t.dim, np.random.default_rng(2)))).status_code
        ok_append = http.post(f"/v1/sessions/{s['session_id']}/append", json={
            "state": s["state"], **encode_b64(unit_vectors(1, t.dim, np.random.default_rng(3)))
        }).status_code
    rows.append({"name": "(after all of the above) a good predict and a good append",
                 "method": "POST", "path": "/v1/predict, append", "expected": 200,
                 "status": max(ok_predict, ok_append),
                 "detail": f"{ok_predict}, {ok_append}",
                 "problem": None if (ok_predict, ok_append) == (200, 200) else "not answering"})
    return rows


def listening_hosts(port: int) -> list[str]:
    """Local addresses with a TCP socket listening on `port` (from /proc/net/tcp{,6})."""
    hosts = []
    for name, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            addr, p = f[1].split(":")
            if int(p, 16) != port or f[3] != "0A":  # 0A = LISTEN
                continue
            raw = bytes.fromhex(addr)
            if width == 8:
                hosts.append(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                hosts.append(socket.inet_ntop(socket.AF_INET6, words))
    return hosts


class ServeBench:
    """The hybrid app from serve_configs/hybrid.yaml on a local Ray, for the serve sections."""

    def __init__(self, smoke: bool):
        self.smoke = smoke

    def start(self) -> ServeTarget:
        import ray
        import yaml
        from ray import serve

        from bench.bench_serve import assets, deploy
        from lvm_ray.data.bank import load_bank
        from lvm_ray.predictor import Predictor

        self.tmp = Path(tempfile.mkdtemp(prefix="reliability_serve_"))
        p2, p3, bank_path, self.what = assets(self.tmp)
        config = yaml.safe_load((ROOT / "serve_configs/hybrid.yaml").read_text())
        app = config["applications"][0]
        app["args"] = {"phase2_checkpoint": p2, "phase3_checkpoint": p3, "bank": bank_path,
                       "session_key": SESSION_KEY}
        self.port = free_port()
        config["http_options"]["port"] = self.port  # and no host: Serve's default
        self.config = config
        self.router = next(d for d in app["deployments"] if d["name"] == "Router")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        serve.start(http_options=config["http_options"])
        deploy(config)
        bank = load_bank(bank_path)
        import torch

        torch.set_num_threads(1)
        base = f"http://127.0.0.1:{self.port}"
        has_text = httpx.get(f"{base}/v1/models", timeout=60).json()["encoder"]["text_input"]
        self.target = ServeTarget(
            base, bank.dim, len(bank), [str(x) for x in bank.texts[:2000]] if has_text else None,
            Predictor.from_paths(p2, bank_path, device="cpu"),
            dict(self.router["user_config"]), self.deploy_router)
        self.bind = listening_hosts(self.port)
        return self.target

    def deploy_router(self, user_config: dict) -> None:
        from bench.bench_serve import deploy

        self.router["user_config"] = user_config
        deploy(self.config)

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)


def run_serve(smoke: bool) -> dict[str, Any]:
    b = ServeBench(smoke)
    t = b.start()
    uc = b.router["user_config"]
    out: dict[str, Any] = {"what": b.what, "bind": b.bind, "port": b.port,
                           "router": dict(uc)}
    try:
        print("load levels", flush=True)
        out["levels"] = load_levels(t, (1, 8, 32), seconds=5 if smoke else 60,
                                    max_requests=1_000_000)
        print("replica killed under load", flush=True)
        t.deploy_router({**t.router_config, "rollout_id": "fault"})
        out["fault"] = kill_replica_under_load(t, concurrency=8,
                                               kill_at_s=5 if smoke else 20,
                                               total_s=20 if smoke else 80)
        print("malformed requests", flush=True)
        out["bad"] = http_bad_inputs(t, uc["max_context_vectors"], uc["max_body_bytes"],
                                     uc["max_k"], SESSION_KEY)
        bad = [r for r in out["bad"] if r["problem"]]
        print(f"  {len(out['bad'])} cases, {len(bad)} not as expected: {bad[:3]}", flush=True)
        # Last (replicas added here stay for downscale_delay_s): a load the model deployment
        # itself limits, to show what its autoscaler does when its queue is the long one.
        print("model-bound level", flush=True)
        (lv,) = load_levels(t, (32,), seconds=5 if smoke else 60, max_requests=1_000_000,
                            mix=AppMix(b64_vectors=(500,), weights={"predict_b64": 1.0}))
        out["model_bound"] = lv
    finally:
        b.stop()
    return out


# ============================================================================= train


@dataclass(frozen=True)
class TrainSpec:
    """The training job every run of this section submits: the smoke model on a synthetic
    corpus sized so an epoch takes about a second, no early stopping, so runs are comparable
    epoch by epoch."""

    storage: Path
    bank: Path
    epochs: int = 8
    docs: int = 96
    workers: int = 1

    def cmd(self, name: str, *extra: str) -> list[str]:
        return ["python", "jobs/train.py", "--smoke-test", "--workers", str(self.workers),
                "--set", f"run.storage_path={self.storage}", "--set", f"run.name={name}",
                "--set", f"bank_path={self.bank}", "--set", f"train.max_epochs={self.epochs}",
                "--set", "train.patience=1000", "--set", f"corpus.max_docs={self.docs}",
                "--set", "run.max_failures=2", *extra]


def read_history(run_dir: Path) -> list[dict]:
    try:
        return json.loads((run_dir / "training_history.json").read_text())
    except (OSError, ValueError):
        return []


def best_hit(history: list[dict]) -> float:
    return max((h["val_bank_hit@5"] for h in history), default=float("nan"))


def job_result(url: str, sid: str, run_dir: Path, timeout_s: float = 900) -> dict[str, Any]:
    from ray_cluster_utils import wait_for_job

    t0 = time.time()
    status, logs = wait_for_job(url, sid, timeout_s)
    hist = read_history(run_dir)
    return {"status": status, "history": hist, "best": best_hit(hist),
            "seconds": time.time() - t0, "logs": logs,
            # The worker's own line: Ray Train handed it a checkpoint to continue from.
            "resumed_from": sorted({ln.rsplit(" ", 1)[1] for ln in logs.splitlines()
                                    if "resuming from checkpoint of epoch" in ln})}


def submit(url: str, cmd: list[str]) -> str:
    from ray_cluster_utils import submit_job

    return submit_job(url, cmd)


def registered_checkpoint(run_dir: Path) -> str | None:
    """The latest checkpoint Ray Train's controller has registered for the run (what a resumed
    run starts from); a checkpoint persisted but not yet registered does not count."""
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (OSError, ValueError):
        return None


def wait_epochs(run_dir: Path, n: int, timeout_s: float = 600,
                registered: bool = False) -> list[dict]:
    """Wait until `n` epochs are reported (and, with registered, a checkpoint is registered)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        h = read_history(run_dir)
        if len(h) >= n and (not registered or registered_checkpoint(run_dir)):
            return h
        time.sleep(0.05)
    raise TimeoutError(f"{run_dir}: fewer than {n} epochs after {timeout_s:.0f} s")


def train_run(url: str, spec: TrainSpec, name: str, *extra: str) -> dict[str, Any]:
    sid = submit(url, spec.cmd(name, *extra))
    r = job_result(url, sid, spec.storage / name)
    print(f"  {name}: {r['status']} in {r['seconds']:.0f} s, best val Hit@5 {r['best']:.4f}",
          flush=True)
    return r


def kill_driver_and_resubmit(url: str, spec: TrainSpec, name: str,
                             after_epochs: int = 3) -> dict[str, Any]:
    """Submit; once `after_epochs` epochs are reported, SIGKILL the job's driver process (its pid
    from the Jobs API); then submit the same command again: same run name, so Ray Train resumes
    from the run's latest checkpoint."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(url)
    run_dir = spec.storage / name
    sid = submit(url, spec.cmd(name))
    wait_epochs(run_dir, after_epochs, registered=True)
    pid = int(client.get_job_info(sid).driver_info.pid)
    os.kill(pid, signal.SIGKILL)  # the job's driver, by its pid
    killed_at, ckpt_at_kill = len(read_history(run_dir)), registered_checkpoint(run_dir)
    first = job_result(url, sid, run_dir, timeout_s=120)
    left, registered = files_under(run_dir), registered_checkpoint(run_dir)
    print(f"  {name}: driver pid {pid} killed after {killed_at} epoch(s); job {first['status']}; "
          f"run dir holds {[f for f in left if '/' not in f]}", flush=True)
    second = train_run(url, spec, name)
    return {"driver_pid": pid, "epochs_at_kill": killed_at, "checkpoint_at_kill": ckpt_at_kill,
            "registered_before_resubmit": registered, "first_status": first["status"],
            "left_after_kill": [f for f in left if "/" not in f], **second}


def kill_worker_mid_epoch(url: str, spec: TrainSpec, name: str,
                          after_epochs: int = 3) -> dict[str, Any]:
    """Once `after_epochs` epochs are reported, wait ~40% of an epoch's training time, then
    SIGKILL the rank-0 training worker (its pid from RUN_DIR/worker_pids). FailureConfig
    restarts the worker group from the latest checkpoint."""
    run_dir = spec.storage / name
    sid = submit(url, spec.cmd(name, "--record-pids"))
    hist = wait_epochs(run_dir, after_epochs)
    time.sleep(0.4 * hist[-1]["train_seconds"])
    pid_file = run_dir / "worker_pids" / "rank0.pid"
    pid = int(pid_file.read_text())
    epochs_before = len(read_history(run_dir))
    os.kill(pid, signal.SIGKILL)  # one training worker, by its pid
    r = job_result(url, sid, run_dir)
    new_pid = int(pid_file.read_text())
    print(f"  {name}: worker pid {pid} killed during epoch {epochs_before} "
          f"(new worker pid {new_pid}); job {r['status']}, best {r['best']:.4f}", flush=True)
    return {"worker_pid": pid, "new_pid": new_pid, "killed_in_epoch": epochs_before, **r}


def corrupt_and_resume(url: str, spec: TrainSpec, name: str) -> dict[str, Any]:
    """Cut the latest persisted checkpoint of a finished run in half (a write cut short), then
    submit the run again under the same name: it must refuse, naming the checkpoint."""
    from lvm_ray.distributed.trainer import resume_checkpoint

    run_dir = spec.storage / name
    snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    ck = run_dir / snap["latest_checkpoint_result"]["checkpoint_dir_name"]
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    before = {f: (run_dir / f).stat().st_mtime for f in files_under(run_dir)}
    sid = submit(url, spec.cmd(name))
    r = job_result(url, sid, run_dir, timeout_s=300)
    errors = [ln for ln in r["logs"].splitlines() if "lvm train: error:" in ln]
    changed = [f for f in files_under(run_dir)
               if f not in before or (run_dir / f).stat().st_mtime != before[f]]
    try:
        resume_checkpoint(run_dir)
        local = "accepted"
    except ValueError as e:
        local = str(e)
    print(f"  {name}: resume from a corrupted {ck.name}: job {r['status']}: "
          f"{errors[-1][:200] if errors else '(no error line)'}", flush=True)
    return {"checkpoint": ck.name, "status": r["status"],
            "message": errors[-1] if errors else "", "changed": changed, "local_check": local}


_DIE_MID_WRITE = """
import os, signal, sys
import torch
import lvm_ray.train.checkpoint as ck
from lvm_ray.config import ModelConfig
from lvm_ray.model import build_model

target, stage = sys.argv[1], sys.argv[2]
cfg = ModelConfig(d_in=16, hidden=16, layers=1, slots=2)
real_save_file, real_torch_save = ck.save_file, torch.save

def die():
    os.kill(os.getpid(), signal.SIGKILL)  # as a killed worker would: no cleanup runs

def half_weights(state, path):  # the weights file is cut short
    real_save_file(state, path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    die()

def after_state(obj, f):  # weights and state written, checkpoint.json not yet
    real_torch_save(obj, f)
    die()

if stage == "weights":
    ck.save_file = half_weights
else:
    ck.torch.save = after_state
ck.save_checkpoint(target, build_model(cfg), cfg, epoch=7, metrics={},
                   train_state={"epoch": 7})
"""


def interrupted_checkpoint_writes(tmp: Path) -> list[dict[str, Any]]:
    """save_checkpoint killed (SIGKILL) halfway through, into a new directory and over an
    existing checkpoint: what a loader finds afterwards."""
    import torch

    from lvm_ray.config import ModelConfig
    from lvm_ray.model import build_model
    from lvm_ray.train.checkpoint import is_valid_checkpoint, read_meta, save_checkpoint

    rows = []
    cfg = ModelConfig(d_in=16, hidden=16, layers=1, slots=2)
    for stage in ("weights", "state"):
        for existing in (False, True):
            d = tmp / f"ckpt_{stage}_{int(existing)}"
            target = d / "epoch"
            if existing:
                torch.manual_seed(0)
                save_checkpoint(target, build_model(cfg), cfg, epoch=3, metrics={},
                                train_state={"epoch": 3})
            p = subprocess.run([sys.executable, "-c", _DIE_MID_WRITE, str(target), stage],
                               capture_output=True, text=True, timeout=300)
            leftovers = sorted(x.name for x in d.iterdir() if x.name != "epoch")
            valid = is_valid_checkpoint(target)
            when = ("while writing the weights" if stage == "weights" else
                    "after writing the state, before checkpoint.json")
            rows.append({
                "killed": when,
                "target": "over an existing checkpoint (epoch 3)" if existing else "new directory",
                "exit": p.returncode, "target_exists": target.exists(), "valid": valid,
                "epoch": read_meta(target)["epoch"] if valid else None,
                "leftovers": leftovers,
                "leftovers_valid": any(is_valid_checkpoint(d / x) for x in leftovers),
                "ok": p.returncode == -signal.SIGKILL and (valid == existing)
                and (not valid or read_meta(target)["epoch"] == 3)
                and not any(is_valid_checkpoint(d / x) for x in leftovers)})
    return rows


def compare(a: list[dict], b: list[dict]) -> dict[str, Any]:
    """Epoch-by-epoch differences of two histories (train loss and val Hit@5)."""
    pairs = list(zip(a, b))
    loss = [abs(x["train_loss"] - y["train_loss"]) for x, y in pairs]
    hit = [abs(x["val_bank_hit@5"] - y["val_bank_hit@5"]) for x, y in pairs]
    return {"epochs": (len(a), len(b)),
            "identical": len(a) == len(b) and max(loss + hit, default=0.0) == 0.0,
            "max_loss_diff": max(loss, default=0.0), "max_hit_diff": max(hit, default=0.0),
            "best_diff": abs(best_hit(a) - best_hit(b))}


def run_train(smoke: bool) -> dict[str, Any]:
    from ray_cluster_utils import start_head

    tmp = Path(tempfile.mkdtemp(prefix="reliability_train_"))
    spec1 = TrainSpec(tmp / "runs", tmp / "bank.parquet", epochs=5 if smoke else 8,
                      docs=48 if smoke else 96, workers=1)
    spec2 = TrainSpec(tmp / "runs", tmp / "bank.parquet", epochs=spec1.epochs, docs=spec1.docs,
                      workers=2)
    out: dict[str, Any] = {"spec": {"epochs": spec1.epochs, "docs": spec1.docs}}
    print("checkpoint writes killed halfway", flush=True)
    out["writes"] = interrupted_checkpoint_writes(tmp)
    for r in out["writes"]:
        print(f"  {r}", flush=True)
    head, _, url = start_head(2)
    try:
        print("training jobs on a `ray start --head` cluster", flush=True)
        out["ref1"] = train_run(url, spec1, "ref_1w_a")
        if not smoke:
            out["ref1b"] = train_run(url, spec1, "ref_1w_b")
        out["driver"] = kill_driver_and_resubmit(url, spec1, "driver_killed_1w",
                                                 after_epochs=2 if smoke else 3)
        if not smoke:
            out["worker"] = kill_worker_mid_epoch(url, spec1, "worker_killed_1w")
            out["ref2"] = train_run(url, spec2, "ref_2w_a")
            out["ref2b"] = train_run(url, spec2, "ref_2w_b")
            out["worker2"] = kill_worker_mid_epoch(url, spec2, "worker_killed_2w")
            out["driver2"] = kill_driver_and_resubmit(url, spec2, "driver_killed_2w")
        out["corrupt"] = corrupt_and_resume(url, spec1, "ref_1w_a")
        bad = TrainSpec(tmp / "runs", tmp / "bank.parquet")
        sid = submit(url, bad.cmd("bad_job", "--set", "train.lr=-1"))
        r = job_result(url, sid, tmp / "runs" / "bad_job", timeout_s=300)
        out["bad_job"] = {"status": r["status"], "message": next(
            (ln for ln in r["logs"].splitlines() if "lvm train: error:" in ln), ""),
            "written": files_under(tmp / "runs" / "bad_job")}
        print(f"  bad job: {out['bad_job']}", flush=True)
    finally:
        head.stop()
        for r in out.values():
            if isinstance(r, dict):
                r.pop("logs", None)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ============================================================================= bad input (CLI)


@dataclass(frozen=True)
class CliCase:
    name: str
    argv: list[str]  # `lvm` arguments (or, with script, the job script's)
    match: str  # a word the one-line error must contain (case-insensitive)
    script: str | None = None  # run jobs/<script> instead of the `lvm` CLI


def cli_inputs(tmp: Path) -> dict[str, Path]:
    """Malformed corpora, banks, configs and a corrupted checkpoint under tmp/inputs; the
    outputs of every case go under tmp/out (which must stay empty)."""
    import torch

    from lvm_ray.config import ModelConfig
    from lvm_ray.data.bank import save_bank, to_table
    from lvm_ray.data.synthetic import make_synthetic_bank
    from lvm_ray.model import build_model
    from lvm_ray.train.checkpoint import save_checkpoint

    d = tmp / "inputs"
    d.mkdir(parents=True, exist_ok=True)
    (d / "unknown_key.yaml").write_text("train:\n  lr: 0.001\n  learning_rate: 0.01\n")
    (d / "broken.yaml").write_text("train: [lr: 0.001\n")
    (d / "list.yaml").write_text("- train\n- lr\n")
    (d / "empty_folder").mkdir(exist_ok=True)
    (d / "no_text_files").mkdir(exist_ok=True)
    (d / "no_text_files" / "speech.pdf").write_bytes(b"%PDF-1.4 not text")
    (d / "blank_docs").mkdir(exist_ok=True)
    (d / "blank_docs" / "a.txt").write_text("   \n\n")
    (d / "blank_docs" / "b.txt").write_bytes(b"\xff\xfe\x00 not utf-8 \xc3\x28")
    (d / "bad.jsonl").write_text('{"id": 1, "text": "ok"\nnot json\n[1, 2]\n{"id": 2}\n'
                                 '{"text": "no id"}\n{"id": 3, "text": "   "}\n')
    (d / "garbage.parquet").write_bytes(os.urandom(4096))
    bank = make_synthetic_bank(n_docs=8, doc_len=(30, 40), dim=32, seed=0)
    save_bank(bank, d / "ok_bank.parquet")
    nan = make_synthetic_bank(n_docs=8, doc_len=(30, 40), dim=32, seed=0)
    nan.vectors[3, 5] = np.nan
    save_bank(nan, d / "nan_bank.parquet")
    import pyarrow.parquet as pq

    pq.write_table(to_table(bank).drop_columns(["vector"]), d / "no_vector_bank.parquet")
    cfg = ModelConfig(d_in=32, hidden=8, layers=1, slots=2)
    torch.manual_seed(0)
    ck = save_checkpoint(d / "corrupt_ckpt", build_model(cfg), cfg, epoch=0, metrics={},
                         config={"window": {"context": 16}})
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2])  # a write cut short
    return {p.name: p for p in d.iterdir()}


def cli_cases(tmp: Path) -> list[CliCase]:
    """At least 10 malformed corpora / configs for `lvm ingest|train|evaluate` and the job
    scripts; each must exit non-zero with one line naming the problem and write nothing."""
    i = cli_inputs(tmp)
    out = tmp / "out"
    sets = ["--set", f"bank_path={out / 'bank.parquet'}", "--set",
            f"run.storage_path={out / 'runs'}"]

    def src(kind: str, path: Path) -> list[str]:
        return ["--set", f"corpus.source={kind}", "--set", f"corpus.path={path}"]

    smoke_bank = ["--smoke-test", *src("bank", i["ok_bank.parquet"])]
    return [
        CliCase("config file with an unknown key", ["train", "--local", "--config",
                str(i["unknown_key.yaml"]), *smoke_bank, *sets], "train.learning_rate"),
        CliCase("config file that is not YAML", ["train", "--local", "--config",
                str(i["broken.yaml"]), *smoke_bank, *sets], "not valid YAML"),
        CliCase("config file whose top level is a list", ["ingest", "--config",
                str(i["list.yaml"]), *sets], "mapping"),
        CliCase("config file that does not exist", ["ingest", "--config",
                str(tmp / "nope.yaml"), *sets], "not found"),
        CliCase("unknown preset", ["train", "--local", "--preset", "huge", *sets],
                "unknown preset"),
        CliCase("--set without '='", ["train", "--local", *smoke_bank, "--set", "train.lr",
                *sets], "section.key=value"),
        CliCase("--set value of the wrong type", ["train", "--local", *smoke_bank, "--set",
                "train.lr=fast", *sets], "expected a number"),
        CliCase("split fractions that do not sum to 1", ["ingest", "--smoke-test", "--set",
                "split.train=0.9", *sets], "sum to 1"),
        CliCase("window.context = 0", ["train", "--local", *smoke_bank, "--set",
                "window.context=0", *sets], "window.context"),
        CliCase("corpus.max_docs = 0", ["ingest", *src("folder", i["empty_folder"]), "--set",
                "corpus.max_docs=0", *sets], "max_docs"),
        CliCase("corpus folder that does not exist", ["ingest", *src("folder",
                tmp / "missing_folder"), *sets], "not found"),
        CliCase("corpus folder with no .txt/.md files", ["ingest", *src("folder",
                i["no_text_files"]), *sets], "no .txt/.md files"),
        CliCase("corpus folder whose files are blank or not UTF-8", ["ingest", *src("folder",
                i["blank_docs"]), "--set", "encoder.name=hashing-32", *sets],
                "no usable documents"),
        CliCase("JSONL corpus with no usable record", ["ingest", *src("jsonl", i["bad.jsonl"]),
                "--set", "encoder.name=hashing-32", *sets], "no usable documents"),
        CliCase("JSONL corpus path that does not exist", ["ingest", *src("jsonl",
                tmp / "missing.jsonl"), *sets], "not found"),
        CliCase("bank that is not Parquet", ["train", "--local", "--smoke-test",
                *src("bank", i["garbage.parquet"]), *sets], "not a readable Parquet"),
        CliCase("bank without a vector column", ["train", "--local", "--smoke-test",
                *src("bank", i["no_vector_bank.parquet"]), *sets], "vector"),
        CliCase("bank with NaN vectors (validated on ingest)", ["ingest", "--smoke-test",
                *src("bank", i["nan_bank.parquet"]), *sets], "NaN"),
        CliCase("bank whose dimension differs from model.d_in", ["train", "--local",
                *smoke_bank, "--set", "model.d_in=384", *sets], "d_in"),
        CliCase("batch larger than the training set", ["train", "--local", *smoke_bank,
                "--set", "train.batch_size=100000", *sets], "too few training windows"),
        CliCase("evaluate a checkpoint cut short mid-write", ["evaluate", *smoke_bank,
                "--checkpoint", f"bad={i['corrupt_ckpt']}", "--out", str(out / "eval"), *sets],
                "checksum"),
        CliCase("evaluate a checkpoint path that does not exist", ["evaluate", *smoke_bank,
                "--checkpoint", str(tmp / "no_ckpt"), "--out", str(out / "eval"), *sets],
                "not a checkpoint"),
        CliCase("job script: JSONL corpus with no usable record", [*src("jsonl", i["bad.jsonl"]),
                "--set", "encoder.name=hashing-32", *sets], "no usable documents",
                script="ingest.py"),
        CliCase("job script: unknown config key on the command line", ["--smoke-test",
                "--set", "train.epochs=3", *sets], "train.epochs", script="train.py"),
    ]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def run_cli_case(case: CliCase, tmp: Path, timeout_s: float = 600) -> dict[str, Any]:
    """Run one case as its own process (`python -m lvm_ray.cli` or `python jobs/...`):
    exit code, the last stderr line, whether a traceback was printed, what it wrote."""
    out = tmp / "out"
    before = files_under(out)
    cmd = [sys.executable, str(ROOT / "jobs" / case.script)] if case.script else \
        [sys.executable, "-m", "lvm_ray.cli"]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    p = subprocess.run(cmd + case.argv, capture_output=True, text=True, timeout=timeout_s,
                       cwd=tmp, env=env)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ": error: " in ln]
    written = [f for f in files_under(out) if f not in before]
    message = errors[-1] if errors else (lines[-1] if lines else "")
    return {"name": case.name, "command": ("jobs/" + case.script) if case.script else
            f"lvm {case.argv[0]}", "exit": p.returncode, "message": message,
            "traceback": "Traceback (most recent call last)" in p.stderr,
            "written": written, "seconds": time.time() - t0,
            "ok": p.returncode != 0 and bool(errors) and case.match.lower() in message.lower()
            and "Traceback" not in p.stderr and not written}


def run_input(smoke: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="reliability_input_"))
    try:
        cases = cli_cases(tmp)
        rows = []
        for c in cases[: 4] if smoke else cases:
            r = run_cli_case(c, tmp)
            print(f"  {'ok ' if r['ok'] else 'BAD'} exit {r['exit']} {r['name']}: "
                  f"{r['message'][:150]}", flush=True)
            rows.append(r)
        stray = [str(p) for p in tmp.rglob("*") if ".tmp" in p.name]
        return {"cases": rows, "stray_tmp": stray}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ============================================================================= report


def serve_report(s: dict[str, Any]) -> str:
    rows = []
    levels = s["levels"] + ([dict(s["model_bound"], level="32, predict 500 vectors only")]
                            if "model_bound" in s else [])
    for lv in levels:
        rows.append([lv["level"], f"{lv['wall_s']:.0f}", lv["requests"], f"{lv['rps']:.1f}",
                     fmt_ms(lv["p50_ms"]), fmt_ms(lv["p95_ms"]), fmt_ms(lv["p99_ms"]),
                     f"{lv['errors']}" + (f" {lv['errors_by_status']}" if lv["errors"] else ""),
                     lv["replicas"]["Phase2Model"], lv["replicas"]["Phase3Model"],
                     " / ".join(fmt_ms(lv.get("ongoing", {}).get(d, float("nan")))
                                for d in ("Router", "TextEncoder", *MODELS)),
                     f"{lv['routing']} ({lv['rollbacks']} rollback(s))"])
    levels = markdown_table(["concurrency", "s", "requests", "req/s", "P50 ms", "P95 ms",
                             "P99 ms", "errors", "Phase2Model replicas",
                             "Phase3Model replicas",
                             "mean ongoing requests: Router / TextEncoder / Phase2Model / "
                             "Phase3Model", "Phase-3 routing at the end"], rows)
    kinds = sorted({k for lv in s["levels"] for k in lv["by_kind"]})
    krows = [[k] + [f"{fmt_ms(lv['by_kind'][k]['p50_ms'])} / {fmt_ms(lv['by_kind'][k]['p95_ms'])}"
                    f" ({lv['by_kind'][k]['requests']})" if k in lv["by_kind"] else "-"
                    for lv in s["levels"]] for k in kinds]
    by_kind = markdown_table(["kind"] + [f"c={lv['level']}: P50 / P95 ms (n)"
                                         for lv in s["levels"]], krows)
    f = s["fault"]
    fault = markdown_table(["measure", "value"], [
        ["load", f"concurrency {f['concurrency']}, mixed kinds, {f['wall_s']:.0f} s, "
                 f"{f['requests']} requests"],
        ["killed", f"{f['deployment']} replica {f['killed']['tag']} (pid {f['killed']['pid']}) "
                   f"with SIGKILL at {f['kill_at_s']:.1f} s; replicas before: "
                   f"{f['replicas_before']}"],
        ["failed in the 30 s around the kill",
         f"{f['failed_around']} of {f['around']} ({f['failed_around_pct']:.2f}%)"],
        ["their errors", "; ".join(f["errors_around"][:4]) or "none"],
        ["replacement running after (recovery time)",
         f"{f['recovery_s']:.1f} s" if f["recovery_s"] is not None else "NOT RECOVERED"],
        ["failed after recovery", f"{f['failed_after']} of {f['after']}"],
        ["last failure after the kill", "-" if f["last_failure_after_kill_s"] is None
         else f"{f['last_failure_after_kill_s']:.1f} s"],
        ["latency in the 30 s around the kill", f"P50 {fmt_ms(f['p50_ms_around'])}, P99 "
         f"{fmt_ms(f['p99_ms_around'])}, max {fmt_ms(f['max_ms_around'])} ms"],
        ["Phase2Model RUNNING replicas over time", f["replicas"]],
        ["sessions opened before the kill, continued after it with the exact full-context "
         "prediction", f"{f['sessions_continued']} of {f['sessions']} (largest absolute "
                     f"difference {f['session_max_diff']:.1e})"],
    ])
    bad_rows = [[i + 1, r["name"], f"{r['method']} {r['path']}", r["status"],
                 r["detail"][:110].replace("|", "\\|").replace("\n", " "),
                 "ok" if not r["problem"] else f"**{r['problem']}**"]
                for i, r in enumerate(s["bad"])]
    n_bad = len(s["bad"]) - 1
    n_5xx = sum(r["status"] >= 500 or r["status"] == 0 for r in s["bad"])
    n_wrong = sum(bool(r["problem"]) for r in s["bad"])
    bad = markdown_table(["#", "malformed request", "endpoint", "status", "message (truncated)",
                          "as expected"], bad_rows)
    lv8 = next((lv for lv in s["levels"] if lv["level"] == 8), None)
    mb = s.get("model_bound")
    top = s["levels"][-1]
    queue = max(("TextEncoder", *MODELS), key=lambda d: top.get("ongoing", {}).get(d, 0.0))
    queue_text = (f"At concurrency {top['level']} the longest queue behind the router was at "
                  f"{queue} (mean {fmt_ms(top.get('ongoing', {}).get(queue, float('nan')))} "
                  "ongoing requests)" + (", which has a fixed single replica; the model "
                                         "deployments stayed under their target, so nothing "
                                         "was added there." if queue not in MODELS else "."))
    mb_text = "" if mb is None else (
        f"In the model-bound level (32 clients, each request a 500-vector predict, all on "
        f"Phase2Model) its RUNNING replicas went {mb['replicas']['Phase2Model']} "
        f"(mean ongoing requests {fmt_ms(mb['ongoing']['Phase2Model'])}): autoscaling "
        f"{'added a replica' if mb['max_replicas']['Phase2Model'] > 1 else 'added nothing'}.")
    scaled = {d: max(lv["max_replicas"][d] for lv in s["levels"]) for d in MODELS}
    return f"""
## Serve under load

Models: {s['what']}. Config: serve_configs/hybrid.yaml as is (Router user_config
`{json.dumps({k: s['router'][k] for k in ('threshold', 'canary_fraction', 'p95_limit_ms')})}`,
model deployments autoscaled 1-2 replicas at 8 ongoing requests each), except the app args
(paths, a fixed session key) and the port. Serve was started with no `host` and listened on
{', '.join(s['bind']) or 'unknown'} (port {s['port']}).

Load: `lvm_ray.loadgen.run_load`, closed loop, loopback only, each level capped at its duration;
kinds (weights) predict JSON 32 vectors (1), predict base64 64/256/600 vectors (2; the 600-vector
ones are long contexts: 5% canary to Phase-3), predict 3 texts (1), predict 50 concept ids (1),
session open with 16 vectors (0.5), session append of 1 vector (3; each client continues its
session for 20 appends). The Phase-3 rollout is re-armed before each level. Percentiles over
successful requests; client, proxy, router and replicas share the machine's 2 cores.

{levels}

Per kind (P50 / P95 ms, requests):

{by_kind}

Goal: zero errors at concurrency 8: **{verdict(lv8 is not None and lv8['errors'] == 0)}**
({lv8['errors'] if lv8 else '?'} errors).

Autoscaling: during the mixed levels at most {scaled['Phase2Model']} Phase2Model and
{scaled['Phase3Model']} Phase3Model replicas were RUNNING. {queue_text} {mb_text}
Replica counts are sampled from `serve.status()` every 2 s; the "replicas" columns list each
change with its time since the level started. "Mean ongoing requests" is what a deployment's
autoscaler compares with its `target_ongoing_requests` (8 per replica for the model
deployments; Router and TextEncoder have fixed replica counts): requests running in its
replicas plus requests queued for it in handles (Serve's `ray_serve_replica_processing_queries`
+ `ray_serve_deployment_queued_queries`, scraped every 2 s from 10 s into each level). A model
deployment gains a replica when this stays above 8 per replica for `upscale_delay_s` (10 s).

## Serve: a model replica process killed under load

{fault}

Goals: under 1% failed in the 30 s around the kill: **{verdict(f['failed_around_pct'] < 1)}**;
zero failures after recovery: **{verdict(f['recovery_s'] is not None and f['failed_after'] == 0)}**;
sessions survive: **{verdict(f['sessions'] and f['sessions_continued'] == f['sessions'])}**.

## Serve: malformed requests

{n_bad} malformed requests (`lvm_ray.loadgen.bad_requests`) against the same app, with its
configured caps (max_context_vectors {s['router']['max_context_vectors']}, max_body_bytes
{s['router']['max_body_bytes']}, max_k {s['router']['max_k']}); the last row checks the service
still answers. 5xx or no answer: **{n_5xx}**; not the expected 4xx with a message: **{n_wrong}**.

{bad}
"""


def train_report(t: dict[str, Any]) -> str:
    # The noise: how far two uninterrupted runs with the same seed end apart.
    noise1 = compare(t["ref1b"]["history"], t["ref1"]["history"])["best_diff"] \
        if "ref1b" in t else 0.0
    noise2 = compare(t["ref2b"]["history"], t["ref2"]["history"])["best_diff"] \
        if "ref2b" in t else None

    def hist_row(label: str, r: dict, ref: dict | None, how: str, noise: float | None) -> list:
        c = compare(r["history"], ref["history"]) if ref else None
        faulted = how != "-"
        return [label, how, r["status"], len(r["history"]), f"{r['best']:.4f}",
                "-" if c is None else ("identical" if c["identical"] else
                                       f"loss {c['max_loss_diff']:.2e}, Hit@5 "
                                       f"{c['max_hit_diff']:.4f}"),
                "-" if c is None else f"{c['best_diff']:.4f}",
                "-" if not faulted or noise is None else
                ("yes" if r["status"] == "SUCCEEDED" and c["best_diff"] <= noise else "**no**"),
                ", ".join(r.get("resumed_from") or []) or "-"]

    rows = []
    ref1 = t["ref1"]
    rows.append(hist_row("1 worker, uninterrupted (reference)", ref1, None, "-", noise1))
    if "ref1b" in t:
        rows.append(hist_row("1 worker, uninterrupted, again", t["ref1b"], ref1, "-", noise1))
    d = t["driver"]
    rows.append(hist_row("1 worker, driver killed, job re-submitted", d, ref1,
                         f"driver pid SIGKILL after {d['epochs_at_kill']} epochs (latest "
                         f"registered checkpoint {d.get('registered_before_resubmit')}); first "
                         f"job {d['first_status']}; same command again", noise1))
    if "worker" in t:
        w = t["worker"]
        rows.append(hist_row("1 worker, worker killed mid-epoch", w, ref1,
                             f"rank-0 pid SIGKILL during epoch {w['killed_in_epoch']} (before "
                             "it was reported); FailureConfig(max_failures=2)", noise1))
    if "ref2" in t:
        ref2 = t["ref2"]
        rows.append(hist_row("2 workers, uninterrupted (reference)", ref2, None, "-", noise2))
        rows.append(hist_row("2 workers, uninterrupted, again", t["ref2b"], ref2, "-", noise2))
        w = t["worker2"]
        rows.append(hist_row("2 workers, worker killed mid-epoch", w, ref2,
                             f"rank-0 pid SIGKILL during epoch {w['killed_in_epoch']}",
                             noise2))
        d2 = t["driver2"]
        rows.append(hist_row("2 workers, driver killed, job re-submitted", d2, ref2,
                             f"driver pid SIGKILL after {d2['epochs_at_kill']} epochs (latest "
                             f"registered checkpoint {d2.get('registered_before_resubmit')})",
                             noise2))
    table = markdown_table(["run", "fault", "job", "epochs", "best val Hit@5",
                            "max per-epoch difference from its reference",
                            "best minus reference best (abs)", "same best within the noise",
                            "resumed from (epoch)"], rows)
    wr = markdown_table(["save_checkpoint killed (SIGKILL)", "into", "target afterwards",
                         "left beside it", "as expected"],
                        [[r["killed"], r["target"],
                          ("valid, epoch " + str(r["epoch"])) if r["valid"] else
                          ("exists, INVALID" if r["target_exists"] else "absent"),
                          ", ".join(r["leftovers"]) + (" (not a valid checkpoint)"
                                                       if r["leftovers"] and not
                                                       r["leftovers_valid"] else ""),
                          "yes" if r["ok"] else "**no**"] for r in t["writes"]])
    c, b = t["corrupt"], t["bad_job"]
    noise_text = f"{noise1:.4f} with 1 worker" + ("" if noise2 is None else
                                                  f", {noise2:.4f} with 2 workers")
    noise = "with 1 worker two uninterrupted runs are " + (
        "not compared (smoke test)" if "ref1b" not in t else "bit-identical"
        if compare(t["ref1b"]["history"], ref1["history"])["identical"] else
        "NOT bit-identical (see the table)") + "."
    if "ref2b" in t:
        c2 = compare(t["ref2b"]["history"], t["ref2"]["history"])
        noise += (" With 2 workers two uninterrupted runs are bit-identical too." if
                  c2["identical"] else
                  f" With 2 workers they differ by up to {c2['max_loss_diff']:.2e} in train "
                  f"loss and {c2['max_hit_diff']:.4f} in val Hit@5 per epoch, "
                  f"{c2['best_diff']:.4f} in best val Hit@5: the noise for the 2-worker rows.")
    return f"""
## Training faults

Jobs submitted with `ray job submit` to a `ray start --head --num-cpus=2` cluster on this
machine (tests/ray_cluster_utils.py), all with the same command: `jobs/train.py --smoke-test`
(synthetic corpus of {t['spec']['docs']} documents, the smoke model), {t['spec']['epochs']} epochs
without early stopping, seed 0, `run.max_failures=2`. A run resumes from the latest checkpoint Ray
Train recorded (checkpoints are written when val Hit@5 improves, so the latest is the best);
epochs after it are trained again.

{table}

Noise: {noise}
Goal "a resumed run reaches the same best val Hit@5 as an uninterrupted one, within the
noise": a faulted run meets it when its best differs from its reference's by no more than two
uninterrupted runs differ ({noise_text}).
"resumed from" is the epoch of the checkpoint the worker was handed (its log line): Ray Train
resumes from the latest checkpoint its controller had registered, which can be older than the
latest one the worker wrote (the controller picks reports up asynchronously; a checkpoint
persisted but not yet registered is ignored, and its epochs are trained again).

A checkpoint that Ray Train would resume from, cut in half after the run finished
({c['checkpoint']}/model.safetensors): the same job submitted again ends **{c['status']}**
without training or writing anything ({len(c['changed'])} files changed), with the one line
`{c['message'][:300]}`.

A job with a malformed config (`--set train.lr=-1`) submitted the same way: **{b['status']}**,
`{b['message'][:200]}`; files written for it: {len(b['written'])}.

Checkpoint writes killed halfway (`save_checkpoint` in a child process that SIGKILLs itself
mid-write; checkpoints are written into a hidden sibling directory and renamed into place, and
checkpoint.json, written last, holds the SHA-256 of every file):

{wr}
"""


def input_report(r: dict[str, Any]) -> str:
    rows = [[i + 1, c["name"], c["command"], c["exit"],
             c["message"][:160].replace("|", "\\|"), "yes" if c["traceback"] else "no",
             len(c["written"]), "yes" if c["ok"] else "**no**"]
            for i, c in enumerate(r["cases"])]
    bad = [c for c in r["cases"] if not c["ok"]]
    return f"""
## Malformed corpora and configs (CLI and job scripts)

Each run as its own process (`python -m lvm_ray.cli ...` or `python jobs/<script> ...`), outputs
pointed at an empty directory. Expected: a non-zero exit, one line `lvm <command>: error: ...`
naming the problem, no traceback, nothing written. {len(r['cases'])} cases, **{len(bad)}** not as
expected; stray temporary files afterwards: {len(r['stray_tmp'])}.

{markdown_table(["#", "malformed input", "command", "exit", "message (truncated)", "traceback",
                 "files written", "as expected"], rows)}
"""


def write_report(sections: dict[str, str], runs: dict[str, dict]) -> None:
    """Replace (or add) each part's section of RELIABILITY.md; `runs` holds, per part, when and
    by which command its numbers were measured."""
    import re

    head = ("# lvm_ray reliability\n\nWritten by `make reliability` "
            "(`python bench/reliability.py`): every number below comes from the run named in its "
            "section. The fast parts of the same checks run in `make test` "
            "(tests/test_reliability_serve.py, tests/test_reliability_train.py, "
            "tests/test_bad_input_cli.py, tests/test_security.py); security properties and "
            "what a deployment must add: [docs/security.md](docs/security.md).\n")
    text = RELIABILITY.read_text() if RELIABILITY.exists() else head
    for name, body in sections.items():
        r = runs.get(name, {})
        section = (f"<!-- section:{name} -->\n{r.get('stamp', '')} Command: "
                   f"`{r.get('command', '?')}`, {r.get('seconds', 0):.0f} s. Load average at the "
                   f"end: {r.get('load', float('nan')):.1f} on {os.cpu_count()} cores (the machine "
                   f"is shared with other work).\n{body.strip()}\n<!-- /section:{name} -->")
        pattern = re.compile(rf"<!-- section:{name} -->.*?<!-- /section:{name} -->", re.S)
        text = pattern.sub(lambda _: section, text) if pattern.search(text) else \
            text.rstrip() + "\n\n" + section + "\n"
    RELIABILITY.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke-test", action="store_true", help="short runs; print only")
    ap.add_argument("--only", action="append", choices=list(PARTS),
                    help="run only these parts (repeatable); default all")
    ap.add_argument("--report-only", action="store_true",
                    help=f"rewrite RELIABILITY.md from the last run's {RESULTS.name}")
    args = ap.parse_args()
    parts = args.only or list(PARTS)
    command = "python bench/reliability.py" + "".join(f" --only {p}" for p in args.only or [])
    t0 = time.time()
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    runs = results.setdefault("runs", {})
    if args.report_only:
        done = [p for p in parts if p in results]
        write_report({p: PARTS[p][1](results[p]) for p in done}, runs)
        print(f"wrote {RELIABILITY} from {RESULTS}", flush=True)
        return 0
    for part in parts:
        t = time.time()
        results[part] = PARTS[part][0](args.smoke_test)
        runs[part] = {"stamp": stamp(), "command": command, "seconds": time.time() - t,
                      "load": os.getloadavg()[0]}
        if not args.smoke_test:  # kept part by part: a later failure loses nothing
            RESULTS.parent.mkdir(exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1, default=str))
    print(f"reliability: {time.time() - t0:.0f} s", flush=True)
    sections = {p: PARTS[p][1](results[p]) for p in parts}
    if args.smoke_test:
        for body in sections.values():
            print(body)
    else:
        write_report(sections, runs)
        print(f"wrote {RELIABILITY}", flush=True)
    return 0


PARTS = {"serve": (run_serve, serve_report), "train": (run_train, train_report),
         "input": (run_input, input_report)}


if __name__ == "__main__":
    sys.exit(main())
