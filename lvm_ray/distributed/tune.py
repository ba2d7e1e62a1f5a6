"""Ray Tune adapter: sweep context length x InfoNCE alpha with val Hit@5 as the objective.

The driver loads the bank once, puts it in the object store and hands it to every trial through
`tune.with_parameters`. A trial cuts its own windows for its context length (vectorised, cheap)
and runs the core `fit` loop, the same as `jobs/train.py`:

- one worker per trial: `fit` runs in the function trainable; its `report(row, ckpt_dir)`
  becomes `tune.report(metrics, checkpoint=...)`; a resumed trial continues from
  `tune.get_checkpoint()`;
- several workers per trial: the trial runs a TorchTrainer over `train_loop_per_worker` (the Ray
  Train adapter) and forwards its reports to Tune with TuneReportCallback.

The objective is the val selection metric of ../shared/EVAL_PROTOCOL.md (bank-Hit@5 by default,
or pool-Hit@5 over a FIXED pool): under the `document` window policy every context length has the
same val targets, so trials with different contexts are scored on the same windows. ASHA stops weak
trials on epochs. After the sweep, the sweep directory holds results.csv / results.md (one row per
trial), val_hit_vs_context.png (with copy-last and context-mean on the same val windows),
best.json and test_report.md (the best trial on test, beside the baselines, with 95% CIs).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from lvm_ray.config import (Config, ConfigError, EvalConfig, deep_update, from_dict, merge,
                            parse_override, to_dict)
from lvm_ray.data.bank import ConceptBank
from lvm_ray.data.windows import check_windows, make_windows
from lvm_ray.eval.metrics import select_key

EPOCHS_RUN = "epochs_run"  # epochs completed (epoch + 1): ASHA's time axis
SWEEP_STATE = "sweep.json"  # the sweep's configs, so --resume can refuse a changed sweep
STARTS = "trial_starts"  # one JSON-lines file per trial: every start, resume and end


@dataclass(frozen=True)
class SweepConfig:
    """The `tune:` section of a sweep YAML (unknown keys are errors, as in lvm_ray.config)."""

    name: str = "tune"  # sweep directory = <storage_path>/<name>
    storage_path: str | None = None  # None: the config's run.storage_path
    search: Literal["random", "grid"] = "random"
    contexts: tuple[int, ...] = (100, 250, 500, 1000)  # window.context values (always a grid)
    # Around the default loss (InfoNCE weight 1 beside cosine 0.1); the design's loss (preset
    # seed_loss: MSE 1, cosine 0.5) wants about 100x smaller values, e.g. [0.003, 0.3].
    alpha_range: tuple[float, ...] = (0.03, 3.0)  # random: loss.alpha ~ log-uniform(lo, hi)
    alphas: tuple[float, ...] = (0.03, 0.3, 3.0)  # grid: loss.alpha values
    num_samples: int = 2  # random: alpha draws per context; grid: repeats of the grid
    seed: int = 0  # seeds the alpha draws
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1  # ASHA: epochs every trial runs before it can be stopped
    reduction_factor: int = 2
    workers_per_trial: int = 1  # > 1: a TorchTrainer (DDP) inside each trial
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int = 2  # 0: as many as the resources allow
    alpha_buckets: int = 3  # random search: lines in the plot, log-spaced alpha bins
    evaluate_test: bool = True  # re-evaluate the best trial on test (CIs, baselines)


# What --smoke-test sweeps on top of the `smoke` config preset: 4 tiny trials, seconds each.
SMOKE_SWEEP: dict[str, Any] = {
    "name": "tune_smoke", "contexts": [2, 16], "num_samples": 2, "alpha_range": [0.03, 3.0],
    "grace_period": 1, "cpus_per_worker": 1.0, "max_concurrent_trials": 2, "alpha_buckets": 2,
}


def validate_sweep(s: SweepConfig) -> None:
    if not s.contexts or min(s.contexts) < 1:
        raise ConfigError("tune.contexts must be a non-empty list of integers >= 1")
    if len(s.alpha_range) != 2 or not 0 < s.alpha_range[0] < s.alpha_range[1]:
        raise ConfigError(f"tune.alpha_range must be [lo, hi] with 0 < lo < hi, "
                          f"got {list(s.alpha_range)}")
    if not s.alphas or min(s.alphas) < 0:
        raise ConfigError("tune.alphas must be a non-empty list of values >= 0")
    if s.num_samples < 1 or s.grace_period < 1 or s.reduction_factor < 2:
        raise ConfigError("tune.num_samples and grace_period must be >= 1, "
                          "reduction_factor >= 2")
    if s.workers_per_trial < 1 or s.cpus_per_worker <= 0 or s.gpus_per_worker < 0:
        # Ray refuses {"cpu": 0} for a trial (RAY_NOTES); use a small fraction instead.
        raise ConfigError("tune.workers_per_trial must be >= 1, cpus_per_worker > 0 and "
                          "gpus_per_worker >= 0")
    if s.max_concurrent_trials < 0 or s.alpha_buckets < 1:
        raise ConfigError("tune.max_concurrent_trials must be >= 0 and alpha_buckets >= 1")


def parse_sweep(data: dict[str, Any] | None) -> SweepConfig:
    s = from_dict(SweepConfig, data or {}, "tune")
    validate_sweep(s)
    return s


def load_sweep(path: str | Path | None = None, presets: list[str] | tuple[str, ...] = (),
               overrides: dict[str, Any] | None = None, smoke: bool = False
               ) -> tuple[Config, SweepConfig]:
    """(Config, SweepConfig) from presets, then a YAML file whose `tune:` section is the sweep
    and whose other sections are a normal lvm_ray config, then overrides (`tune.*` keys go to the
    sweep). smoke=True starts from the `smoke` preset and SMOKE_SWEEP."""
    from lvm_ray.config import load_config

    overrides = json.loads(json.dumps(overrides or {}))
    sweep_data: dict[str, Any] = dict(SMOKE_SWEEP) if smoke else {}
    file_data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            file_data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(file_data, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        deep_update(sweep_data, file_data.pop("tune", None) or {})
    deep_update(sweep_data, overrides.pop("tune", None) or {})
    cfg = load_config(None, (["smoke"] if smoke else []) + list(presets))
    if file_data:
        cfg = merge(cfg, file_data)
    if overrides:
        cfg = merge(cfg, overrides)
    return cfg, parse_sweep(sweep_data)


# ----------------------------------------------------------------------------- search space


def search_space(s: SweepConfig) -> dict[str, Any]:
    """Tune param_space: context is always a grid; alpha is log-uniform (random) or a grid."""
    from ray import tune

    alpha = (tune.grid_search(list(s.alphas)) if s.search == "grid"
             else tune.loguniform(*s.alpha_range))
    return {"context": tune.grid_search(list(s.contexts)), "alpha": alpha}


def n_trials(s: SweepConfig) -> int:
    per_context = len(s.alphas) if s.search == "grid" else 1
    return len(s.contexts) * per_context * s.num_samples


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The full config one trial trains with: the base with its sampled values."""
    return merge(base, {"window": {"context": int(params["context"])},
                        "loss": {"alpha": float(params["alpha"])}})


def objective_metric(cfg: Config) -> str:
    """The reported metric Tune maximises: never a pool whose size depends on the trial."""
    return f"val_{select_key(cfg.eval.select_metric, cfg.eval.pool_size)}"


def check_comparable(bank: ConceptBank, base: Config, s: SweepConfig) -> None:
    """Every context length must score the same val targets, or the objective compares
    different questions. True under both window policies when min_context <= every context."""
    ref = None
    for c in s.contexts:
        if base.window.min_context > c:
            raise ConfigError(f"window.min_context={base.window.min_context} exceeds the sweep's "
                              f"context {c}; lower window.min_context")
        ws = make_windows(bank, "val", merge(base, {"window": {"context": c}}).window)
        if ref is None:
            ref = ws.target_rows
        elif not np.array_equal(ref, ws.target_rows):
            raise ValueError(f"val targets differ between contexts {s.contexts[0]} and {c}; "
                             "trials would not be comparable")
    if ref is None or len(ref) == 0:
        raise ValueError("the bank has no val windows to tune on")


def alpha_bucket(alpha: float, s: SweepConfig) -> str:
    """Plot line label of a trial's alpha: its value (grid) or a log-spaced bin (random)."""
    if s.search == "grid":
        return f"alpha={alpha:g}"
    lo, hi = (math.log10(a) for a in s.alpha_range)
    edges = np.linspace(lo, hi, s.alpha_buckets + 1)
    i = int(np.clip(np.searchsorted(edges, math.log10(alpha), side="right") - 1, 0,
                    s.alpha_buckets - 1))
    return f"alpha {10 ** edges[i]:.3g}-{10 ** edges[i + 1]:.3g}"


# ----------------------------------------------------------------------------- the trial


def _tune_metrics(row: dict[str, Any]) -> dict[str, Any]:
    metrics = {k: v for k, v in row.items() if isinstance(v, (int, float, bool, str))}
    metrics[EPOCHS_RUN] = int(row["epoch"]) + 1
    return metrics


def _log_event(sweep_dir: str, trial_id: str, event: str, **extra: Any) -> None:
    """Append one line to the trial's start log (local storage only): how many times a trial
    was started or resumed, which the results table shows and the resume test counts."""
    if "://" in sweep_dir:
        return
    d = Path(sweep_dir) / STARTS
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{trial_id}.jsonl", "a") as f:
        f.write(json.dumps({"event": event, "time": time.time(), "pid": os.getpid(),
                            **extra}) + "\n")


def lvm_trial(config: dict[str, Any], shared: dict[str, Any]) -> None:
    """The Tune trainable: one trial = one `fit` at this trial's context length and alpha."""
    import ray
    from ray import tune

    base = from_dict(Config, shared["base"])
    sweep = parse_sweep(shared["sweep"])
    cfg = trial_config(base, config)
    bank: ConceptBank = ray.get(shared["bank"])
    trial_id = tune.get_context().get_trial_id()
    restored = tune.get_checkpoint()
    _log_event(shared["sweep_dir"], trial_id, "start", resumed=restored is not None,
               context=cfg.window.context, alpha=cfg.loss.alpha)
    train_ws = make_windows(bank, "train", cfg.window)
    val_ws = make_windows(bank, "val", cfg.window)
    for ws in (train_ws, val_ws):
        check_windows(bank, ws)
    if sweep.workers_per_trial == 1:
        _fit_in_trial(cfg, bank, train_ws, val_ws, restored, sweep)
    else:
        _fit_with_ray_train(cfg, shared["bank"], train_ws, val_ws, sweep,
                            f"{shared['sweep_dir']}/train", trial_id)
    _log_event(shared["sweep_dir"], trial_id, "end")


def _fit_in_trial(cfg: Config, bank: ConceptBank, train_ws, val_ws, restored, sweep) -> None:
    import torch
    from ray import tune

    from lvm_ray.train.step import Runtime, fit, local_epoch_indices, resolve_device

    # Ray sets OMP_NUM_THREADS=1 for fractional CPUs; match the trial's share explicitly.
    torch.set_num_threads(max(1, int(sweep.cpus_per_worker)))
    scratch = Path(tempfile.mkdtemp(prefix="lvm_tune_"))
    resume_from = None
    if restored is not None:
        resume_from = scratch / "resume"
        restored.to_directory(str(resume_from))

    def report(row: dict[str, Any], ckpt_dir: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None
        tune.report(_tune_metrics(row), checkpoint=checkpoint)
        if ckpt_dir is not None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # persisted by Tune; free local disk

    rt = Runtime(epoch_indices=local_epoch_indices(len(train_ws), cfg.train), report=report,
                 device=resolve_device(cfg.train.device), checkpoint_root=scratch / "ckpt",
                 resume_from=resume_from)
    try:
        fit(cfg, bank, train_ws, val_ws, rt)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _epochs_report_callback():
    """TuneReportCallback that also reports EPOCHS_RUN, ASHA's time axis."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochsTuneReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            metrics = [{**m, EPOCHS_RUN: int(m["epoch"]) + 1} for m in metrics]
            super().after_report(run_context, metrics, checkpoint)

    return EpochsTuneReportCallback()


def _fit_with_ray_train(cfg: Config, bank_ref, train_ws, val_ws, sweep: SweepConfig,
                        storage: str, trial_id: str) -> None:
    """Several DDP workers per trial: the Ray Train adapter, its reports forwarded to Tune.
    A restarted trial resumes inside Ray Train (same storage path and name)."""
    from lvm_ray.distributed.trainer import build_trainer

    cfg = merge(cfg, {"scaling": {"num_workers": sweep.workers_per_trial,
                                  "cpus_per_worker": sweep.cpus_per_worker}})
    build_trainer(cfg, bank_ref, train_ws, val_ws, storage_path=storage, name=trial_id,
                  use_gpu=sweep.gpus_per_worker > 0, gpus_per_worker=sweep.gpus_per_worker,
                  callbacks=(_epochs_report_callback(),)).fit()


def trial_dirname(trial) -> str:
    c = trial.config
    return f"{trial.trial_id}_L{c.get('context')}_a{float(c.get('alpha', 0)):.4g}"


def trial_resources(s: SweepConfig) -> dict[str, float]:
    if s.workers_per_trial == 1:
        return {"cpu": s.cpus_per_worker, "gpu": s.gpus_per_worker}
    # The trial only drives a TorchTrainer; its workers ask for their own resources.
    return {"cpu": 0.1}


# ----------------------------------------------------------------------------- the driver


@dataclass
class SweepResult:
    sweep_dir: str
    status: Literal["finished", "interrupted"]
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    test: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


def sweep_dir_of(cfg: Config, s: SweepConfig) -> str:
    storage = s.storage_path or cfg.run.storage_path
    if "://" not in storage:
        storage = os.path.abspath(storage)
    return f"{storage.rstrip('/')}/{s.name}"


_ABSENT = object()


def _config_diff(a: Any, b: Any, path: str = "") -> tuple[list[str], list[str]]:
    """(changed values, keys that the saved config `a` lacks: fields added to the code since)."""
    if isinstance(a, dict) and isinstance(b, dict):
        changed, added = [], []
        for k in sorted(set(a) | set(b)):
            c, n = _config_diff(a.get(k, _ABSENT), b.get(k, _ABSENT), f"{path}.{k}" if path else k)
            changed += c
            added += n
        return changed, added
    if a is _ABSENT:
        return [], [f"{path}={b!r}"]
    if b is _ABSENT:
        return [f"{path}: {a!r} -> (no longer a config key)"], []
    return ([] if a == b else [f"{path}: {a!r} -> {b!r}"]), []


def run_sweep(cfg: Config, sweep: SweepConfig, resume: bool = False, overwrite: bool = False,
              bank: ConceptBank | None = None) -> SweepResult:
    """Run (or, with resume, continue) the sweep and write its outputs. Ray must be started."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from lvm_ray.workflows import ensure_bank, say

    t0 = time.perf_counter()
    # num_to_keep=1 makes Tune snapshot its state at every checkpoint (a few ms here) and warn.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    sweep_dir = sweep_dir_of(cfg, sweep)
    local = "://" not in sweep_dir
    if resume and not tune.Tuner.can_restore(sweep_dir):
        raise ValueError(f"--resume: no sweep to restore at {sweep_dir}")
    if not resume and local and Path(sweep_dir).exists() and not overwrite:
        raise ValueError(f"sweep directory {sweep_dir} exists: pass --resume to continue it, "
                         "--overwrite to start over, or another tune.name")
    bank = bank if bank is not None else ensure_bank(cfg)
    # What the sweep started with: --resume refuses other values, or another bank.
    state = {"config": to_dict(cfg), "tune": to_dict(sweep), "data": bank.identity()}
    saved = Path(sweep_dir) / SWEEP_STATE
    if resume and local and saved.is_file():
        changed, added = _config_diff(json.loads(saved.read_text()), state)
        if changed:
            raise ConfigError("--resume with a different config or bank than the sweep started "
                              "with: " + "; ".join(changed[:8]))
        if added:
            say("config keys added since the sweep started (defaults used): " + ", ".join(added))
    if not resume and local and Path(sweep_dir).exists():
        shutil.rmtree(sweep_dir)  # --overwrite
    if local:
        Path(sweep_dir).mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(state, indent=2))

    check_comparable(bank, cfg, sweep)
    metric = objective_metric(cfg)
    shared = {"bank": ray.put(bank), "base": to_dict(cfg), "sweep": to_dict(sweep),
              "sweep_dir": sweep_dir}
    trainable = tune.with_resources(tune.with_parameters(lvm_trial, shared=shared),
                                    trial_resources(sweep))
    say(f"sweep {sweep_dir}: {n_trials(sweep)} trials ({sweep.search}: contexts "
        f"{list(sweep.contexts)} x alpha), objective {metric} (max), scheduler "
        f"{sweep.scheduler}, {'resuming' if resume else 'starting'}")
    if resume:
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_errored=True)
    else:
        scheduler = (ASHAScheduler(time_attr=EPOCHS_RUN, max_t=cfg.train.max_epochs,
                                   grace_period=min(sweep.grace_period, cfg.train.max_epochs),
                                   reduction_factor=sweep.reduction_factor)
                     if sweep.scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(sweep),
            tune_config=tune.TuneConfig(
                metric=metric, mode="max", scheduler=scheduler, num_samples=sweep.num_samples,
                # max_concurrent_trials is ignored beside a search_alg: the generator limits.
                search_alg=BasicVariantGenerator(random_state=sweep.seed,
                                                 max_concurrent=sweep.max_concurrent_trials),
                trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(
                name=sweep.name, storage_path=sweep_dir.rsplit("/", 1)[0],
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=1, checkpoint_score_attribute=metric,
                    checkpoint_score_order="max"),
                failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures)),
        )
    grid = tuner.fit()
    finished = finished_trials(sweep_dir)
    if finished < n_trials(sweep):
        say(f"sweep interrupted: {finished} of {n_trials(sweep)} trials finished; "
            f"continue with --resume (same config)")
        return SweepResult(sweep_dir, "interrupted", seconds=time.perf_counter() - t0)
    out = write_outputs(grid, cfg, sweep, bank, sweep_dir)
    out.seconds = time.perf_counter() - t0
    say(f"sweep finished in {out.seconds:.0f} s; results in {sweep_dir}")
    return out


def finished_trials(sweep_dir: str) -> int:
    """Trials that ended (TERMINATED or ERROR) in the saved experiment state. After Ctrl+C the
    in-memory trials read TERMINATED too, but the state Tune saved (and restores) does not."""
    from ray.tune import ExperimentAnalysis

    return sum(t.status in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(sweep_dir).trials)


# ----------------------------------------------------------------------------- outputs


def _starts(sweep_dir: str, trial_id: str) -> int:
    f = Path(sweep_dir) / STARTS / f"{trial_id}.jsonl"
    if not f.is_file():
        return 0
    return sum(json.loads(line)["event"] == "start" for line in f.read_text().splitlines())


def _checkpoint_path(result, best_row: dict[str, Any] | None) -> str | None:
    if best_row is not None and isinstance(best_row.get("checkpoint_path"), str):
        return best_row["checkpoint_path"]  # multi-worker trial: Ray Train's checkpoint
    ckpts = [c for c, _ in (result.best_checkpoints or [])]
    if not ckpts and result.checkpoint is not None:
        ckpts = [result.checkpoint]
    return ckpts[-1].path if ckpts else None


def trial_rows(grid, cfg: Config, sweep: SweepConfig, sweep_dir: str) -> list[dict[str, Any]]:
    """One row per trial, read back from what each trial reported: its best epoch by the
    objective (the epoch whose checkpoint Tune kept), and how its training ended."""
    metric = objective_metric(cfg)
    rows = []
    for result in grid:
        df = result.metrics_dataframe
        reported = [] if df is None or df.empty else df.to_dict("records")
        reported = [r for r in reported if metric in r and np.isfinite(r[metric])]
        c = result.config
        best = max(reported, key=lambda r: r[metric]) if reported else None  # first of ties
        epochs = int(max(r[EPOCHS_RUN] for r in reported)) if reported else 0
        last = reported[-1] if reported else {}
        if result.error is not None:
            ended = "error"
        elif epochs >= cfg.train.max_epochs:
            ended = "max_epochs"
        elif reported and epochs - 1 - int(last["best_epoch"]) >= cfg.train.patience:
            ended = "patience"
        else:
            ended = sweep.scheduler  # stopped by the scheduler (ASHA)
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.split("_")[0]

        def at_best(key: str) -> float:
            return float(best[key]) if best is not None and key in best else float("nan")

        rows.append({
            "trial_id": trial_id,
            "context": int(c["context"]),
            "alpha": float(c["alpha"]),
            "alpha_bucket": alpha_bucket(float(c["alpha"]), sweep),
            metric: at_best(metric),
            "val_ca": at_best("val_ca"),
            "val_margin": at_best("val_margin"),
            "val_cosine": at_best("val_cosine"),
            "val_mrr": at_best("val_mrr"),
            "best_epoch": int(best["epoch"]) if best is not None else -1,
            "epochs_run": epochs,
            "ended": ended,
            "starts": _starts(sweep_dir, trial_id) if "://" not in sweep_dir else -1,
            "train_seconds": float(sum(r.get("train_seconds", 0.0) for r in reported)),
            "checkpoint": _checkpoint_path(result, best),
            "trial_dir": result.path,
        })
    rows.sort(key=lambda r: (r["context"], r["alpha"]))
    return rows


def val_baselines(bank: ConceptBank, cfg: Config, sweep: SweepConfig) -> dict[str, dict]:
    """copy-last, context-mean and ridge (fit on train, chosen on val) on the val windows every
    trial is scored on (the same val_ws.sample(max_eval_windows, seed) as `fit`). Windows of the
    longest context, so context-mean may pick any m; copy-last is the same for every context."""
    from lvm_ray.eval.baselines import evaluate_baselines, fit_baselines

    wcfg = merge(cfg, {"window": {"context": max(sweep.contexts)}}).window
    train_ws, val_ws = make_windows(bank, "train", wcfg), make_windows(bank, "val", wcfg)
    val_eval = val_ws.sample(cfg.train.max_eval_windows, cfg.train.seed)
    ecfg = from_dict(EvalConfig, {**to_dict(cfg.eval), "bootstrap": 0})
    return evaluate_baselines(fit_baselines(bank, train_ws, val_ws, cfg.eval), bank, val_eval,
                              ecfg)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if not np.isfinite(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def write_tables(rows: list[dict[str, Any]], baselines: dict[str, dict], cfg: Config,
                 sweep_dir: Path) -> None:
    metric = objective_metric(cfg)
    cols = list(rows[0]) if rows else []
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    first = next(iter(baselines.values()), {})
    label = metric.replace("val_", "val ").replace("bank_hit", "bank-Hit").replace("_hit",
                                                                                  "-Hit")
    lines = [
        "# Sweep results", "",
        f"- objective: {metric} (max), {first.get('n_windows', '?')} val windows, "
        f"bank {first.get('bank_size', '?')} val concepts (chance "
        f"{100 * first.get('bank_chance@5', float('nan')):.2f}% for bank-Hit@5)",
        f"- window policy {cfg.window.policy} (min_context {cfg.window.min_context}): "
        "every context length is scored on the same val targets",
        "- values at each trial's best epoch (the checkpoint kept); Hit and CA in %", "",
        f"| trial | context | alpha | {label} % | CA % | margin | epochs | best epoch | ended "
        "| starts | checkpoint |",
        "|---" * 11 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['trial_id']} | {r['context']} | {r['alpha']:.4g} | {100 * r[metric]:.2f} | "
            f"{100 * r['val_ca']:.2f} | {r['val_margin']:.4f} | {r['epochs_run']} | "
            f"{r['best_epoch']} | {r['ended']} | {r['starts']} | {_fmt(r['checkpoint'])} |")
    key = metric[len("val_"):]
    lines += ["", "Baselines on the same val windows:", "",
              f"| baseline | {label} % | CA % | margin |", "|---|---|---|---|"]
    for name, s in baselines.items():
        lines.append(f"| {name} | {100 * s.get(key, float('nan')):.2f} | "
                     f"{100 * s['ca']:.2f} | {s['margin']:.4f} |")
    (sweep_dir / "results.md").write_text("\n".join(lines) + "\n")


def plot_sweep(rows: list[dict[str, Any]], baselines: dict[str, dict], cfg: Config,
               path_png: Path) -> Path:
    """Val objective (best epoch of each trial) against context length, one line per alpha
    bucket (mean over its trials; every trial as a dot), baselines as horizontal lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = objective_metric(cfg)
    key = metric[len("val_"):]
    fig = Figure(figsize=(7, 4.5), layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    buckets = sorted({r["alpha_bucket"] for r in rows},
                     key=lambda b: min(r["alpha"] for r in rows if r["alpha_bucket"] == b))
    for i, b in enumerate(buckets):
        mine = [r for r in rows if r["alpha_bucket"] == b and np.isfinite(r[metric])]
        color = f"C{i}"
        ctxs = sorted({r["context"] for r in mine})
        means = [100 * np.mean([r[metric] for r in mine if r["context"] == c]) for c in ctxs]
        ax.plot(ctxs, means, color=color, label=b)
        for stopped in (False, True):
            pts = [r for r in mine if (r["ended"] == "asha") == stopped]
            ax.scatter([r["context"] for r in pts], [100 * r[metric] for r in pts], s=30,
                       edgecolors=color, facecolors="none" if stopped else color, alpha=0.6)
    styles = {"copy-last": ("k", "--"), "context-mean": ("0.45", ":"), "ridge": ("tab:red", "-.")}
    for name, s in baselines.items():
        color, ls = next((v for p, v in styles.items() if name.startswith(p)), ("0.5", "-"))
        ax.axhline(100 * s.get(key, float("nan")), color=color, ls=ls, lw=1.2, label=name)
    contexts = sorted({r["context"] for r in rows})
    if len(contexts) > 1 and contexts[-1] / max(contexts[0], 1) >= 8:
        ax.set_xscale("log")
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.minorticks_off()
    first = next(iter(baselines.values()), {})
    ax.set_xlabel("context length L (window.context)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric} vs context (val: {first.get('n_windows', '?')} windows, bank "
                 f"{first.get('bank_size', '?')})\nlines: mean per alpha bucket; dots: trials at "
                 "their best epoch (hollow: stopped by ASHA)", fontsize=9)
    ax.legend(fontsize=7)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path_png, dpi=120)
    return path_png


def evaluate_best_on_test(best: dict[str, Any], cfg: Config, bank: ConceptBank,
                          sweep_dir: Path) -> dict[str, dict]:
    """The best trial's checkpoint on TEST beside the baselines (same windows), 95% CIs."""
    from lvm_ray.eval.evaluate import evaluate_on_windows
    from lvm_ray.eval.report import markdown_report, plot_comparison
    from lvm_ray.train.checkpoint import load_checkpoint
    from lvm_ray.workflows import prepare_windows

    tcfg = trial_config(cfg, best)
    ck = load_checkpoint(best["checkpoint"])
    ws = prepare_windows(tcfg, bank)
    name = f"best trial {best['trial_id']} (L={best['context']}, alpha={best['alpha']:.3g})"
    results = evaluate_on_windows({name: ck.model}, bank, ws.train, ws.val, ws.test, tcfg)
    metric = objective_metric(cfg)
    meta = {"split": "test", "checkpoint": best["checkpoint"], "epoch": ck.meta.get("epoch"),
            "selected by": f"{metric} = {100 * best[metric]:.2f}% on val",
            "window": f"{tcfg.window.policy}, L={tcfg.window.context}",
            "encoder": bank.meta.get("encoder"), "n_parameters": ck.meta.get("n_parameters")}
    md = markdown_report(results, "Best sweep trial on test", meta)
    plot_comparison(results, sweep_dir / "test_comparison.png")
    md += "\n![bank-Hit@5 and CA with 95% CIs](test_comparison.png)\n"
    (sweep_dir / "test_report.md").write_text(md)
    (sweep_dir / "test_results.json").write_text(json.dumps(results, indent=2))
    return results


def write_outputs(grid, cfg: Config, sweep: SweepConfig, bank: ConceptBank,
                  sweep_dir: str) -> SweepResult:
    from lvm_ray.workflows import say

    metric = objective_metric(cfg)
    rows = trial_rows(grid, cfg, sweep, sweep_dir)
    out = SweepResult(sweep_dir, "finished", rows)
    if "://" in sweep_dir:
        say("remote storage: tables, plot and test report are written only for local sweeps")
        return out
    d = Path(sweep_dir)
    out.baselines = val_baselines(bank, cfg, sweep)
    write_tables(rows, out.baselines, cfg, d)
    plot_sweep(rows, out.baselines, cfg, d / "val_hit_vs_context.png")
    scored = [r for r in rows if np.isfinite(r[metric]) and r["checkpoint"]]
    if not scored:
        say("no trial reported a checkpoint; see results.md")
        return out
    out.best = max(scored, key=lambda r: r[metric])  # ties: the shorter context (rows sorted)
    best_json = {"objective": metric, "mode": "max", **out.best,
                 "config": to_dict(trial_config(cfg, out.best))}
    if sweep.evaluate_test:
        out.test = evaluate_best_on_test(out.best, cfg, bank, d)
        best_name = next(iter(out.test))
        keep = [f"{k}{s}" for k in ("bank_hit@5", "mrr", "ca", "cosine", "margin")
                for s in ("", "_lo", "_hi")] + ["n_windows", "bank_size", "bank_chance@5"]
        best_json["test"] = {k: out.test[best_name][k] for k in keep if k in out.test[best_name]}
    (d / "best.json").write_text(json.dumps(best_json, indent=2))
    return out


# ----------------------------------------------------------------------------- command line


def add_tune_args(p) -> None:
    """Sweep-only flags; the config flags (--config, --preset, --set, --smoke-test) come from
    lvm_ray.cli.add_config_args. --set tune.KEY=VALUE sets a sweep value."""
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep (same config): finished trials are kept, "
                        "unfinished and errored ones continue from their last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing sweep directory of the same name and start over")
    p.add_argument("--name", help="sweep name (tune.name): the directory under the storage path")
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")


def sweep_from_args(args) -> tuple[Config, SweepConfig]:
    overrides: dict[str, Any] = {}
    for text in args.overrides:
        deep_update(overrides, parse_override(text))
    if args.name:
        deep_update(overrides, {"tune": {"name": args.name}})
    return load_sweep(args.config, list(args.preset), overrides, smoke=args.smoke_test)


def run_tune(args) -> int:
    """`lvm tune` / jobs/tune.py."""
    from lvm_ray.cli import init_ray

    cfg, sweep = sweep_from_args(args)
    init_ray(args.num_cpus)
    # A smoke test is meant to be rerun: it starts over unless asked to resume.
    res = run_sweep(cfg, sweep, resume=args.resume,
                    overwrite=args.overwrite or (args.smoke_test and not args.resume))
    if res.status != "finished":
        return 3
    print((Path(res.sweep_dir) / "results.md").read_text())
    if res.best is not None:
        metric = objective_metric(cfg)
        print(f"best: trial {res.best['trial_id']} context={res.best['context']} "
              f"alpha={res.best['alpha']:.4g} {metric}={100 * res.best[metric]:.2f}%\n"
              f"checkpoint: {res.best['checkpoint']}")
    if res.test:
        from lvm_ray.eval.evaluate import summary_table

        print("\ntest (best trial vs baselines, 95% CIs):\n" + summary_table(res.test))
    print(f"\nsweep directory: {res.sweep_dir} ({res.seconds:.0f} s)")
    return 0
