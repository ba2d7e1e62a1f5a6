"""lvm_loss and info_nce against hand-written references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lvm_ray.config import LossConfig
from lvm_ray.model import info_nce, lvm_loss


def _data(B=6, D=32, K=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, D, generator=g)
    target = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    extra = F.normalize(torch.randn(K, D, generator=g), dim=-1)
    return pred, target, extra


def _info_nce_reference(pred, target, temperature, extra=None):
    """Explicit loop in float64 numpy."""
    p, t = pred.double().numpy(), target.double().numpy()
    cands = t if extra is None else np.concatenate([t, extra.double().numpy()])
    total = 0.0
    for i in range(len(p)):
        pi = p[i] / np.linalg.norm(p[i])
        logits = [pi @ (c / np.linalg.norm(c)) / temperature for c in cands]
        m = max(logits)
        log_z = m + math.log(sum(math.exp(v - m) for v in logits))
        total += log_z - logits[i]
    return total / len(p)


@pytest.mark.parametrize("with_extra", [False, True])
def test_info_nce_matches_reference(with_extra):
    pred, target, extra = _data()
    extra = extra if with_extra else None
    got = float(info_nce(pred, target, 0.07, extra))
    assert got == pytest.approx(_info_nce_reference(pred, target, 0.07, extra), rel=1e-5)


def test_extra_negatives_change_value_and_positive_is_column_i():
    pred, target, extra = _data()
    pred = target + 0.3 * pred / pred.norm(dim=-1, keepdim=True)  # each row near its own target
    base = float(info_nce(pred, target, 0.1))
    with_extra = float(info_nce(pred, target, 0.1, extra))
    assert with_extra > base  # more negatives can only add to the partition function
    # If the positive sat anywhere but column i, a near-perfect pred would not give a low loss.
    assert with_extra < 0.5
    # An extra negative identical to row 0's target makes row 0 ambiguous: loss rises by ~log 2 / B.
    dup = float(info_nce(pred, target, 0.1, target[:1]))
    assert dup - base == pytest.approx(math.log(2) / len(pred), rel=0.05)


def test_extra_negatives_carry_no_gradient():
    pred, target, extra = _data()
    pred.requires_grad_(True)
    extra.requires_grad_(True)
    info_nce(pred, target, 0.07, extra).backward()
    assert pred.grad is not None and extra.grad is None


def test_components_sum_with_weights():
    pred, target, extra = _data()
    cfg = LossConfig(w_mse=2.0, w_cos=0.7, alpha=0.3, temperature=0.05, negatives="gathered")
    loss, parts = lvm_loss(pred, target, cfg, extra)
    mse = float(((pred - target) ** 2).mean())
    cos = float((1 - (F.normalize(pred, dim=-1) * target).sum(-1)).mean())
    nce = _info_nce_reference(pred, target, 0.05, extra)
    assert parts["mse"] == pytest.approx(mse, rel=1e-5)
    assert parts["cos"] == pytest.approx(cos, rel=1e-5)
    assert parts["infonce"] == pytest.approx(nce, rel=1e-5)
    expected = 2.0 * mse + 0.7 * cos + 0.3 * nce
    assert parts["loss"] == pytest.approx(expected, rel=1e-5)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert set(parts) == {"loss", "mse", "cos", "infonce"}
    assert all(isinstance(v, float) for v in parts.values())


def test_negatives_modes():
    pred, target, extra = _data()
    gathered = lvm_loss(pred, target, LossConfig(negatives="gathered"), extra)[1]
    local = lvm_loss(pred, target, LossConfig(negatives="local"), extra)[1]
    local_ref = lvm_loss(pred, target, LossConfig(negatives="gathered"))[1]
    assert local["infonce"] == pytest.approx(local_ref["infonce"])  # local ignores extras
    assert gathered["infonce"] != pytest.approx(local["infonce"])
    for cfg in (LossConfig(negatives="none"), LossConfig(alpha=0.0)):
        loss, parts = lvm_loss(pred, target, cfg, extra)
        assert parts["infonce"] == 0.0
        assert float(loss) == pytest.approx(cfg.w_mse * parts["mse"] + cfg.w_cos * parts["cos"])


def test_loss_backward_and_shape_errors():
    pred, target, extra = _data()
    pred.requires_grad_(True)
    loss, _ = lvm_loss(pred, target, LossConfig(), extra)
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    with pytest.raises(ValueError, match=r"target must be \(B, D\)"):
        lvm_loss(pred, target[:, :5], LossConfig())
    with pytest.raises(ValueError, match=r"pred must be \(B, D\)"):
        lvm_loss(pred[0], target[0], LossConfig())
    with pytest.raises(ValueError, match=r"extra_negatives must be \(K, 32\)"):
        lvm_loss(pred, target, LossConfig(), extra[:, :4])


def test_masked_info_nce_equals_dropping_the_masked_candidates():
    pred, target, extra = _data(B=5, K=7)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(5, 12, generator=g) < 0.4
    mask[torch.arange(5), torch.arange(5)] = False
    got = float(info_nce(pred, target, 0.1, extra, mask))
    cands = torch.cat([target, extra])
    total = 0.0
    for i in range(5):
        keep = ~mask[i]
        logits = F.normalize(pred[i], dim=-1) @ F.normalize(cands[keep], dim=-1).T / 0.1
        pos = int(keep[: i + 1].sum()) - 1  # the positive's column among the kept ones
        total += float(torch.logsumexp(logits, 0) - logits[pos])
    assert got == pytest.approx(total / 5, rel=1e-5)
    bad = mask.clone()
    bad[2, 2] = True
    with pytest.raises(ValueError, match="diagonal"):
        info_nce(pred, target, 0.1, extra, bad)
    with pytest.raises(ValueError, match="mask must be bool"):
        info_nce(pred, target, 0.1, extra, mask[:, :5])


def test_bank_negatives_mask_exactly_the_windows_context_and_target():
    """The all-steps rows of a micro-batch: one per valid step, target = the next row, and the
    mask removes exactly the positions the evaluation excludes (context) plus the target."""
    from lvm_ray.config import ModelConfig, WindowConfig
    from lvm_ray.data.synthetic import make_synthetic_bank
    from lvm_ray.data.windows import make_windows
    from lvm_ray.model import build_model
    from lvm_ray.train.step import _rows_and_mask, to_batch

    bank = make_synthetic_bank(n_docs=6, doc_len=(20, 30), dim=16, seed=0)
    ws = make_windows(bank, "train", WindowConfig(context=8, min_context=2))
    idx = np.array([0, 5, len(ws) - 1])
    b = to_batch(bank.vectors, ws, idx, torch.device("cpu"), all_steps=True)
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_in=16, hidden=8, layers=1, slots=2))
    cfg = LossConfig(negatives="bank", bank_negatives=50)
    pool = torch.from_numpy(bank.vectors[ws.rows])
    torch.manual_seed(1)
    pred, target, negs, mask, _, _ = _rows_and_mask(model, b, cfg, pool)
    torch.manual_seed(1)
    drawn = torch.randint(len(pool), (50,))  # the same draw _rows_and_mask made
    n = int(ws.lengths[idx].sum())
    assert pred.shape == target.shape == (n, 16) and negs.shape == (50, 16)
    assert mask.shape == (n, n + 50)
    q = np.concatenate([np.arange(s + 1, e + 1) for s, e in zip(ws.start[idx], ws.end[idx])])
    s = np.concatenate([np.full(e - st, st) for st, e in zip(ws.start[idx], ws.end[idx])])
    np.testing.assert_array_equal(target.numpy(), bank.vectors[ws.rows[q]])
    cand = np.concatenate([q, drawn.numpy()])
    want = (cand[None] >= s[:, None]) & (cand[None] <= q[:, None])
    want[np.arange(n), np.arange(n)] = False
    np.testing.assert_array_equal(mask.numpy(), want)
    # The last-step row of each window is exactly that window's own target.
    ends = np.cumsum(ws.lengths[idx]) - 1
    np.testing.assert_array_equal(target[ends].numpy(), bank.vectors[ws.target_rows[idx]])
    loss, parts = lvm_loss(pred, target, cfg, negs, mask)
    assert np.isfinite(parts["infonce"]) and parts["infonce"] > 0


def test_step_targets_keep_only_each_windows_last_steps():
    from lvm_ray.config import ModelConfig, WindowConfig
    from lvm_ray.data.synthetic import make_synthetic_bank
    from lvm_ray.data.windows import make_windows
    from lvm_ray.model import build_model
    from lvm_ray.train.step import _rows_and_mask, to_batch

    bank = make_synthetic_bank(n_docs=4, doc_len=(20, 30), dim=16, seed=1)
    ws = make_windows(bank, "train", WindowConfig(context=10, min_context=2))
    idx = np.array([0, 3, 40])  # windows shorter and longer than 3
    b = to_batch(bank.vectors, ws, idx, torch.device("cpu"), all_steps=True, step_targets=3)
    model = build_model(ModelConfig(d_in=16, hidden=8, layers=1, slots=0))
    pred, target, negs, mask, _, _ = _rows_and_mask(model, b, LossConfig(negatives="local"), None)
    lengths = ws.lengths[idx]
    assert len(pred) == int(np.minimum(lengths, 3).sum()) and negs is None
    q = np.concatenate([np.arange(e - min(e - s, 3) + 1, e + 1)
                        for s, e in zip(ws.start[idx], ws.end[idx])])
    np.testing.assert_array_equal(target.numpy(), bank.vectors[ws.rows[q]])


def test_info_nce_row_negatives_match_a_per_row_reference():
    """Each row's own negatives join its candidates (masked ones do not), exactly as a per-row
    cross-entropy over [shared candidates ; that row's unmasked negatives] computes it."""
    torch.manual_seed(3)
    pred, target = torch.randn(4, 8), torch.randn(4, 8)
    rows = torch.randn(4, 3, 8)
    row_mask = torch.tensor([[False, False, True], [True, True, True],
                             [False, False, False], [False, True, False]])
    got = float(info_nce(pred, target, 0.1, row_negatives=rows, row_mask=row_mask))
    total = 0.0
    for i in range(4):
        cands = torch.cat([target, rows[i][~row_mask[i]]])
        logits = F.normalize(pred[i], dim=-1) @ F.normalize(cands, dim=-1).T / 0.1
        total += float(torch.logsumexp(logits, 0) - logits[i])
    assert got == pytest.approx(total / 4, rel=1e-5)
    assert got > float(info_nce(pred, target, 0.1))  # more negatives, larger loss
    with pytest.raises(ValueError, match="row_negatives must be"):
        info_nce(pred, target, 0.1, row_negatives=rows[:3])


def test_hard_negatives_are_the_concepts_after_the_target_in_its_document():
    """Row q's hard negatives are split positions q+1 .. q+H; those past the end of q's document
    (and copies of the target's own vector) are masked out."""
    from lvm_ray.config import ModelConfig, WindowConfig
    from lvm_ray.data.synthetic import make_synthetic_bank
    from lvm_ray.data.windows import document_ends, make_windows
    from lvm_ray.model import build_model
    from lvm_ray.train.step import _rows_and_mask, to_batch

    bank = make_synthetic_bank(n_docs=6, doc_len=(20, 30), dim=16, seed=0)
    ws = make_windows(bank, "train", WindowConfig(context=8, min_context=2))
    ends = document_ends(bank, ws.rows)
    docs = bank.doc_ids[ws.rows]
    for t in (0, 7, len(ws.rows) - 1):  # the reference: the first later row of another doc
        later = np.flatnonzero(docs[t:] != docs[t])
        assert ends[t] == (t + later[0] if len(later) else len(ws.rows))
    idx = np.array([0, 5, len(ws) - 1])  # the last window's target ends its document
    b = to_batch(bank.vectors, ws, idx, torch.device("cpu"), all_steps=True)
    model = build_model(ModelConfig(d_in=16, hidden=8, layers=1, slots=2))
    pool = torch.from_numpy(bank.vectors[ws.rows])
    cfg = LossConfig(negatives="local", hard_negatives=4)
    pred, target, _, mask, hard, hard_mask = _rows_and_mask(model, b, cfg, pool,
                                                            torch.from_numpy(ends))
    q = np.concatenate([np.arange(s + 1, e + 1) for s, e in zip(ws.start[idx], ws.end[idx])])
    assert hard.shape == (len(q), 4, 16) and hard_mask.shape == (len(q), 4)
    for r, qq in enumerate(q):
        for j in range(4):
            pos = qq + 1 + j
            inside = pos < ends[qq]
            assert bool(hard_mask[r, j]) == (not inside)
            if inside:
                np.testing.assert_array_equal(hard[r, j].numpy(), bank.vectors[ws.rows[pos]])
    assert bool(hard_mask[-1].all())  # the document's last target has nothing after it
    loss_hard, _ = lvm_loss(pred, target, cfg, mask=mask, row_negatives=hard, row_mask=hard_mask)
    loss_plain, _ = lvm_loss(pred, target, LossConfig(negatives="local"), mask=mask)
    assert float(loss_hard.detach()) > float(loss_plain.detach())
    with pytest.raises(ValueError, match="document ends"):
        _rows_and_mask(model, b, cfg, pool, None)
