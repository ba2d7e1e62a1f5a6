"""int8 / bf16 inference copies: same interface, close predictions, incremental still exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lvm_ray.config import ModelConfig
from lvm_ray.model import build_model
from lvm_ray.model.quantize import PRECISIONS, BF16Model, quantize_model

D = 32
CFG = ModelConfig(kind="memory_gru", d_in=D, hidden=32, layers=2, slots=8)


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _model(cfg=CFG):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.head[-1].weight.normal_(0, 0.3)  # a real delta, so the quantized head matters
    return model


@pytest.mark.parametrize("precision", ["int8", "bf16"])
@pytest.mark.parametrize("kind,anchor", [("memory_gru", "last"), ("memory_gru", "decay"),
                                         ("gru", "decay")])
def test_quantized_copy_is_close_and_leaves_original_alone(precision, kind, anchor):
    model = _model(ModelConfig(**{**CFG.__dict__, "kind": kind, "anchor": anchor}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_model(model, precision)
    x = _unit(4, 30, D)
    lengths = torch.tensor([30, 7, 19, 1])
    with torch.no_grad():
        ref, _ = model(x, lengths=lengths)
        got, state = q(x, lengths=lengths)
    assert got.dtype == torch.float32 and state.h.dtype == torch.float32
    cos = F.cosine_similarity(got, ref, dim=-1)
    assert cos.min() > 0.98, cos
    assert not torch.equal(got, ref), "a quantized copy that changes nothing is not quantized"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], msg=f"{k} changed")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_incremental_equals_full_at_every_precision(precision):
    q = quantize_model(_model(), precision)
    x = _unit(2, 12, D, seed=1)
    with torch.no_grad():
        full, _ = q(x)
        st = None
        for t in range(12):
            pred, st = q.step(x[:, t], st)
    # int8 requantizes activations per call, so single steps and one long call may differ in
    # the last bits; bf16 rounds the state differently. Both stay close to the full call.
    atol = 1e-5 if precision == "fp32" else 2e-2
    torch.testing.assert_close(pred, full, atol=atol, rtol=0)


def test_int8_quantizes_linear_and_gru():
    q = quantize_model(_model(), "int8")
    dynamic = {type(m).__name__ for m in q.modules() if ".quantized.dynamic." in type(m).__module__}
    assert {"GRU", "Linear"} <= {name.replace("DynamicQuantized", "") for name in dynamic}, dynamic
    assert not any(type(m) is torch.nn.Linear for m in q.modules())
    assert isinstance(quantize_model(_model(), "bf16"), BF16Model)
    with pytest.raises(ValueError, match="precision"):
        quantize_model(_model(), "int4")


def test_quantized_predictor_from_checkpoint(tmp_path, synthetic_bank):
    from lvm_ray.predictor import quantized_predictor
    from lvm_ray.train.checkpoint import save_checkpoint

    cfg = ModelConfig(kind="memory_gru", d_in=synthetic_bank.dim, hidden=16, layers=1, slots=4)
    model = _model(cfg)
    path = save_checkpoint(tmp_path / "ck", model, cfg, epoch=0, metrics={},
                           data=synthetic_bank.identity(), config={})
    p = quantized_predictor(path, synthetic_bank, "int8")
    assert p.precision == "int8"
    ctx = synthetic_bank.vectors[:20]
    out = p.predict(ctx, k=3)
    assert len(out.neighbors) == 3 and out.vector.shape == (synthetic_bank.dim,)
    with torch.no_grad():
        ref, _ = model(torch.from_numpy(ctx)[None])
    assert float(F.cosine_similarity(torch.from_numpy(out.vector)[None], ref)) > 0.98
