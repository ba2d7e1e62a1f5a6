"""Reliability: load, faults and bad input, with figures. Writes RELIABILITY.md.

    python bench/reliability.py                  # ~15 min on 2 cores; writes RELIABILITY.md
    python bench/reliability.py --smoke-test     # a few seconds per part; prints, writes nothing
    python bench/reliability.py --only serve     # serve | train | input (repeatable)
    python bench/reliability.py --report-only    # RELIABILITY.md again from runs/reliability.json

serve: the hybrid app (serve_configs/hybrid.yaml, the demo's checkpoints and bank when they exist)
on a local Ray, loaded by harness.loadgen (loopback only, capped in requests and seconds) at
concurrency 1, 8 and 32 with mixed request kinds while a sampler records replica counts; then a
model replica process is killed by its pid under load, and sessions opened before the kill are
continued after it; then every malformed request of harness.bad_requests.
train: jobs submitted to a real `ray start --head` (harness/cluster.py): uninterrupted
runs (the noise), a worker killed mid-epoch, the driver killed mid-run and the job re-submitted
under the same run name, a resume from a corrupted checkpoint, a checkpoint write killed halfway.
input: malformed corpora and configs through the CLI and the job scripts.

Loopback only; every Ray process this starts is stopped by its pid. The scenarios live in
harness/ (serve_faults, train_faults, cli_cases); the tests (tests/test_reliability_*.py,
tests/test_bad_input_cli.py) call the same functions with small numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.common import stamp  # noqa: E402
from bench.reliability_report import (RELIABILITY, input_report, serve_report,  # noqa: E402
                                      train_report, write_report)
from harness.cli_cases import cli_cases, files_under, run_cli_case  # noqa: E402
from harness.cluster import start_head  # noqa: E402
from harness.loadgen import AppMix  # noqa: E402
from harness.net import free_port  # noqa: E402
from harness.serve_faults import (ServeTarget, http_bad_inputs,  # noqa: E402
                                  kill_replica_under_load, listening_hosts, load_levels)
from harness.train_faults import (TrainSpec, corrupt_and_resume,  # noqa: E402
                                  interrupted_checkpoint_writes, job_result,
                                  kill_driver_and_resubmit, kill_worker_mid_epoch, submit,
                                  train_run)

RESULTS = ROOT / "runs" / "reliability.json"  # the last run's raw results (--report-only)
SESSION_KEY = "reliability-session-key-0123456789"


# ============================================================================= serve


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
        # Long contexts must reach Phase-3 for its guardrail scenarios, whatever the production
        # threshold (hybrid.yaml routes nothing there: docs/serve.md).
        self.router["user_config"]["threshold"] = 500
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


# ============================================================================= train


def run_train(smoke: bool) -> dict[str, Any]:
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


# ============================================================================= bad input (CLI)


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
