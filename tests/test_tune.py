"""The Ray Tune sweep: config, search space, comparable objective, a tiny sweep whose best trial
is known by construction, the results table against what trials reported, and resume."""

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lvm_ray.config import ConfigError, TuneConfig, WindowConfig, from_dict, load_config, merge
from lvm_ray.data.windows import make_windows
from lvm_ray.distributed import tune as sweep_mod
from lvm_ray.eval.sweep import (alpha_bucket, check_comparable, check_grid, n_trials,
                                objective_metric, trial_config)
from lvm_ray.workflows.sweep import run_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRIC = "val_bank_hit@5"


def parse_sweep(data: dict) -> TuneConfig:
    return from_dict(TuneConfig, data, "tune")


def with_sweep(cfg, sweep: TuneConfig):
    return merge(cfg, {"tune": sweep.__dict__})


def base_config(tmp_path, **train):
    """Tiny synthetic model with the design's loss (alpha is what the sweeps vary); min_context 1
    so a context of 1 is allowed."""
    return load_config(None, ["smoke", "seed_loss"], {
        "window": {"context": 8, "min_context": 1, "stride": 1},
        "train": {"max_epochs": 3, "patience": 3, "max_train_windows": 1024, **train},
        "eval": {"bootstrap": 50},
        "run": {"storage_path": str(tmp_path)},
    })


# ----------------------------------------------------------------------------- no Ray


def test_load_sweep_reads_tune_section_and_overrides(tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_text("train:\n  lr: 0.002\ntune:\n  contexts: [4, 8]\n  search: grid\n"
                 "  alphas: [0.01, 0.1]\n")
    cfg = load_config(f, ["smoke"], {"tune": {"num_samples": 2}, "loss": {"alpha": 0.5}})
    sweep = cfg.tune
    assert cfg.train.lr == 0.002 and cfg.loss.alpha == 0.5 and cfg.model.hidden == 32
    assert sweep.contexts == (4, 8) and sweep.alphas == (0.01, 0.1) and sweep.num_samples == 2
    assert n_trials(sweep) == 2 * 2 * 2
    assert objective_metric(cfg) == "val_bank_hit@5"
    f.write_text("tune:\n  context: [4]\n")
    with pytest.raises(ConfigError, match="tune.context"):
        load_config(f)
    with pytest.raises(ConfigError, match="alpha_range"):
        parse_sweep({"alpha_range": [0.3, 0.003]})


def test_defaults_are_the_issue_space_and_smoke_is_tiny():
    sweep = load_config().tune
    assert sweep.contexts == (100, 250, 500, 1000) and sweep.alpha_range == (0.03, 3.0)
    assert sweep.search == "random" and sweep.scheduler == "asha"
    cfg = load_config(None, ["smoke"])
    smoke = cfg.tune
    assert cfg.corpus.source == "synthetic" and n_trials(smoke) <= 4


def test_objective_never_uses_a_trial_dependent_pool():
    cfg = load_config(None, [], {"eval": {"select_metric": "pool_hit@5", "pool_size": 50}})
    assert objective_metric(cfg) == "val_pool50_hit@5"  # the fixed pool, never pool_hit@5 of M
    with pytest.raises(ValueError, match="fixed pool"):
        objective_metric(load_config(None, [], {"eval": {"select_metric": "pool_hit@5",
                                                         "pool_size": None}}))


def test_val_targets_are_the_same_for_every_context(synthetic_bank, tmp_path):
    cfg = base_config(tmp_path)
    sweep = parse_sweep({"contexts": [1, 8, 64]})
    check_comparable(synthetic_bank, with_sweep(cfg, sweep))
    targets = [make_windows(synthetic_bank, "val", WindowConfig(context=c, min_context=1))
               .target_rows for c in (1, 64)]
    assert np.array_equal(*targets)
    with pytest.raises(ConfigError, match="min_context"):
        check_comparable(synthetic_bank, with_sweep(load_config(None, ["smoke"]), sweep))  # L>=2


def test_alpha_buckets_are_log_spaced():
    s = parse_sweep({"alpha_range": [0.001, 1.0], "alpha_buckets": 3})
    assert alpha_bucket(0.002, s) == alpha_bucket(0.009, s) != alpha_bucket(0.011, s)
    assert alpha_bucket(1.0, s) == alpha_bucket(0.5, s)
    assert alpha_bucket(0.03, parse_sweep({"search": "grid"})) == "alpha=0.03"


# ----------------------------------------------------------------------------- with Ray


def reported(trial_dir):
    """What a trial reported to Tune, read back from its own result.json."""
    lines = (Path(trial_dir) / "result.json").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def starts(sweep_dir, trial_id):
    f = Path(sweep_dir) / sweep_mod.STARTS / f"{trial_id}.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if json.loads(x)["event"] == "start"]


def test_grid_axes_set_any_field_and_are_checked_before_a_trial_starts(tmp_path):
    sweep = parse_sweep({"contexts": [4, 8], "search": "grid", "alphas": [0.1, 1.0],
                         "grid": {"model.dropout": [0.0, 0.2], "train.weight_decay": [0.01]}})
    assert sweep.grid == {"model.dropout": (0.0, 0.2), "train.weight_decay": (0.01,)}
    assert n_trials(sweep) == 2 * 2 * 2 * 1 * sweep.num_samples
    cfg = with_sweep(base_config(tmp_path), sweep)
    check_grid(cfg)
    tcfg = trial_config(cfg, {"context": 4, "alpha": 1.0, "model.dropout": 0.2,
                              "train.weight_decay": 0.01})
    assert (tcfg.window.context, tcfg.loss.alpha) == (4, 1.0)
    assert (tcfg.model.dropout, tcfg.train.weight_decay) == (0.2, 0.01)
    assert cfg.model.dropout != 0.2 or cfg.train.weight_decay != 0.01  # the base is untouched
    for bad, match in (({"dropout": [0.1]}, "dotted"), ({"window.context": [4]}, "dotted"),
                       ({"model.dropout": []}, "non-empty")):
        with pytest.raises(ConfigError, match=match):
            parse_sweep({"grid": bad})
    for bad, match in (({"model.dropout": [0.0, 1.5]}, r"tune.grid.model.dropout = 1.5"),
                       ({"model.no_such_field": [1]}, "no_such_field"),
                       ({"train.lr": ["fast"]}, "train.lr")):
        with pytest.raises(ConfigError, match=match):
            check_grid(with_sweep(base_config(tmp_path), parse_sweep({"grid": bad})))


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_over_a_grid_axis_trains_each_value_and_keeps_the_better(ray_session,
                                                                      synthetic_bank, tmp_path):
    # A learning rate of 1e-7 leaves the model where it started: lr must win by a wide margin.
    sweep = parse_sweep({"name": "grid", "search": "grid", "contexts": [8], "alphas": [0.03],
                         "num_samples": 1, "grace_period": 3, "max_concurrent_trials": 2,
                         "grid": {"train.lr": [1.0e-7, 3.0e-3]}})
    res = run_sweep(with_sweep(base_config(tmp_path), sweep), bank=synthetic_bank)
    assert res.status == "finished" and len(res.rows) == 2
    by_lr = {r["train.lr"]: r for r in res.rows}
    assert set(by_lr) == {1.0e-7, 3.0e-3} and res.best["train.lr"] == 3.0e-3
    assert by_lr[3.0e-3][METRIC] > by_lr[1.0e-7][METRIC] + 0.1
    for lr, row in by_lr.items():  # each trial trained with its own value, and says so
        meta = json.loads((Path(row["checkpoint"]) / "checkpoint.json").read_text())
        assert meta["config"]["train"]["lr"] == lr
    d = Path(res.sweep_dir)
    assert json.loads((d / "best.json").read_text())["config"]["train"]["lr"] == 3.0e-3
    assert "| lr=0.003 |" in (d / "results.md").read_text()
    assert "lr=0.003" in (d / "test_report.md").read_text()


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_picks_the_context_that_is_needed(ray_session, synthetic_bank, tmp_path):
    # The synthetic documents need 2+ lags: a 1-vector context cannot tell which way a document
    # moves, so context 8 must win by a wide margin.
    cfg = merge(base_config(tmp_path), {"run": {"tracking": "mlflow"}})
    sweep = parse_sweep({"name": "pick", "search": "grid", "contexts": [1, 8], "alphas": [0.03],
                         "num_samples": 1, "grace_period": 3, "max_concurrent_trials": 2})
    res = run_sweep(with_sweep(cfg, sweep), bank=synthetic_bank)
    assert res.status == "finished" and len(res.rows) == 2
    assert res.best["context"] == 8
    by_ctx = {r["context"]: r for r in res.rows}
    assert by_ctx[8][METRIC] > by_ctx[1][METRIC] + 0.2
    assert by_ctx[8][METRIC] > res.baselines["copy-last"]["bank_hit@5"] + 0.1

    d = Path(res.sweep_dir)
    with open(d / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2
    for row in table:
        rep = reported(row["trial_dir"])
        best = max(rep, key=lambda r: r[METRIC])
        assert float(row[METRIC]) == pytest.approx(best[METRIC], abs=1e-12)
        assert float(row["val_ca"]) == pytest.approx(best["val_ca"], abs=1e-12)
        assert float(row["val_margin"]) == pytest.approx(best["val_margin"], abs=1e-12)
        assert int(row["epochs_run"]) == len(rep) == rep[-1]["epochs_run"] == 3
        assert int(row["best_epoch"]) == best["epoch"]
        assert int(row["starts"]) == 1 and row["ended"] == "max_epochs"
        # The checkpoint Tune kept is the best epoch's, and it says so itself.
        meta = json.loads((Path(row["checkpoint"]) / "checkpoint.json").read_text())
        assert meta["metrics"][METRIC] == pytest.approx(float(row[METRIC]), abs=1e-12)
        assert meta["config"]["window"]["context"] == int(row["context"])
    md = (d / "results.md").read_text()
    assert "copy-last" in md and f"{100 * by_ctx[8][METRIC]:.2f}" in md
    best_json = json.loads((d / "best.json").read_text())
    assert best_json["context"] == 8 and best_json["config"]["window"]["context"] == 8
    assert best_json["checkpoint"] == by_ctx[8]["checkpoint"]
    assert "bank_hit@5_lo" in best_json["test"]
    assert (d / "val_hit_vs_context.png").read_bytes()[:8] == PNG_MAGIC
    report = (d / "test_report.md").read_text()
    assert "split: test" in report and "copy-last" in report and "95%" in report
    # Tune's MLflow logger callback: one run per trial, every reported epoch, read back.
    from mlflow.tracking import MlflowClient

    from lvm_ray.train.tracking import mlflow_uri

    client = MlflowClient(mlflow_uri(cfg, res.sweep_dir))
    runs = client.search_runs([client.get_experiment_by_name("pick").experiment_id])
    assert len(runs) == 2
    for run in runs:
        hist = client.get_metric_history(run.info.run_id, "val_bank_hit_at5")
        assert len(hist) == 3 and all(0 <= m.value <= 1 for m in hist)


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_sweep_resumes_without_redoing_finished_trials(
        ray_session, synthetic_bank, tmp_path):
    cfg = base_config(tmp_path, max_epochs=10, patience=10)
    sweep = parse_sweep({"name": "resume", "search": "grid", "contexts": [2, 4, 8],
                         "alphas": [0.03], "num_samples": 1, "scheduler": "fifo",
                         "max_concurrent_trials": 1, "evaluate_test": False})
    cfg = with_sweep(cfg, sweep)
    sweep_dir = Path(sweep_mod.sweep_dir_of(cfg))
    log_dir = sweep_dir / sweep_mod.STARTS

    def interrupt_mid_second_trial():
        # Ctrl+C equivalent (Tune's handler also takes SIGUSR1) once one trial has ended and
        # the driver has recorded two epochs (the first one checkpointed) of the next.
        deadline = time.time() + 120
        while time.time() < deadline:
            logs = list(log_dir.glob("*.jsonl")) if log_dir.exists() else []
            ended = [f for f in logs if '"end"' in f.read_text()]
            running = [f for f in logs if f not in ended]
            if len(ended) == 1 and running:
                results = list(sweep_dir.glob(f"{running[0].stem}_*/result.json"))
                if results and len(results[0].read_text().splitlines()) >= 2:
                    os.kill(os.getpid(), signal.SIGUSR1)
                    return
            time.sleep(0.05)

    t = threading.Thread(target=interrupt_mid_second_trial, daemon=True)
    t.start()
    first = run_sweep(cfg, bank=synthetic_bank)
    t.join(timeout=5)
    assert first.status == "interrupted"
    done_before = {f.stem for f in log_dir.glob("*.jsonl") if '"end"' in f.read_text()}
    assert len(done_before) == 1
    (finished_id,) = done_before
    finished_dir = next(sweep_dir.glob(f"{finished_id}_*"))
    finished_results = (finished_dir / "result.json").read_text()

    with pytest.raises(ValueError, match="--resume"):
        run_sweep(cfg, bank=synthetic_bank)  # an existing sweep is never silently reused
    with pytest.raises(ConfigError, match="different config"):
        run_sweep(with_sweep(base_config(tmp_path, max_epochs=9), sweep), resume=True,
                  bank=synthetic_bank)

    res = run_sweep(cfg, resume=True, bank=synthetic_bank)
    assert res.status == "finished" and len(res.rows) == 3
    rows = {r["trial_id"]: r for r in res.rows}
    # The finished trial did not run again; the interrupted one continued from its checkpoint.
    assert len(starts(sweep_dir, finished_id)) == 1 and rows[finished_id]["starts"] == 1
    assert (finished_dir / "result.json").read_text() == finished_results
    resumed = [tid for tid in rows if len(starts(sweep_dir, tid)) == 2]
    assert len(resumed) == 1 and starts(sweep_dir, resumed[0])[1]["resumed"] is True
    for r in res.rows:
        assert r["epochs_run"] == 10 and r["ended"] == "max_epochs"
        assert sorted(x["epoch"] for x in reported(r["trial_dir"]))[-1] == 9
    assert (sweep_dir / "results.csv").is_file() and (sweep_dir / "best.json").is_file()


@pytest.mark.ray
@pytest.mark.slow
def test_trial_with_two_ddp_workers_runs_the_ray_train_adapter(
        ray_session, synthetic_bank, tmp_path):
    cfg = base_config(tmp_path, max_epochs=2, patience=2)
    sweep = parse_sweep({"name": "ddp", "search": "grid", "contexts": [8], "alphas": [0.03],
                         "num_samples": 1, "workers_per_trial": 2, "cpus_per_worker": 0.5,
                         "scheduler": "fifo", "max_concurrent_trials": 1})
    res = run_sweep(with_sweep(cfg, sweep), bank=synthetic_bank)
    assert res.status == "finished"
    (row,) = res.rows
    assert row["epochs_run"] == 2 and row["ended"] == "max_epochs"
    assert row["checkpoint"] and (Path(row["checkpoint"]) / "checkpoint.json").is_file()
    # Ray Train wrote its checkpoints under the sweep, one run per trial.
    assert Path(row["checkpoint"]).is_relative_to(Path(res.sweep_dir) / "train")
    assert (Path(res.sweep_dir) / "test_report.md").is_file()
