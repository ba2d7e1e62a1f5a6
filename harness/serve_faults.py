"""Serve fault scenarios, shared by tests/test_reliability_serve.py and bench/reliability.py:
load levels with replica sampling, a model replica killed by its pid under load, sessions that
must continue across it, every malformed request against the live app, and where the HTTP port
listens. Loopback only (harness.loadgen refuses anything else)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from harness.bad_requests import bad_requests, check_bad, send_bad
from harness.loadgen import AppMix, LoadResult, app_kinds, percentiles, run_load, unit_vectors
from lvm_ray.serve.schemas import encode_b64
from lvm_ray.serve.sessions import SessionCodec

APP = "lvm"
MODELS = ("Phase2Model", "Phase3Model")


def fmt_ms(x: float) -> str:
    return "-" if x != x else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


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
