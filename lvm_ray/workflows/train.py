"""`lvm train`: windows -> training (Ray Train or the plain loop) -> the best checkpoint on test
beside the baselines -> a run directory with checkpoint, history, curves and report.

A run directory belongs to one config and one bank: run.json records both when the run starts.
An existing run is continued only when asked (--resume) and only with the same config and bank;
--overwrite starts it over. Nothing is resumed silently.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from lvm_ray.config import Config, ConfigError, config_diff, to_dict
from lvm_ray.console import say
from lvm_ray.data.bank import ConceptBank
from lvm_ray.distributed.trainer import share_bank, train_with_ray
from lvm_ray.train.checkpoint import is_valid_checkpoint
from lvm_ray.train.loop import check_steps, fit_local, windows_per_rank, with_bank_width
from lvm_ray.workflows.evaluate import evaluate_run
from lvm_ray.workflows.prepare import ensure_bank, prepare_windows

RUN_RECORD = "run.json"


def claim_run_dir(cfg: Config, bank: ConceptBank, resume: bool, overwrite: bool) -> Path:
    """The run directory, checked: a new run, one to overwrite, or one to resume with the config
    and bank it started with. Records run.json for a new run."""
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    record = {"config": to_dict(cfg), "data": bank.identity()}
    exists = run_dir.is_dir() and any(run_dir.iterdir())
    if exists and overwrite:
        say(f"--overwrite: removing the earlier run {run_dir}")
        shutil.rmtree(run_dir)
    elif exists and not resume:
        raise ConfigError(f"run directory {run_dir} exists (run.name={cfg.run.name!r}): pass "
                          "--resume to continue it, --overwrite to start over, or choose another "
                          "run.name")
    elif exists:
        saved = run_dir / RUN_RECORD
        if saved.is_file():
            changed, added = config_diff(json.loads(saved.read_text()), record)
            if changed:
                raise ConfigError("--resume with a different config or bank than the run "
                                  f"{run_dir} started with: " + "; ".join(changed[:8]))
            if added:
                say("config keys added since the run started (defaults used): "
                    + ", ".join(added))
        else:
            say(f"{run_dir} has no {RUN_RECORD} (an older run): resuming without checking its "
                "config")
        say(f"--resume: continuing the run in {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / RUN_RECORD).is_file():
        (run_dir / RUN_RECORD).write_text(json.dumps(record, indent=2))
    return run_dir


def latest_local_checkpoint(run_dir: Path) -> Path | None:
    """The newest valid checkpoint the plain loop left in run_dir (None: start afresh)."""
    ckpts = sorted((run_dir / "checkpoints").glob("epoch_*"), reverse=True)
    return next((c for c in ckpts if is_valid_checkpoint(c)), None)


def train_and_evaluate(cfg: Config, use_ray: bool = True, bank: ConceptBank | None = None,
                       record_pids: bool = False, resume: bool = False,
                       overwrite: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Train, pick the best checkpoint by val, evaluate it on test beside the baselines and
    write the run directory. Returns a summary dict."""
    bank = bank if bank is not None else ensure_bank(cfg, use_ray=use_ray)
    if cfg.model.d_in is None:
        say(f"model.d_in = {bank.dim}, from the bank (set model.d_in to fix it)")
    cfg = with_bank_width(cfg, bank)
    ws = prepare_windows(cfg, bank)
    world = cfg.scaling.num_workers if use_ray else 1
    # Settings the data cannot satisfy fail here, before the run directory is touched.
    check_steps(windows_per_rank(len(ws.train), cfg.train, world), cfg.train, world)
    run_dir = claim_run_dir(cfg, bank, resume, overwrite)
    t0 = time.perf_counter()
    if use_ray:
        say(f"training {cfg.model.kind} with Ray Train on {cfg.scaling.num_workers} worker(s)")
        # One copy of the vectors on this node: the object store's, mapped by the workers and
        # (float32) by this driver for the evaluation that follows.
        bank_ref, bank = share_bank(bank, cfg.train.vector_dtype)
        run = train_with_ray(cfg, bank, ws.train, ws.val, record_pids=record_pids,
                             verbose=verbose, bank_ref=bank_ref)
        run_dir, best, history = Path(run.run_dir), Path(run.best_checkpoint), run.history
    else:
        say(f"training {cfg.model.kind} with the plain PyTorch loop")
        res = fit_local(cfg, bank, ws.train, ws.val, run_dir,
                        resume_from=latest_local_checkpoint(run_dir) if resume else None)
        best, history = Path(res["best_checkpoint"]), res["history"]
    train_seconds = time.perf_counter() - t0
    say(f"training done in {train_seconds:.0f} s; best checkpoint {best}")
    summary = evaluate_run(cfg, bank, ws, best, run_dir, history)
    summary["train_seconds"] = train_seconds
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
