"""Training fault scenarios, shared by tests/test_job_submit.py, tests/test_reliability_train.py
and bench/reliability.py: jobs submitted to a real `ray start --head` (harness.cluster), a worker
killed mid-epoch, the driver killed and the job re-submitted under the same run name, a resume
from a corrupted checkpoint, and a checkpoint write killed halfway."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.cli_cases import files_under
from harness.cluster import submit_job, wait_for_job
from lvm_ray.config import ModelConfig
from lvm_ray.distributed.trainer import resume_checkpoint
from lvm_ray.model import build_model
from lvm_ray.train.checkpoint import is_valid_checkpoint, read_meta, save_checkpoint


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
    t0 = time.time()
    status, logs = wait_for_job(url, sid, timeout_s)
    hist = read_history(run_dir)
    return {"status": status, "history": hist, "best": best_hit(hist),
            "seconds": time.time() - t0, "logs": logs,
            # The worker's own line: Ray Train handed it a checkpoint to continue from.
            "resumed_from": sorted({ln.rsplit(" ", 1)[1] for ln in logs.splitlines()
                                    if "resuming from checkpoint of epoch" in ln})}


def submit(url: str, cmd: list[str]) -> str:
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
    from the Jobs API); then submit the same command again with --resume: same run name, so Ray
    Train resumes from the run's latest checkpoint."""
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
    second = train_run(url, spec, name, "--resume")  # an existing run continues only if asked
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
    submit the run again under the same name with --resume: it must refuse, naming the
    checkpoint."""
    run_dir = spec.storage / name
    snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    ck = run_dir / snap["latest_checkpoint_result"]["checkpoint_dir_name"]
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    before = {f: (run_dir / f).stat().st_mtime for f in files_under(run_dir)}
    sid = submit(url, spec.cmd(name, "--resume"))
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
