"""The multi-horizon probe (scripts/experiments/multi_horizon.py, docs/results.md 10.20): its
auxiliary rows are the vectors two steps ahead inside the window, and its patches of the
training step hold only inside the block."""

import numpy as np
import torch

from lvm_ray.config import load_config
from lvm_ray.train import loop, step
from lvm_ray.train.step import to_batch
from lvm_ray.workflows.prepare import prepare_windows


def test_aux_rows_are_two_steps_ahead_and_patches_are_undone(experiment_script, synthetic_bank,
                                                             tmp_path):
    mh = experiment_script("multi_horizon")
    cfg = load_config(presets=["smoke"], overrides={"train": {"max_epochs": 1, "objective": "all_steps"},
                                                  "loss": {"negatives": "bank",
                                                           "bank_negatives": 64}})
    ws = prepare_windows(cfg, synthetic_bank).train
    vectors = synthetic_bank.vectors
    idx = np.arange(4)
    b = to_batch(vectors, ws, idx, torch.device("cpu"), all_steps=True, step_targets=100)
    pool = loop.RowPool(vectors, ws.rows, "cpu")
    model = mh.TwoHorizonGRU(loop.with_bank_width(cfg, synthetic_bank).model).train()
    model(b.ctx, lengths=b.lengths, all_steps=True)
    pred, target, q, s = mh.aux_rows(model, b, pool)
    n = int((b.lengths - 1).clamp(min=0).sum())  # steps 0..length-2 of each window
    assert pred.shape == target.shape == (n, vectors.shape[1]) and len(q) == len(s) == n
    start, length = int(b.start[0]), int(b.lengths[0])
    # The first window's rows: positions start+2 .. start+length, its own last target included.
    assert q[: length - 1].tolist() == list(range(start + 2, start + length + 1))
    np.testing.assert_allclose(target[0].numpy(), vectors[ws.rows[start + 2]], atol=1e-6)
    assert model.aux_pred is None  # consumed

    before = (loop.build_model, step._rows_and_mask, step.lvm_loss)
    with mh.two_horizon_training(0.5):
        res = loop.fit_local(cfg, synthetic_bank, ws, prepare_windows(cfg, synthetic_bank).val,
                             tmp_path / "run")
    assert (loop.build_model, step._rows_and_mask, step.lvm_loss) == before
    aux = res["history"][0]["train_aux"]
    assert np.isfinite(aux) and aux > 0
