"""Predictor: checkpoint + bank -> prediction and nearest concepts; incremental == full."""

import numpy as np
import pytest
import torch

from lvm_ray.config import ModelConfig
from lvm_ray.data.bank import save_bank
from lvm_ray.model import build_model
from lvm_ray.predictor import Predictor, PredictorInputError
from lvm_ray.train.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def predictor(tmp_path_factory, synthetic_bank):
    d = tmp_path_factory.mktemp("pred")
    cfg = ModelConfig(d_in=32, hidden=32, layers=2, slots=8)
    torch.manual_seed(0)
    save_checkpoint(d / "ck", build_model(cfg), cfg, epoch=0, metrics={},
                    config={"window": {"context": 20}})
    save_bank(synthetic_bank, d / "bank.parquet")
    return Predictor.from_paths(d / "ck", d / "bank.parquet", device="cpu")


def test_predict_returns_unit_vector_and_exact_neighbours(predictor, synthetic_bank):
    ctx = synthetic_bank.vectors[:10]
    p = predictor.predict(ctx, k=5)
    assert p.vector.shape == (32,) and abs(np.linalg.norm(p.vector) - 1) < 1e-5
    scores = synthetic_bank.vectors @ p.vector
    top = np.argsort(-scores)[:5]
    assert [n.concept_id for n in p.neighbors] == top.tolist()
    assert p.neighbors[0].text == synthetic_bank.texts[top[0]]


def test_long_context_reads_only_the_last_max_context(predictor, synthetic_bank):
    ctx = synthetic_bank.vectors[:50]
    a = predictor.predict(ctx)
    b = predictor.predict(ctx[-20:])
    assert a.context_used == 20
    np.testing.assert_allclose(a.vector, b.vector, atol=1e-6)


def test_incremental_append_equals_full_context(predictor, synthetic_bank):
    ctx = synthetic_bank.vectors[:15]
    full = predictor.predict(ctx)
    state = None
    for i in range(0, 15, 4):
        p, state = predictor.append(ctx[i:i + 4], state)
    np.testing.assert_allclose(p.vector, full.vector, atol=1e-5)


def test_batch_of_mixed_lengths_equals_singles(predictor, synthetic_bank):
    ctxs = [synthetic_bank.vectors[:3], synthetic_bank.vectors[5:17], synthetic_bank.vectors[30:31]]
    batch = predictor.predict_batch(ctxs)
    for c, b in zip(ctxs, batch):
        np.testing.assert_allclose(predictor.predict(c).vector, b.vector, atol=1e-5)


@pytest.mark.parametrize("bad,msg", [
    (np.zeros((3, 31), np.float32), "shaped"),
    (np.zeros((0, 32), np.float32), "empty"),
    (np.full((2, 32), np.nan, np.float32), "NaN"),
    (np.full((2, 32), np.inf, np.float32), "NaN or Inf"),
    ([["a"] * 32], "numbers"),
    (np.zeros(32, np.float32), "shaped"),
    (np.vstack([np.ones((2, 32)), np.zeros((1, 32))]).astype(np.float32),
     "row 2 has a norm that is zero"),
    (np.full((2, 32), 3e38, np.float32), "row 0 has a norm that is not finite"),
])
def test_bad_inputs_raise_clear_errors(predictor, bad, msg):
    with pytest.raises(PredictorInputError, match=msg):
        predictor.predict(bad)


def test_concept_ids(predictor, synthetic_bank):
    np.testing.assert_array_equal(predictor.vectors_for_ids([0, 3]), synthetic_bank.vectors[[0, 3]])
    with pytest.raises(PredictorInputError, match="unknown concept id"):
        predictor.vectors_for_ids([0, 10**9])
