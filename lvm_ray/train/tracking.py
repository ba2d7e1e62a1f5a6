"""Experiment tracking of the training loop's per-epoch metrics: MLflow, TensorBoard or W&B.

One `Tracker` per run, made on the process that logs (rank 0 under Ray Train, the trainable under
Tune uses Tune's own logger callbacks instead). Offline by default: an MLflow file store under
the run directory, TensorBoard event files beside it, W&B in offline mode. The loop's JSON
history and PNG curves are written as before; trackers are in addition.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from lvm_ray.config import Config, to_dict


class Tracker(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...
    def close(self) -> None: ...


class NoTracker:
    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def tracking_key(key: str) -> str:
    """A metric's name in trackers: MLflow refuses '@', so val_bank_hit@5 -> val_bank_hit_at5."""
    return key.replace("@", "_at")


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics a tracker can plot (numbers, bools as 0/1), under their tracking names."""
    return {tracking_key(k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, str)}


def mlflow_uri(cfg: Config, run_dir: str | Path) -> str:
    """cfg.run.tracking_uri, else an offline file store under the run directory."""
    if cfg.run.tracking_uri:
        return cfg.run.tracking_uri
    # MLflow 3 keeps its file store in maintenance mode behind this opt-in; it needs no server.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return Path(run_dir, "mlruns").resolve().as_uri()


def tensorboard_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "tensorboard"


class MlflowTracker:
    """One MLflow run (named after run.name) holding the config as params."""

    def __init__(self, cfg: Config, run_dir: str | Path, mlflow_module: Any = None):
        if mlflow_module is None:
            import mlflow as mlflow_module

            mlflow_module.set_tracking_uri(mlflow_uri(cfg, run_dir))
            mlflow_module.set_experiment(cfg.run.name)
            mlflow_module.start_run(run_name=cfg.run.name)
            mlflow_module.log_params(flat_params(cfg))
        self.mlflow = mlflow_module

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.mlflow.log_metrics(numeric(metrics), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class TensorBoardTracker:
    def __init__(self, run_dir: str | Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(tensorboard_dir(run_dir)))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in numeric(metrics).items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, cfg: Config, run_dir: str | Path, wandb_run: Any = None):
        if wandb_run is None:
            import wandb

            wandb_run = wandb.init(project="lvm_ray", name=cfg.run.name, dir=str(run_dir),
                                   config=flat_params(cfg),
                                   mode=os.environ.get("WANDB_MODE", "offline"))
        self.run = wandb_run

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(numeric(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def flat_params(cfg: Config) -> dict[str, str]:
    """The config as `section.key` -> value strings (MLflow params, W&B config)."""
    out = {}
    for section, values in to_dict(cfg).items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": str(v) for k, v in values.items()})
        else:
            out[section] = str(values)
    return out


def check_available(kind: str) -> None:
    """A clear error before training starts when the tracking library is not installed."""
    module = {"mlflow": "mlflow", "tensorboard": "tensorboardX", "wandb": "wandb"}.get(kind)
    if module is None:
        return
    try:
        __import__(module)
    except ImportError:
        raise ValueError(f"run.tracking={kind} needs the {module} package: pip install "
                         f"'lvm_ray[tracking]'" + (" wandb" if kind == "wandb" else "")) from None


def make_tracker(cfg: Config, run_dir: str | Path) -> Tracker:
    """The tracker cfg.run.tracking names, for a process that logs directly (no Ray)."""
    kind = cfg.run.tracking
    check_available(kind)
    if kind == "mlflow":
        return MlflowTracker(cfg, run_dir)
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir)
    if kind == "wandb":
        return WandbTracker(cfg, run_dir)
    return NoTracker()
