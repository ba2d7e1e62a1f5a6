"""Ray Train adapter on the shared local Ray: DDP workers, checkpoints, fault tolerance."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from lvm_ray.config import load_config
from lvm_ray.data.synthetic import make_synthetic_bank
from lvm_ray.workflows.prepare import prepare_windows

pytestmark = pytest.mark.ray


def _cfg(tmp_path, name, **train):
    return load_config(presets=["smoke"], overrides={
        "run": {"storage_path": str(tmp_path), "name": name, "max_failures": 1},
        "train": {"max_epochs": 4, "patience": 10, **train},
    })


@pytest.fixture(scope="module")
def bank():
    return make_synthetic_bank(n_docs=60, doc_len=(60, 100), dim=32, seed=1)


@pytest.mark.parametrize("kind", ["memory_gru", "transformer"])
def test_two_worker_ddp_run_writes_artifacts(ray_session, tmp_path, bank, kind):
    from lvm_ray.distributed.trainer import train_with_ray
    from lvm_ray.train.checkpoint import read_meta

    cfg = load_config(presets=["smoke"], overrides={
        "run": {"storage_path": str(tmp_path), "name": "ddp"},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "train": {"max_epochs": 2},
        "model": {"kind": kind},
    })
    ws = prepare_windows(cfg, bank)
    run = train_with_ray(cfg, bank, ws.train, ws.val)
    meta = read_meta(run.best_checkpoint)
    assert meta["model_config"]["d_in"] == 32 and meta["model_config"]["kind"] == kind
    assert meta["data"]["dim"] == 32
    hist = json.loads((Path(run.run_dir) / "training_history.json").read_text())
    assert [h["epoch"] for h in hist] == [0, 1]
    # Equal shards: both ranks together cover an even number of windows (2 x per-rank count).
    assert hist[0]["train_windows"] % 2 == 0 and hist[0]["train_windows"] >= len(ws.train) - 1
    assert run.best_metrics["val_bank_hit@5"] == max(h["val_bank_hit@5"] for h in hist)


@pytest.mark.slow
def test_killed_worker_resumes_and_ends_like_an_uninterrupted_run(ray_session, tmp_path, bank):
    from lvm_ray.distributed.trainer import train_with_ray

    epochs = 6
    ref_cfg = _cfg(tmp_path, "reference", max_epochs=epochs)
    ws = prepare_windows(ref_cfg, bank)
    ref = train_with_ray(ref_cfg, bank, ws.train, ws.val)

    cfg = _cfg(tmp_path, "killed", max_epochs=epochs)
    run_dir = tmp_path / "killed"
    out: dict = {}

    def target():
        try:
            out["run"] = train_with_ray(cfg, bank, ws.train, ws.val, record_pids=True)
        except Exception as e:  # noqa: BLE001  surfaced by the assert below
            out["error"] = e

    th = threading.Thread(target=target)
    th.start()
    pid_file = run_dir / "worker_pids" / "rank0.pid"
    deadline = time.time() + 180
    killed = None
    while time.time() < deadline and th.is_alive():
        hist = run_dir / "training_history.json"
        if pid_file.exists() and hist.exists() and len(json.loads(hist.read_text())) >= 2:
            killed = int(pid_file.read_text())
            os.kill(killed, signal.SIGKILL)  # a worker process dies mid-run
            break
        time.sleep(0.05)
    th.join(timeout=300)
    assert killed is not None, "never saw the worker reach epoch 2"
    assert "error" not in out, out.get("error")
    new_pid = int(pid_file.read_text())
    assert new_pid != killed, "the worker group was restarted"
    got = json.loads((run_dir / "training_history.json").read_text())
    want = ref.history
    assert [h["epoch"] for h in got] == list(range(epochs))
    for a, b in zip(got, want):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_bank_hit@5"] == pytest.approx(b["val_bank_hit@5"])
    assert out["run"].best_metrics["val_bank_hit@5"] == pytest.approx(
        ref.best_metrics["val_bank_hit@5"])
