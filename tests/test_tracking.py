"""Experiment tracking: every epoch's metrics reach MLflow (an offline file store) or TensorBoard
(event files under the run directory), read back here with the libraries' own readers, equal to
the run's training_history.json. Under Ray Train only rank 0 logs."""

import json
from pathlib import Path

import pytest

from lvm_ray.config import load_config
from lvm_ray.train.tracking import check_available, mlflow_uri, tensorboard_dir
from lvm_ray.workflows.train import train_and_evaluate

KEY = "val_bank_hit@5"
TRACKED = "val_bank_hit_at5"  # MLflow refuses '@' in names


def smoke(tmp_path: Path, tracking: str, name: str = "tracked", workers: int = 1):
    return load_config(presets=["smoke"], overrides={
        "bank_path": str(tmp_path / "bank.parquet"),
        "run": {"storage_path": str(tmp_path / "runs"), "name": name, "tracking": tracking},
        "train": {"max_epochs": 3, "patience": 5}, "eval": {"bootstrap": 20, "lanes": 0},
        "scaling": {"num_workers": workers, "cpus_per_worker": 0.5}})


def history(cfg) -> list[dict]:
    return json.loads((Path(cfg.run.storage_path) / cfg.run.name /
                       "training_history.json").read_text())


def mlflow_runs(cfg, run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri(cfg, run_dir))
    exp = client.get_experiment_by_name(cfg.run.name)
    return client, client.search_runs([exp.experiment_id])


def test_mlflow_file_store_holds_every_epoch(tmp_path):
    cfg = smoke(tmp_path, "mlflow")
    train_and_evaluate(cfg, use_ray=False)
    client, runs = mlflow_runs(cfg, tmp_path / "runs" / "tracked")
    (run,) = runs
    logged = client.get_metric_history(run.info.run_id, TRACKED)
    assert [(m.step, m.value) for m in logged] == [(h["epoch"], h[KEY]) for h in history(cfg)]
    assert run.data.params["model.hidden"] == "32" and run.data.params["run.name"] == "tracked"


def test_tensorboard_event_files_hold_every_epoch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = smoke(tmp_path, "tensorboard")
    train_and_evaluate(cfg, use_ray=False)
    acc = EventAccumulator(str(tensorboard_dir(tmp_path / "runs" / "tracked")))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars(TRACKED)]
    want = [(h["epoch"], pytest.approx(h[KEY], abs=1e-6)) for h in history(cfg)]
    assert got == want and "train_loss" in acc.Tags()["scalars"]


def test_a_missing_tracking_library_is_a_clear_error():
    with pytest.raises(ValueError, match="needs the wandb package"):
        check_available("wandb")  # not installed here; tensorboardX and mlflow are
    check_available("mlflow")
    check_available("tensorboard")


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_logs_from_rank_zero_only(ray_session, tmp_path):
    cfg = smoke(tmp_path, "mlflow", name="ddp", workers=2)
    train_and_evaluate(cfg, use_ray=True)
    client, runs = mlflow_runs(cfg, tmp_path / "runs" / "ddp")
    assert len(runs) == 1  # two workers, one run: rank 0's
    logged = client.get_metric_history(runs[0].info.run_id, TRACKED)
    assert [(m.step, m.value) for m in logged] == [(h["epoch"], h[KEY]) for h in history(cfg)]
