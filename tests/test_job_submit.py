"""The training smoke job submitted with `ray job submit` to a real head from `ray start --head`.

The head (harness/cluster.py) runs with --block in its own process, session, ports and
--temp-dir, and is stopped by its pid.
"""

from __future__ import annotations

import json
import uuid

import pytest
from harness.cluster import start_head, submit_job, train_actors, wait_for_job

pytestmark = pytest.mark.slow


def test_smoke_job_via_ray_job_submit(tmp_path):
    storage, name = tmp_path / "storage", f"submit_{uuid.uuid4().hex[:6]}"
    head, _, url = start_head(2)
    try:
        sid = submit_job(url, [
            "python", "jobs/train.py", "--smoke-test",
            "--set", f"run.storage_path={storage}", "--set", f"run.name={name}",
            "--set", f"bank_path={tmp_path / 'bank.parquet'}",
        ])
        status, logs = wait_for_job(url, sid, timeout_s=300)
        if status != "SUCCEEDED":
            print(f"---- head log ----\n{head.log_tail()}")
        assert status == "SUCCEEDED", f"job {sid} ended {status}"
        # Training ran on this cluster (the driver connected through RAY_ADDRESS, not a new Ray).
        assert train_actors(url), "no RayTrainWorker ran on the submitted-to cluster"
    finally:
        head.stop()

    run_dir = storage / name
    assert f"artifacts: {run_dir}" in logs
    for rel in ("best/checkpoint.json", "best/model.safetensors", "training_history.json",
                "training_curves.png", "report.md", "summary.json"):
        assert (run_dir / rel).is_file(), f"missing {rel} in {run_dir}"
    history = json.loads((run_dir / "training_history.json").read_text())
    assert history and all("epoch" in row for row in history)
    assert "bank-Hit@5" in (run_dir / "report.md").read_text()
    assert head.proc.returncode is not None
