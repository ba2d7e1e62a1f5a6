"""`lvm train`: windows -> training (Ray Train or the plain loop) -> the best checkpoint on test
beside the baselines -> a run directory with checkpoint, history, curves and report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lvm_ray.config import Config
from lvm_ray.console import say
from lvm_ray.data.bank import ConceptBank
from lvm_ray.distributed.trainer import train_with_ray
from lvm_ray.train.loop import fit_local
from lvm_ray.workflows.evaluate import evaluate_run
from lvm_ray.workflows.prepare import ensure_bank, prepare_windows


def train_and_evaluate(cfg: Config, use_ray: bool = True, bank: ConceptBank | None = None,
                       record_pids: bool = False) -> dict[str, Any]:
    """Train, pick the best checkpoint by val, evaluate it on test beside the baselines and
    write the run directory. Returns a summary dict."""
    bank = bank if bank is not None else ensure_bank(cfg, use_ray=use_ray)
    ws = prepare_windows(cfg, bank)
    t0 = time.perf_counter()
    if use_ray:
        say(f"training {cfg.model.kind} with Ray Train on {cfg.scaling.num_workers} worker(s)")
        run = train_with_ray(cfg, bank, ws.train, ws.val, record_pids=record_pids)
        run_dir, best, history = Path(run.run_dir), Path(run.best_checkpoint), run.history
    else:
        run_dir = Path(cfg.run.storage_path) / cfg.run.name
        say(f"training {cfg.model.kind} with the plain PyTorch loop")
        res = fit_local(cfg, bank, ws.train, ws.val, run_dir)
        best, history = Path(res["best_checkpoint"]), res["history"]
    train_seconds = time.perf_counter() - t0
    say(f"training done in {train_seconds:.0f} s; best checkpoint {best}")
    summary = evaluate_run(cfg, bank, ws, best, run_dir, history)
    summary["train_seconds"] = train_seconds
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
