"""TransformerLVM: causal (later vectors never matter), KV-cache continuation == full context,
padding, the shared head options, checkpoints, and the Predictor's recompute sessions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lvm_ray.config import ConfigError, ModelConfig
from lvm_ray.data.bank import save_bank
from lvm_ray.model import TransformerLVM, TransformerState, build_model
from lvm_ray.predictor import Predictor
from lvm_ray.serve.sessions import SessionStale, SessionState, check_compatible
from lvm_ray.train.checkpoint import load_checkpoint, save_checkpoint

D = 16
VARIANTS = [
    ModelConfig(kind="transformer", d_in=D, hidden=24, layers=2, heads=3, anchor="decay"),
    ModelConfig(kind="transformer", d_in=D, hidden=16, layers=1, heads=2, anchor="last"),
    ModelConfig(kind="transformer", d_in=D, hidden=16, layers=2, heads=4, delta=False),
]
IDS = [f"L{c.layers}-H{c.hidden}-h{c.heads}-{'delta' if c.delta else 'direct'}-{c.anchor}"
       for c in VARIANTS]


def _model(cfg: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # wake up the small-init delta head so predictions are not ~x_last
        model.head[-1].weight.normal_(0, 0.3)
        if model.beta_logit is not None:
            model.beta_logit.fill_(0.7)
    return model


def _unit(*shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


@pytest.mark.parametrize("cfg", VARIANTS, ids=IDS)
def test_prediction_is_independent_of_later_vectors(cfg):
    model = _model(cfg)
    x = _unit(2, 20, D)
    y = x.clone()
    y[:, 8:] = _unit(2, 12, D, seed=5)  # everything after step 7 changes
    with torch.no_grad():
        px, _ = model(x, all_steps=True)
        py, _ = model(y, all_steps=True)
        prefix, _ = model(x[:, :8])
    torch.testing.assert_close(px[:, :8], py[:, :8], atol=1e-6, rtol=0)
    torch.testing.assert_close(px[:, 7], prefix, atol=1e-5, rtol=0)
    assert (px[:, 8:] - py[:, 8:]).abs().max() > 1e-3, "later steps must see their own inputs"


@pytest.mark.parametrize("cfg", VARIANTS, ids=IDS)
def test_cached_prediction_equals_full_context(cfg):
    model = _model(cfg)
    x = _unit(3, 40, D)
    with torch.no_grad():
        full, full_state = model(x)
        st = None
        for t in range(40):  # one vector at a time
            step_pred, st = model.step(x[:, t], st)
        _, cst = model(x[:, :13])  # uneven chunks
        _, cst = model(x[:, 13:29], cst)
        chunk_pred, cst = model(x[:, 29:], cst)
        steps, _ = model(x[:, 13:], model(x[:, :13])[1], all_steps=True)
    assert not torch.allclose(full, x[:, -1], atol=1e-3), "prediction must not be a plain copy"
    for got, state in ((step_pred, st), (chunk_pred, cst)):
        torch.testing.assert_close(got, full, atol=1e-5, rtol=0)
        assert state.k.shape == (cfg.layers, 3, cfg.heads, 40, cfg.hidden // cfg.heads)
        torch.testing.assert_close(state.k, full_state.k, atol=1e-5, rtol=0)
        torch.testing.assert_close(state.last, full_state.last, atol=1e-5, rtol=0)
    torch.testing.assert_close(steps[:, -1], full, atol=1e-5, rtol=0)


def test_padded_rows_equal_unpadded():
    model = _model(VARIANTS[0])
    lengths = torch.tensor([5, 12, 1])
    x = _unit(3, 12, D)
    pad = x.clone()
    for b, n in enumerate(lengths.tolist()):
        pad[b, n:] = 3.0  # garbage after each row's length
    with torch.no_grad():
        pred, _ = model(pad, lengths=lengths)
        steps, _ = model(pad, lengths=lengths, all_steps=True)
        for b, n in enumerate(lengths.tolist()):
            ref, _ = model(x[b : b + 1, :n])
            torch.testing.assert_close(pred[b : b + 1], ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(steps[b : b + 1, n - 1], ref, atol=1e-5, rtol=0)


def test_bad_inputs_and_config():
    model = _model(VARIANTS[0])
    with pytest.raises(ValueError, match=r"context must be \(B, T, 16\)"):
        model(torch.zeros(2, 5, 8))
    _, st = model(_unit(2, 4, D))
    with pytest.raises(ValueError, match="state.k must be"):
        model(_unit(3, 2, D), st)  # another batch size
    with pytest.raises(ValueError, match="equal-length rows"):
        model(_unit(2, 3, D), st, lengths=torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="TransformerState"):
        model(_unit(2, 3, D), ("not", "a state"))
    with pytest.raises(ConfigError, match="heads"):
        ModelConfig(kind="transformer", hidden=24, heads=5)  # 24 / 5 is not whole
    with pytest.raises(ConfigError, match="heads"):
        ModelConfig(kind="transformer", hidden=24, heads=8)  # head size 3 is odd: no rotary pairs


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="transformer", d_in=D, hidden=16, layers=2,
                                    heads=2)).train()
    pred, _ = model(_unit(4, 9, D), all_steps=True)
    (1 - F.cosine_similarity(pred, _unit(4, 9, D, seed=3), dim=-1)).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_checkpoint_round_trip(tmp_path):
    cfg = VARIANTS[0]
    model = _model(cfg)
    save_checkpoint(tmp_path / "ck", model, cfg, epoch=0, metrics={})
    ck = load_checkpoint(tmp_path / "ck")
    assert isinstance(ck.model, TransformerLVM) and ck.model_config == cfg
    x = _unit(2, 7, D)
    with torch.no_grad():
        torch.testing.assert_close(ck.model(x)[0], model(x)[0])


@pytest.fixture(scope="module")
def predictor(tmp_path_factory, synthetic_bank):
    d = tmp_path_factory.mktemp("tpred")
    cfg = ModelConfig(kind="transformer", d_in=32, hidden=16, layers=2, heads=2)
    torch.manual_seed(0)
    save_checkpoint(d / "ck", build_model(cfg), cfg, epoch=0, metrics={},
                    config={"window": {"context": 12}})
    save_bank(synthetic_bank, d / "bank.parquet")
    return Predictor.from_paths(d / "ck", d / "bank.parquet", device="cpu")


def test_session_recomputes_over_the_last_window(predictor, synthetic_bank):
    """A transformer session carries its last max_context vectors: after any number of appends
    (past max_context too) it answers exactly what a full-context predict answers."""
    ctx = synthetic_bank.vectors[:30]
    assert predictor.recomputes and predictor.session_shape() == (None, 32)
    state = None
    for i in range(0, 30, 7):
        p, state = predictor.append(ctx[i : i + 7], state)
        full = predictor.predict(ctx[: i + 7])
        np.testing.assert_allclose(p.vector, full.vector, atol=1e-5)
        assert p.context_used == min(i + 7, 12) == full.context_used
    window = state.h[:, 0].numpy()
    np.testing.assert_array_equal(window, ctx[-12:])
    out = predictor.append_batch([ctx[:2], ctx[5:6]], [window, None], [window[-1], None])
    np.testing.assert_allclose(out[0][0].vector,
                               predictor.predict(np.concatenate([window, ctx[:2]])).vector,
                               atol=1e-5)
    assert out[1][1].shape == (1, 32)


def test_session_shape_check_accepts_any_window_length():
    h = np.zeros((7, 32), np.float32)
    s = SessionState("sid", "phase3", "fp", 7, 0.0, h, h[-1])
    check_compatible(s, "phase3", "fp", (None, 32), 32)
    with pytest.raises(SessionStale):
        check_compatible(s, "phase3", "fp", (None, 16), 32)  # another dimension
    with pytest.raises(SessionStale):
        check_compatible(s, "phase3", "fp", (2, 24), 32)  # a recurrent model's state shape
    assert isinstance(_model(VARIANTS[1])(_unit(1, 3, D))[1], TransformerState)
