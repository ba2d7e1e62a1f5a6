"""Training faults: a checkpoint write killed halfway is never taken for a checkpoint, a run never
resumes silently from an invalid one.

A job whose driver is killed mid-run and is re-submitted is tests/test_job_submit.py (it shares
that module's Ray head); a worker killed mid-run is tests/test_ray_train.py. bench/reliability.py
runs all of them at a larger size (and with 2 workers, where it measures the run-to-run noise) for
RELIABILITY.md. These tests call the same functions with small numbers.
"""

import json
from pathlib import Path

import pytest
import torch

from harness.train_faults import interrupted_checkpoint_writes
from lvm_ray.config import ModelConfig
from lvm_ray.distributed.trainer import resume_checkpoint
from lvm_ray.model import build_model
from lvm_ray.train.checkpoint import CheckpointError, save_checkpoint

CFG = ModelConfig(d_in=16, hidden=16, layers=1, slots=2)


def test_a_checkpoint_write_killed_halfway_is_never_valid(tmp_path):
    rows = interrupted_checkpoint_writes(tmp_path)
    assert len(rows) == 4
    for r in rows:
        assert r["exit"] == -9, r  # the writer really died mid-write
        assert r["ok"], r
        # A new checkpoint is absent; one written over an old one leaves the old one intact.
        assert r["valid"] == r["target_exists"] == ("existing" in r["target"]), r


def _run_dir(tmp_path, latest: str | None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    save_checkpoint(run / "epoch_002", build_model(CFG), CFG, epoch=2, metrics={},
                    train_state={"epoch": 2})
    snap = {"latest_checkpoint_result": None if latest is None else
            {"checkpoint_dir_name": latest, "metrics": {}}}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snap))
    return run


def test_resume_checkpoint_is_verified_before_ray_train_uses_it(tmp_path):
    assert resume_checkpoint(tmp_path / "new_run") is None  # nothing to resume
    run = _run_dir(tmp_path, "epoch_002")
    assert resume_checkpoint(run) == run / "epoch_002"
    w = run / "epoch_002" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:200])  # a write cut short
    with pytest.raises(CheckpointError, match="would resume from epoch_002.*checksum"):
        resume_checkpoint(run)
    (run / "checkpoint_manager_snapshot.json").write_text('{"latest_checkpoint_result": {"ch')
    with pytest.raises(CheckpointError, match="corrupted"):
        resume_checkpoint(run)


def test_resume_checkpoint_refuses_a_registered_checkpoint_that_is_missing(tmp_path):
    run = _run_dir(tmp_path, "epoch_005")  # registered, but never fully written
    with pytest.raises(CheckpointError, match="epoch_005.*not a checkpoint"):
        resume_checkpoint(run)
