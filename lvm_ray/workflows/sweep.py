"""`lvm tune`: the Ray Tune sweep (lvm_ray.distributed.tune), then its tables, plot and the best
trial on test. The sweep directory ends up holding results.csv / results.md (one row per trial),
val_hit_vs_context.png (with the baselines on the same val windows), best.json and
test_report.md (the best trial on test, beside the baselines, with 95% CIs)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from lvm_ray.config import Config, to_dict
from lvm_ray.console import say
from lvm_ray.data.bank import ConceptBank
from lvm_ray.distributed.tune import prepare_sweep_dir, run_trials
from lvm_ray.eval.sweep import (SweepResult, TrialRecord, objective_metric, plot_sweep,
                                trial_config, trial_rows, val_baselines, write_tables)
from lvm_ray.storage import is_uri
from lvm_ray.workflows.evaluate import evaluate_best_trial
from lvm_ray.workflows.prepare import ensure_bank


def run_sweep(cfg: Config, resume: bool = False, overwrite: bool = False,
              bank: ConceptBank | None = None) -> SweepResult:
    """Run (or, with resume, continue) the sweep cfg.tune and write its outputs. Ray must be
    started."""
    t0 = time.perf_counter()
    bank = bank if bank is not None else ensure_bank(cfg)
    sweep_dir = prepare_sweep_dir(cfg, bank, resume, overwrite)
    records = run_trials(cfg, bank, sweep_dir, resume)
    if records is None:
        return SweepResult(sweep_dir, "interrupted", seconds=time.perf_counter() - t0)
    out = write_outputs(records, cfg, bank, sweep_dir)
    out.seconds = time.perf_counter() - t0
    say(f"sweep finished in {out.seconds:.0f} s; results in {sweep_dir}")
    return out


def write_outputs(records: list[TrialRecord], cfg: Config, bank: ConceptBank,
                  sweep_dir: str) -> SweepResult:
    metric = objective_metric(cfg)
    rows = trial_rows(records, cfg)
    out = SweepResult(sweep_dir, "finished", rows)
    if is_uri(sweep_dir):
        say("remote storage: tables, plot and test report are written only for local sweeps")
        return out
    d = Path(sweep_dir)
    out.baselines = val_baselines(bank, cfg)
    write_tables(rows, out.baselines, cfg, d)
    plot_sweep(rows, out.baselines, cfg, d / "val_hit_vs_context.png")
    scored = [r for r in rows if np.isfinite(r[metric]) and r["checkpoint"]]
    if not scored:
        say("no trial reported a checkpoint; see results.md")
        return out
    out.best = max(scored, key=lambda r: r[metric])  # ties: the shorter context (rows sorted)
    best_json = {"objective": metric, "mode": "max", **out.best,
                 "config": to_dict(trial_config(cfg, out.best))}
    if cfg.tune.evaluate_test:
        out.test = evaluate_best_trial(out.best, cfg, bank, d)
        best_name = next(iter(out.test))
        keep = [f"{k}{s}" for k in ("bank_hit@5", "mrr", "ca", "cosine", "margin")
                for s in ("", "_lo", "_hi")] + ["n_windows", "bank_size", "bank_chance@5"]
        best_json["test"] = {k: out.test[best_name][k] for k in keep if k in out.test[best_name]}
    (d / "best.json").write_text(json.dumps(best_json, indent=2))
    return out
