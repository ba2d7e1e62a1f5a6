"""Training faults: a checkpoint write killed halfway is never taken for a checkpoint, a run never
resumes silently from an invalid one, and a job whose driver is killed mid-run continues from
its latest checkpoint when re-submitted under the same run name, ending exactly where an
uninterrupted run ends (1 worker: bit-reproducible).

The worker-killed-mid-run case is tests/test_ray_train.py; bench/reliability.py runs all of
them at a larger size (and with 2 workers, where it measures the run-to-run noise) for
RELIABILITY.md. These tests call the same functions with small numbers.
"""

import json
import uuid
from pathlib import Path

import pytest
import torch

from harness.train_faults import (TrainSpec, compare, corrupt_and_resume,
                                  interrupted_checkpoint_writes, job_result,
                                  kill_driver_and_resubmit, submit, train_run)
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


@pytest.mark.slow
def test_killed_driver_resubmitted_job_resumes_and_matches_an_uninterrupted_run(tmp_path):
    from harness.cluster import start_head

    spec = TrainSpec(tmp_path / "runs", tmp_path / "bank.parquet", epochs=5, docs=48)
    head, _, url = start_head(2)
    try:
        ref = train_run(url, spec, "reference")
        assert ref["status"] == "SUCCEEDED" and not ref["resumed_from"]
        out = kill_driver_and_resubmit(url, spec, "killed", after_epochs=2)
        # The resumed run refuses a checkpoint cut short (the reference run's, corrupted now).
        bad = corrupt_and_resume(url, spec, "reference")
        sid = submit(url, spec.cmd(f"bad_{uuid.uuid4().hex[:4]}", "--set", "window.stride=0"))
        bad_job = job_result(url, sid, spec.storage / "bad", timeout_s=300)
    finally:
        head.stop()

    assert out["first_status"] == "FAILED"  # the job whose driver died
    assert out["checkpoint_at_kill"], "no checkpoint was registered before the kill"
    assert out["status"] == "SUCCEEDED"
    assert out["resumed_from"], "the re-submitted job started over instead of resuming"
    # ... from the latest checkpoint the killed run's controller had registered.
    assert int(out["resumed_from"][0]) == int(out["registered_before_resubmit"].split("_")[1])
    c = compare(out["history"], ref["history"])
    assert c["epochs"] == (5, 5) and c["identical"], c  # 1 worker: bit-reproducible
    assert out["best"] == ref["best"]
    assert (spec.storage / "killed" / "best" / "checkpoint.json").is_file()

    assert bad["status"] == "FAILED" and not bad["changed"], bad
    assert "not a valid checkpoint" in bad["message"] and bad["checkpoint"] in bad["message"]
    assert bad["local_check"] != "accepted"

    assert bad_job["status"] == "FAILED"
    assert "lvm train: error: window.context, window.min_context and window.stride must be" \
        in bad_job["logs"]
