"""The dynamic-evaluation experiment (scripts/experiments/dynamic_eval.py, docs/results.md 10.12)
stays causal: a document's first chunk is predicted by the trained weights, weights reset at
every document, later chunks come from adapted weights, and the caller's model is untouched."""

import numpy as np
import torch

from lvm_ray.config import load_config
from lvm_ray.eval.predict import predict_windows
from lvm_ray.model import build_model
from lvm_ray.workflows.prepare import prepare_windows

def test_adaptation_is_causal_and_resets_per_document(synthetic_bank, experiment_script):
    bank, chunk = synthetic_bank, 8
    cfg = load_config(presets=["smoke"], overrides={
        "model": {"d_in": bank.dim}, "train": {"objective": "all_steps"},
        "loss": {"negatives": "bank", "bank_negatives": 64}})
    ws = prepare_windows(cfg, bank).val
    torch.manual_seed(0)
    model = build_model(cfg.model)
    before = [p.detach().clone() for p in model.parameters()]
    static = predict_windows(model, bank.vectors, ws)
    doc_of = bank.doc_ids[ws.target_rows]
    adapt = experiment_script("dynamic_eval").adapted_predictions

    np.testing.assert_allclose(adapt(model, cfg, bank.vectors, ws, doc_of, 0.0, chunk, 1), static,
                               atol=1e-6)  # no step, no change
    adapted = adapt(model, cfg, bank.vectors, ws, doc_of, 1e-2, chunk, 1)
    for p, q in zip(before, model.parameters()):
        assert torch.equal(p, q)
    starts = np.flatnonzero(np.r_[True, doc_of[1:] != doc_of[:-1]])
    assert len(starts) > 1
    first = np.zeros(len(ws), bool)
    for s in starts:
        first[s : s + chunk] = True
    np.testing.assert_allclose(adapted[first], static[first], atol=1e-6)
    assert np.abs(adapted[~first] - static[~first]).max() > 1e-3
