"""MemoryGRU and GRUModel: incremental == full context, padding, validation, init, gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lvm_ray.config import PAPER_MODEL, SMALL_MODEL, ModelConfig
from lvm_ray.model import GRUModel, MemoryGRU, RecurrentState, build_model, count_parameters

D = 16
VARIANTS = [
    ModelConfig(kind="memory_gru", d_in=D, hidden=24, layers=2, slots=8, delta=True, anchor="last"),
    ModelConfig(kind="memory_gru", d_in=D, hidden=24, layers=2, slots=8, delta=False, anchor="last"),
    ModelConfig(kind="memory_gru", d_in=D, hidden=24, layers=1, slots=0, delta=True, anchor="last"),
    ModelConfig(kind="gru", d_in=D, hidden=24, layers=2, slots=0, delta=True, anchor="last"),
    ModelConfig(kind="gru", d_in=D, hidden=24, layers=1, slots=0, delta=False, anchor="last"),
    ModelConfig(kind="memory_gru", d_in=D, hidden=24, layers=2, slots=8, anchor="decay"),
    ModelConfig(kind="gru", d_in=D, hidden=24, layers=1, slots=0, anchor="decay"),
]
IDS = [f"{c.kind}-L{c.layers}-S{c.slots}-{'delta' if c.delta else 'direct'}-{c.anchor}"
       for c in VARIANTS]


def _model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    if not cfg.delta:
        return model
    # Wake up the small-init head so delta mode is not trivially ~x_last in the comparisons.
    with torch.no_grad():
        model.head[-1].weight.normal_(0, 0.3)
        if model.beta_logit is not None:
            model.beta_logit.fill_(0.7)  # not the init value, so a wrong beta would show
    return model


def _decayed_sum(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Reference anchor: sum_t beta^(T-1-t) x_t by an explicit loop. x (B, T, D) -> (B, D)."""
    a = torch.zeros_like(x[:, 0])
    for t in range(x.shape[1]):
        a = beta * a + x[:, t]
    return a


def _unit(*shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


@pytest.mark.parametrize("cfg", VARIANTS, ids=IDS)
def test_incremental_equals_full_context(cfg):
    model = _model(cfg)
    x = _unit(3, 50, D)
    with torch.no_grad():
        full, full_state = model(x)
        st = None
        for t in range(50):
            pred, st = model(x[:, t : t + 1], st)
        chunk, cst = model(x[:, :20])
        chunk, cst = model(x[:, 20:], cst)
        stepped, sst = model.step(x[:, 0])
        for t in range(1, 50):
            stepped, sst = model.step(x[:, t], sst)
    assert not torch.allclose(full, x[:, -1], atol=1e-3), "prediction must not be a plain copy"
    anchor = x[:, -1] if cfg.anchor == "last" else _decayed_sum(x, torch.sigmoid(torch.tensor(0.7)))
    torch.testing.assert_close(full_state.last, anchor, atol=1e-5, rtol=0)
    for got, state in [(pred, st), (chunk, cst), (stepped, sst)]:
        torch.testing.assert_close(got, full, atol=1e-5, rtol=0)
        torch.testing.assert_close(state.h, full_state.h, atol=1e-5, rtol=0)
        torch.testing.assert_close(state.last, full_state.last, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", VARIANTS, ids=IDS)
def test_all_steps_equals_one_call_per_prefix(cfg):
    """all_steps=True gives, at step t, what the plain call on the prefix x[:, :t+1] gives; from
    a state it continues like the plain call; padded rows are right up to their length."""
    model = _model(cfg)
    x = _unit(3, 12, D)
    with torch.no_grad():
        preds, state = model(x, all_steps=True)
        assert preds.shape == (3, 12, D)
        for t in range(12):
            ref, ref_state = model(x[:, : t + 1])
            torch.testing.assert_close(preds[:, t], ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(state.h, ref_state.h, atol=1e-5, rtol=0)
        torch.testing.assert_close(state.last, ref_state.last, atol=1e-5, rtol=0)
        _, st5 = model(x[:, :5])
        cont, _ = model(x[:, 5:], st5, all_steps=True)
        torch.testing.assert_close(cont, preds[:, 5:], atol=1e-5, rtol=0)
        padded = x.clone()
        padded[0, 4:] = 7.0
        got, _ = model(padded, lengths=torch.tensor([4, 12, 12]), all_steps=True)
        torch.testing.assert_close(got[0, :4], preds[0, :4], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", VARIANTS[:1] + VARIANTS[3:4] + VARIANTS[5:6],
                         ids=IDS[:1] + IDS[3:4] + IDS[5:6])
def test_padded_batch_matches_unpadded_rows(cfg):
    model = _model(cfg)
    lengths = torch.tensor([7, 3, 12, 1])
    x = _unit(4, 12, D)
    x_pad = x.clone()
    for b, n in enumerate(lengths.tolist()):
        x_pad[b, n:] = 5.0  # garbage in the padding must not matter
    nxt = _unit(4, 2, D, seed=2)
    with torch.no_grad():
        pred, state = model(x_pad, lengths=lengths)
        cont, _ = model(nxt, state)  # continuing from a padded call's state
        for b, n in enumerate(lengths.tolist()):
            ref, ref_state = model(x[b : b + 1, :n])
            torch.testing.assert_close(pred[b : b + 1], ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(state.h[:, b : b + 1], ref_state.h, atol=1e-5, rtol=0)
            torch.testing.assert_close(state.last[b : b + 1], ref_state.last, atol=1e-6, rtol=0)
            ref_cont, _ = model(torch.cat([x[b : b + 1, :n], nxt[b : b + 1]], dim=1))
            torch.testing.assert_close(cont[b : b + 1], ref_cont, atol=1e-5, rtol=0)
        full_len, _ = model(x, lengths=torch.full((4,), 12))
        unpadded, _ = model(x)
    torch.testing.assert_close(full_len, unpadded)


@pytest.mark.parametrize("kind", ["memory_gru", "gru"])
def test_bad_inputs_raise(kind):
    model = build_model(ModelConfig(kind=kind, d_in=D, hidden=8, layers=1, slots=4)).eval()
    x = _unit(2, 7, D)
    with pytest.raises(ValueError, match=r"context must be \(B, T, 16\), got \(2, 7, 10\)"):
        model(torch.zeros(2, 7, 10))
    with pytest.raises(ValueError, match=r"\(B, T, 16\)"):
        model(torch.zeros(7, D))  # 2-D
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(2, 0, D))
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 3, 5] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            model(y)
    for lengths in ([0, 3], [3, 8], [3]):
        with pytest.raises(ValueError, match="lengths"):
            model(x, lengths=torch.tensor(lengths))
    _, st = model(x)
    with pytest.raises(ValueError, match=r"state.h must be \(1, 3, 8\)"):
        model(_unit(3, 2, D), st)
    with pytest.raises(ValueError, match=r"x must be \(B, 16\)"):
        model.step(x, st)


@pytest.mark.parametrize("kind", ["memory_gru", "gru"])
def test_delta_init_starts_at_copy_last(kind):
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=kind, d_in=32, hidden=32, layers=2, slots=8,
                                    anchor="last")).eval()
    x = _unit(8, 10, 32)
    with torch.no_grad():
        pred, _ = model(x)
    cos = F.cosine_similarity(pred, x[:, -1], dim=-1)
    assert cos.min() > 0.99, cos


@pytest.mark.parametrize("cfg", VARIANTS, ids=IDS)
def test_output_is_unit_norm(cfg):
    model = _model(cfg)
    with torch.no_grad():
        pred, state = model(_unit(5, 9, D) * 3.0)  # not-quite-unit inputs still give unit outputs
    assert pred.shape == (5, D) and isinstance(state, RecurrentState)
    assert state.h.shape == (cfg.layers, 5, cfg.hidden) and state.last.shape == (5, D)
    torch.testing.assert_close(pred.norm(dim=-1), torch.ones(5))


def test_decay_anchor_learns_beta_and_starts_near_recent_mean():
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_in=32, hidden=16, layers=1, slots=4, anchor="decay"))
    x = _unit(6, 9, 32)
    pred, state = model(x)
    # beta starts at 0.5: the anchor is x_T + x_{T-1}/2 + ..., and the untrained delta is tiny.
    ref = F.normalize(_decayed_sum(x, 0.5), dim=-1)
    assert F.cosine_similarity(pred, ref, dim=-1).min() > 0.99
    (1 - F.cosine_similarity(pred, _unit(6, 32, seed=4), dim=-1)).mean().backward()
    assert model.beta_logit.grad is not None and float(model.beta_logit.grad.abs()) > 0


def test_gradient_reaches_memory_and_temperature():
    torch.manual_seed(0)
    model = MemoryGRU(ModelConfig(d_in=D, hidden=16, layers=2, slots=8)).train()
    pred, _ = model(_unit(4, 6, D))
    (1 - F.cosine_similarity(pred, _unit(4, D, seed=3), dim=-1)).mean().backward()
    for name in ("mem_keys", "mem_values", "log_temp", "query.weight", "gru.weight_ih_l0"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert 0.01 <= float(model.temperature().detach()) <= 1.0


def test_no_memory_when_slots_zero():
    model = MemoryGRU(ModelConfig(d_in=D, hidden=16, layers=1, slots=0))
    assert not any("mem" in name for name, _ in model.named_parameters())
    assert model.fuse.in_features == 16


def test_build_model_dispatch_and_param_counts():
    assert isinstance(build_model(dataclasses.replace(SMALL_MODEL, kind="gru")), GRUModel)
    small = build_model(SMALL_MODEL)
    assert isinstance(small, MemoryGRU)
    paper = count_parameters(build_model(PAPER_MODEL))
    print(f"paper preset: {paper:,} parameters; small preset: {count_parameters(small):,}")
    assert 8_000_000 <= paper <= 15_000_000, paper
    assert count_parameters(small) < paper
