"""Ray Tune adapter: the search space, the trial and the driver of `lvm tune` (context length x
InfoNCE alpha, objective val Hit@5). Tables, plots and the best trial's test report are made from
what this returns, by lvm_ray.eval.sweep and lvm_ray.workflows.sweep.

The driver puts the bank in the object store once and hands it to every trial through
`tune.with_parameters`. A trial cuts its own windows for its context length (vectorised, cheap)
and runs the core `fit` loop, the same as `lvm train`:

- one worker per trial: `fit` runs in the function trainable; its `report(row, ckpt_dir)`
  becomes `tune.report(metrics, checkpoint=...)`; a resumed trial continues from
  `tune.get_checkpoint()`;
- several workers per trial: the trial runs a TorchTrainer over `train_loop_per_worker` (the Ray
  Train adapter) and forwards its reports to Tune with TuneReportCallback.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lvm_ray.config import Config, ConfigError, config_diff, from_dict, merge, to_dict
from lvm_ray.console import say
from lvm_ray.data.bank import ConceptBank
from lvm_ray.data.coherence import coherence_gate
from lvm_ray.data.windows import check_windows, make_windows
from lvm_ray.device import resolve_device
from lvm_ray.distributed.trainer import build_trainer
from lvm_ray.eval.sweep import (EPOCHS_RUN, TrialRecord, check_comparable, check_grid,
                                n_trials, objective_metric, trial_config)
from lvm_ray.storage import absolute, is_uri
from lvm_ray.train.loop import Runtime, fit, local_epoch_indices
from lvm_ray.train.tracking import check_available, mlflow_uri, tracking_key

SWEEP_STATE = "sweep.json"  # the sweep's configs, so --resume can refuse a changed sweep
STARTS = "trial_starts"  # one JSON-lines file per trial: every start, resume and end


def search_space(cfg: Config) -> dict[str, Any]:
    """Tune param_space: context is always a grid; alpha is log-uniform (random) or a grid;
    each tune.grid axis a grid."""
    from ray import tune

    s = cfg.tune
    alpha = (tune.grid_search(list(s.alphas)) if s.search == "grid"
             else tune.loguniform(*s.alpha_range))
    return {"context": tune.grid_search(list(s.contexts)), "alpha": alpha,
            **{k: tune.grid_search(list(v)) for k, v in s.grid.items()}}


def sweep_dir_of(cfg: Config) -> str:
    return f"{absolute(cfg.tune.storage_path or cfg.run.storage_path).rstrip('/')}/{cfg.tune.name}"


# ----------------------------------------------------------------------------- the trial


def _tune_metrics(row: dict[str, Any]) -> dict[str, Any]:
    metrics = {k: v for k, v in row.items() if isinstance(v, (int, float, bool, str))}
    metrics[EPOCHS_RUN] = int(row["epoch"]) + 1
    return metrics


def _log_event(sweep_dir: str, trial_id: str, event: str, **extra: Any) -> None:
    """Append one line to the trial's start log (local storage only): how many times a trial
    was started or resumed, which the results table shows and the resume test counts."""
    if is_uri(sweep_dir):
        return
    d = Path(sweep_dir) / STARTS
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{trial_id}.jsonl", "a") as f:
        f.write(json.dumps({"event": event, "time": time.time(), "pid": os.getpid(),
                            **extra}) + "\n")


def _starts(sweep_dir: str, trial_id: str) -> int:
    f = Path(sweep_dir) / STARTS / f"{trial_id}.jsonl"
    if is_uri(sweep_dir) or not f.is_file():
        return -1 if is_uri(sweep_dir) else 0
    return sum(json.loads(line)["event"] == "start" for line in f.read_text().splitlines())


def lvm_trial(config: dict[str, Any], shared: dict[str, Any]) -> None:
    """The Tune trainable: one trial = one `fit` at this trial's context length and alpha."""
    import ray
    from ray import tune

    # Tune's logger callbacks track each trial (tracking_callbacks); the trial itself does not.
    cfg = merge(trial_config(from_dict(Config, shared["base"]), config),
                {"run": {"tracking": "none"}})
    bank: ConceptBank = ray.get(shared["bank"])
    trial_id = tune.get_context().get_trial_id()
    restored = tune.get_checkpoint()
    _log_event(shared["sweep_dir"], trial_id, "start", resumed=restored is not None,
               context=cfg.window.context, alpha=cfg.loss.alpha)
    train_ws = make_windows(bank, "train", cfg.window)
    val_ws = make_windows(bank, "val", cfg.window)
    for ws in (train_ws, val_ws):
        check_windows(bank, ws)
    train_ws, _ = coherence_gate(bank.vectors, train_ws, cfg.window)
    if cfg.tune.workers_per_trial == 1:
        _fit_in_trial(cfg, bank, train_ws, val_ws, restored)
    else:
        _fit_with_ray_train(cfg, shared["bank"], train_ws, val_ws,
                            f"{shared['sweep_dir']}/train", trial_id)
    _log_event(shared["sweep_dir"], trial_id, "end")


def _fit_in_trial(cfg: Config, bank: ConceptBank, train_ws, val_ws, restored) -> None:
    from ray import tune

    # Ray sets OMP_NUM_THREADS=1 for fractional CPUs; match the trial's share explicitly.
    torch.set_num_threads(max(1, int(cfg.tune.cpus_per_worker)))
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
                 device=torch.device(resolve_device(cfg.train.device)),
                 checkpoint_root=scratch / "ckpt", resume_from=resume_from)
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


def _fit_with_ray_train(cfg: Config, bank_ref, train_ws, val_ws, storage: str,
                        trial_id: str) -> None:
    """Several DDP workers per trial: the Ray Train adapter, its reports forwarded to Tune.
    A restarted trial resumes inside Ray Train (same storage path and name)."""
    s = cfg.tune
    cfg = merge(cfg, {"scaling": {"num_workers": s.workers_per_trial,
                                  "cpus_per_worker": s.cpus_per_worker}})
    build_trainer(cfg, bank_ref, train_ws, val_ws, storage_path=storage, name=trial_id,
                  use_gpu=s.gpus_per_worker > 0, gpus_per_worker=s.gpus_per_worker,
                  callbacks=(_epochs_report_callback(),)).fit()


def tracking_callbacks(cfg: Config, sweep_dir: str) -> list:
    """Tune's own logger callbacks for cfg.run.tracking: one MLflow run / TensorBoard log /
    W&B run per trial, written by the driver."""
    kind = cfg.run.tracking
    check_available(kind)
    if kind == "mlflow":
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        class Callback(MLflowLoggerCallback):
            def log_trial_result(self, iteration, trial, result):
                # MLflow refuses '@' in names: the same names as lvm_ray's own trackers.
                super().log_trial_result(iteration, trial, {tracking_key(k): v
                                                            for k, v in result.items()})

        return [Callback(tracking_uri=mlflow_uri(cfg, sweep_dir),
                         experiment_name=cfg.tune.name, save_artifact=False)]
    if kind == "tensorboard":
        from ray.tune.logger import TBXLoggerCallback

        return [TBXLoggerCallback()]  # events in each trial's directory
    if kind == "wandb":
        from ray.air.integrations.wandb import WandbLoggerCallback

        return [WandbLoggerCallback(project="lvm_ray", group=cfg.tune.name, mode="offline")]
    return []


def trial_dirname(trial) -> str:
    c = trial.config
    return f"{trial.trial_id}_L{c.get('context')}_a{float(c.get('alpha', 0)):.4g}"


def trial_resources(cfg: Config) -> dict[str, float]:
    s = cfg.tune
    if s.workers_per_trial == 1:
        return {"cpu": s.cpus_per_worker, "gpu": s.gpus_per_worker}
    # The trial only drives a TorchTrainer; its workers ask for their own resources.
    return {"cpu": 0.1}


# ----------------------------------------------------------------------------- the driver


def prepare_sweep_dir(cfg: Config, bank: ConceptBank, resume: bool, overwrite: bool) -> str:
    """Check that the sweep may start (or resume) and record what it started with: --resume
    refuses other values, or another bank."""
    from ray import tune

    sweep_dir = sweep_dir_of(cfg)
    local = not is_uri(sweep_dir)
    if resume and not tune.Tuner.can_restore(sweep_dir):
        raise ValueError(f"--resume: no sweep to restore at {sweep_dir}")
    if not resume and local and Path(sweep_dir).exists() and not overwrite:
        raise ValueError(f"sweep directory {sweep_dir} exists: pass --resume to continue it, "
                         "--overwrite to start over, or another tune.name")
    state = {"config": to_dict(cfg), "data": bank.identity()}
    saved = Path(sweep_dir) / SWEEP_STATE
    if resume and local and saved.is_file():
        changed, added = config_diff(json.loads(saved.read_text()), state)
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
    return sweep_dir


def run_trials(cfg: Config, bank: ConceptBank, sweep_dir: str,
               resume: bool = False) -> list[TrialRecord] | None:
    """Run (or continue) the sweep's trials; their records, or None when it was interrupted
    before every trial ended. Ray must be started."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # num_to_keep=1 makes Tune snapshot its state at every checkpoint (a few ms here) and warn.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    s = cfg.tune
    check_grid(cfg)
    check_comparable(bank, cfg)
    metric = objective_metric(cfg)
    # Numeric arrays only (no texts): every trial maps the same object-store copy.
    shared = {"bank": ray.put(bank.lean(cfg.train.vector_dtype)), "base": to_dict(cfg),
              "sweep_dir": sweep_dir}
    trainable = tune.with_resources(tune.with_parameters(lvm_trial, shared=shared),
                                    trial_resources(cfg))
    grid = "".join(f" x {k} {list(v)}" for k, v in s.grid.items())
    say(f"sweep {sweep_dir}: {n_trials(s)} trials ({s.search}: contexts {list(s.contexts)} x "
        f"alpha{grid}), objective {metric} (max), scheduler {s.scheduler}, "
        f"{'resuming' if resume else 'starting'}")
    if resume:
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_errored=True)
    else:
        scheduler = (ASHAScheduler(time_attr=EPOCHS_RUN, max_t=cfg.train.max_epochs,
                                   grace_period=min(s.grace_period, cfg.train.max_epochs),
                                   reduction_factor=s.reduction_factor)
                     if s.scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg),
            tune_config=tune.TuneConfig(
                metric=metric, mode="max", scheduler=scheduler, num_samples=s.num_samples,
                # max_concurrent_trials is ignored beside a search_alg: the generator limits.
                search_alg=BasicVariantGenerator(random_state=s.seed,
                                                 max_concurrent=s.max_concurrent_trials),
                trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(
                name=s.name, storage_path=sweep_dir.rsplit("/", 1)[0],
                callbacks=tracking_callbacks(cfg, sweep_dir),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=1, checkpoint_score_attribute=metric,
                    checkpoint_score_order="max"),
                failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures)),
        )
    grid = tuner.fit()
    finished = finished_trials(sweep_dir)
    if finished < n_trials(s):
        say(f"sweep interrupted: {finished} of {n_trials(s)} trials finished; "
            f"continue with --resume (same config)")
        return None
    return [_record(result, sweep_dir) for result in grid]


def finished_trials(sweep_dir: str) -> int:
    """Trials that ended (TERMINATED or ERROR) in the saved experiment state. After Ctrl+C the
    in-memory trials read TERMINATED too, but the state Tune saved (and restores) does not."""
    from ray.tune import ExperimentAnalysis

    return sum(t.status in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(sweep_dir).trials)


def _record(result, sweep_dir: str) -> TrialRecord:
    """A ray.tune.Result as plain values."""
    df = result.metrics_dataframe
    reported = [] if df is None or df.empty else df.to_dict("records")
    ckpts = [c for c, _ in (result.best_checkpoints or [])]
    if not ckpts and result.checkpoint is not None:
        ckpts = [result.checkpoint]
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.split("_")[0]
    return TrialRecord(trial_id=trial_id, config=dict(result.config), reported=reported,
                       error=result.error is not None, path=result.path,
                       checkpoint=ckpts[-1].path if ckpts else None,
                       starts=_starts(sweep_dir, trial_id))
