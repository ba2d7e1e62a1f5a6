"""The fused append step (lvm_ray.model.fused_step) gives the eager model's answers: fp32 within
1e-5, int8 within a stated tolerance; the Predictor's append path uses it and still equals a
full-context prediction; long appends and unsupported models keep the eager path."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lvm_ray.config import ModelConfig
from lvm_ray.data.synthetic import make_synthetic_bank
from lvm_ray.model import build_model
from lvm_ray.model.fused_step import FusedStep
from lvm_ray.model.quantize import quantize_model
from lvm_ray.predictor import FUSED_MAX_T, Predictor
from lvm_ray.train.checkpoint import LoadedCheckpoint

# int8: the step's weights are quantized per tensor and its activations per call; over a few
# steps of these small random models a prediction stays within this cosine of the eager one.
INT8_MIN_COS = 0.999

VARIANTS = [
    ModelConfig(kind="memory_gru", d_in=32, hidden=24, layers=1, slots=8, anchor="decay"),
    ModelConfig(kind="memory_gru", d_in=32, hidden=24, layers=2, slots=4, anchor="last"),
    ModelConfig(kind="memory_gru", d_in=32, hidden=16, layers=1, slots=0, delta=False),
    ModelConfig(kind="gru", d_in=32, hidden=24, layers=2, slots=0, anchor="decay"),
]


def model_of(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    m = build_model(cfg).eval()
    with torch.no_grad():  # move off the init (the delta head starts near zero)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: f"{c.kind}-{c.anchor}-L{c.layers}-S{c.slots}")
def test_fp32_step_equals_the_eager_model(cfg):
    m = model_of(cfg)
    ctx = unit(4, 7, cfg.d_in, seed=1)
    _, st = m(ctx[:, :4])
    with torch.no_grad():
        want, new = m(ctx[:, 4:], st)
    step = FusedStep.build(m, "fp32")
    pred, h, a = step.run(ctx[:, 4:], [3] * 4, st.h, st.last)  # B=4: traced at B=2
    torch.testing.assert_close(pred, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, new.h, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, new.last, atol=1e-5, rtol=0)


def test_uneven_appends_in_one_batch_keep_each_rows_state():
    cfg = VARIANTS[0]
    m = model_of(cfg)
    ctx = unit(3, 6, cfg.d_in, seed=2)
    _, st = m(ctx[:, :3])
    lengths = [1, 3, 2]
    with torch.no_grad():
        want, new = m(ctx[:, 3:], st, torch.tensor(lengths))
    pred, h, a = FusedStep.build(m, "fp32").run(ctx[:, 3:], lengths, st.h, st.last)
    torch.testing.assert_close(pred, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, new.h, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", VARIANTS[:2], ids=["decay", "last-2layers"])
def test_int8_step_stays_close_to_the_eager_model(cfg):
    m = model_of(cfg)
    ctx = unit(8, 5, cfg.d_in, seed=3)
    _, st = m(ctx[:, :4])
    with torch.no_grad():
        want, _ = m(ctx[:, 4:], st)
    pred, _, _ = FusedStep.build(m, "int8").run(ctx[:, 4:], [1] * 8, st.h, st.last)
    cos = F.cosine_similarity(pred, want, dim=-1)
    assert float(cos.min()) >= INT8_MIN_COS, cos
    assert not torch.allclose(pred, want, atol=1e-6), "int8 should not be bit-equal to fp32"


def test_quantized_or_unknown_models_are_not_fused():
    m = model_of(VARIANTS[0])
    assert FusedStep.supports(m)
    assert not FusedStep.supports(quantize_model(m, "int8"))  # no plain nn.GRU weights
    with pytest.raises(ValueError, match="fp32 or int8"):
        FusedStep.build(m, "bf16")


@pytest.fixture(scope="module")
def predictor():
    cfg = ModelConfig(d_in=32, hidden=24, layers=2, slots=4)
    bank = make_synthetic_bank(n_docs=10, doc_len=(30, 40), dim=32, seed=0)
    m = model_of(cfg, seed=5)
    from pathlib import Path

    ck = LoadedCheckpoint(model=m, model_config=cfg, meta={"config": {"window": {"context": 64}}},
                          path=Path("/nonexistent"))
    return Predictor(ck, bank, device="cpu"), bank


def test_predictor_appends_through_the_step_and_match_full_context(predictor):
    predictor, bank = predictor
    ctx = bank.vectors[:20]
    assert predictor.set_append_step("fp32") == "fused-fp32"
    _, st = predictor.append(ctx[:12])  # 12 > FUSED_MAX_T: the eager sequence path
    assert 12 > FUSED_MAX_T
    for i in range(12, 20, 2):  # then short appends through the fused step
        before = st
        pred, st = predictor.append(ctx[i : i + 2], st)
        full = predictor.predict(ctx[: i + 2])
        np.testing.assert_allclose(pred.vector, full.vector, atol=1e-4)
        assert [n.concept_id for n in pred.neighbors] == [n.concept_id for n in full.neighbors]
    assert predictor.set_append_step(None) == "eager" and predictor.step is None
    assert predictor.set_append_step("int8") == "fused-int8"
    pred, _ = predictor.append(ctx[18:20], before)
    assert float(pred.vector @ predictor.predict(ctx).vector) >= INT8_MIN_COS
    predictor.set_append_step(None)
