"""Jobs submitted with `ray job submit` to a real head from `ray start --head`: the training smoke
job, and a job whose driver is killed mid-run, which continues from its latest checkpoint when
re-submitted under the same run name and ends exactly where the uninterrupted (smoke) run ends
(1 worker: bit-reproducible); a resume from a checkpoint cut short and a malformed config both
fail with one error line.

One head serves the module (starting one costs ~15 s on 2 cores). It runs with --block in its own
process, session, ports and --temp-dir (harness/cluster.py), and is stopped by its pid.
bench/reliability.py runs the fault scenarios at a larger size for RELIABILITY.md.
"""

from __future__ import annotations

import json
import uuid

import pytest
from harness.cluster import start_head, train_actors
from harness.train_faults import (TrainSpec, compare, corrupt_and_resume, job_result,
                                  kill_driver_and_resubmit, submit, train_run)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    node, _, url = start_head(2)
    try:
        yield node, url
    finally:
        node.stop()
    assert node.proc.returncode is not None, "the head outlived its stop"


@pytest.fixture(scope="module")
def smoke(head, tmp_path_factory):
    """The smoke job (no early stopping, 5 epochs), submitted once: the reference run too."""
    tmp = tmp_path_factory.mktemp("jobs")
    spec = TrainSpec(tmp / "runs", tmp / "bank.parquet", epochs=5, docs=48)
    return spec, train_run(head[1], spec, "smoke")


def test_smoke_job_via_ray_job_submit(head, smoke):
    (node, url), (spec, ref) = head, smoke
    if ref["status"] != "SUCCEEDED":
        print(f"---- head log ----\n{node.log_tail()}")
    assert ref["status"] == "SUCCEEDED" and not ref["resumed_from"]
    # Training ran on this cluster (the driver connected through RAY_ADDRESS, not a new Ray).
    assert train_actors(url), "no RayTrainWorker ran on the submitted-to cluster"

    run_dir = spec.storage / "smoke"
    assert f"artifacts: {run_dir}" in ref["logs"]
    for rel in ("best/checkpoint.json", "best/model.safetensors", "training_history.json",
                "training_curves.png", "report.md", "summary.json"):
        assert (run_dir / rel).is_file(), f"missing {rel} in {run_dir}"
    history = json.loads((run_dir / "training_history.json").read_text())
    assert len(history) == 5 and all("epoch" in row for row in history)
    assert "bank-Hit@5" in (run_dir / "report.md").read_text()


def test_killed_driver_resubmitted_job_resumes_and_matches_an_uninterrupted_run(head, smoke):
    (_, url), (spec, ref) = head, smoke
    assert ref["status"] == "SUCCEEDED"
    out = kill_driver_and_resubmit(url, spec, "killed", after_epochs=2)
    # The resumed run refuses a checkpoint cut short (the smoke run's, corrupted now).
    bad = corrupt_and_resume(url, spec, "smoke")
    sid = submit(url, spec.cmd(f"bad_{uuid.uuid4().hex[:4]}", "--set", "window.stride=0"))
    bad_job = job_result(url, sid, spec.storage / "bad", timeout_s=300)

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
