"""Baselines on synthetic sequences whose best predictor is known."""

import numpy as np
import pytest

from lvm_ray.config import EvalConfig, WindowConfig
from lvm_ray.data.bank import ConceptBank
from lvm_ray.data.windows import make_windows
from lvm_ray.eval import baselines as bl
from lvm_ray.eval.metrics import evaluate

CFG = EvalConfig(ks=(1, 5), pool_size=20, bootstrap=0)


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def bank_from_docs(docs):
    """docs: list of (len_i, D) arrays; doc i goes to train/val/test by i % 5 (3/1/1)."""
    lens = [len(d) for d in docs]
    n = sum(lens)
    split_of = np.array(["train", "train", "train", "val", "test"], dtype=object)
    return ConceptBank(
        doc_ids=np.repeat(np.array([f"d{i:03d}" for i in range(len(docs))], dtype=object), lens),
        positions=np.concatenate([np.arange(k) for k in lens]).astype(np.int32),
        texts=np.array([""] * n, dtype=object),
        vectors=unit(np.concatenate(docs)),
        splits=np.repeat(split_of[np.arange(len(docs)) % 5], lens),
        lanes=np.full(n, -1, dtype=np.int16),
    )


def random_bank(n_docs=30, d=32, seed=0):
    rng = np.random.default_rng(seed)
    return bank_from_docs([rng.standard_normal((rng.integers(10, 40), d)) for _ in range(n_docs)])


def rotation_bank(n_docs=60, length=30, d=32, seed=0):
    """v_{t+1} = v_t R with R a random orthogonal matrix: a linear map ridge can recover."""
    rng = np.random.default_rng(seed)
    r = np.linalg.qr(rng.standard_normal((d, d)))[0]
    docs = []
    for _ in range(n_docs):
        v = [unit(rng.standard_normal(d))]
        for _ in range(length - 1):
            v.append(v[-1] @ r)
        docs.append(np.stack(v))
    return bank_from_docs(docs), r


def mean4_bank(n_docs=60, length=40, d=32, seed=0, noise=0.05):
    """v_t = l2(mean of the previous 4 + noise): context-mean(m=4) is the right predictor."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        v = list(unit(rng.standard_normal((4, d))))
        for _ in range(length - 4):
            v.append(unit(np.mean(v[-4:], axis=0) + noise * rng.standard_normal(d)))
        docs.append(np.stack(v))
    return bank_from_docs(docs)


def test_context_mean_cumsum_equals_loop(monkeypatch):
    monkeypatch.setattr(bl, "SEGMENT", 7)  # force many cumsum segments
    bank = random_bank(seed=1)
    ws = make_windows(bank, "train", WindowConfig(context=10, min_context=1))
    ws = ws.subset(np.random.default_rng(2).permutation(len(ws)))  # order must not matter
    for m in (1, 3, 16):
        got = bl.ContextMean(m).predict(bank.vectors, ws)
        ref = np.stack([unit(bank.vectors[ws.context_rows(i)[-m:]].mean(axis=0))
                        for i in range(len(ws))])
        np.testing.assert_allclose(got, ref, atol=1e-6)


def test_copy_last_predicts_the_last_context_vector():
    bank = random_bank(seed=3)
    ws = make_windows(bank, "val", WindowConfig(context=5))
    pred = bl.CopyLast().predict(bank.vectors, ws)
    np.testing.assert_allclose(pred, [bank.vectors[ws.context_rows(i)[-1]]
                                      for i in range(len(ws))], atol=1e-7)


def test_ridge_stats_blocked_equal_direct():
    bank = random_bank(seed=4)
    ws = make_windows(bank, "train", WindowConfig(context=6))
    a, b = bl.ridge_stats(bank.vectors, ws, m=2, block=17)
    x = bl.last_m_mean(bank.vectors, ws, 2).astype(np.float64)
    x1 = np.hstack([x, np.ones((len(x), 1))])
    np.testing.assert_allclose(a, x1.T @ x1, atol=1e-8)
    np.testing.assert_allclose(b, x1.T @ bank.vectors[ws.target_rows], atol=1e-8)


def test_ridge_recovers_a_linear_map():
    bank, r = rotation_bank(seed=5)
    wcfg = WindowConfig(context=8)
    train, val = make_windows(bank, "train", wcfg), make_windows(bank, "val", wcfg)
    ridge = bl.Ridge(1, 1e-3, *bl.ridge_solve(*bl.ridge_stats(bank.vectors, train, m=1), 1e-3))
    np.testing.assert_allclose(ridge.w, r, atol=1e-3)
    np.testing.assert_allclose(ridge.b, 0, atol=1e-3)
    s = evaluate(ridge.predict(bank.vectors, val), val, bank, CFG)
    assert s["bank_hit@1"] == 1.0 and s["cosine"] > 0.999
    copy = evaluate(bl.CopyLast().predict(bank.vectors, val), val, bank, CFG)
    assert copy["bank_hit@1"] < 0.5


def test_fit_baselines_selects_ridge_on_val():
    bank, _ = rotation_bank(seed=6)
    wcfg = WindowConfig(context=8)
    train, val = make_windows(bank, "train", wcfg), make_windows(bank, "val", wcfg)
    copy, mean, ridge = bl.fit_baselines(bank, train, val, CFG, ms=(1, 2, 4), lambdas=(0.01, 100))
    assert copy.name == "copy-last" and mean.name.startswith("context-mean(m=")
    assert ridge.params["m"] == 1 and ridge.params["lambda"] == 0.01
    assert ridge.name == "ridge(m=1,lambda=0.01)"
    assert ridge.params["val_bank_hit@5"] == 1.0


def test_fit_baselines_selects_context_mean_m_on_val():
    bank = mean4_bank(seed=7)
    wcfg = WindowConfig(context=16)
    train, val = make_windows(bank, "train", wcfg), make_windows(bank, "val", wcfg)
    _, mean, _ = bl.fit_baselines(bank, train, val, CFG, ms=(1, 2, 4, 8), lambdas=(1.0,),
                                  select="bank_hit@1")
    assert mean.params["m"] == 4, mean.params
    scores = {m: evaluate(bl.ContextMean(m).predict(bank.vectors, val), val, bank, CFG)
              ["bank_hit@1"] for m in (1, 2, 4, 8)}
    assert max(scores, key=scores.get) == 4
    assert mean.params["val_bank_hit@1"] == pytest.approx(scores[4])


def test_fit_baselines_pool_selection_uses_the_fixed_pool():
    bank = random_bank(n_docs=40, seed=8)
    wcfg = WindowConfig(context=4)
    train, val = make_windows(bank, "train", wcfg), make_windows(bank, "val", wcfg)
    out = bl.fit_baselines(bank, train, val, CFG, ms=(1,), lambdas=(1.0,), select="pool_hit@5")
    assert all("val_pool20_hit@5" in b.params for b in out)
    results = bl.evaluate_baselines(out, bank, val, CFG)
    assert list(results) == [b.name for b in out]
    for b in out:
        p = b.predict(bank.vectors, val)
        assert p.shape == (len(val), bank.dim)
        np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="fixed pool"):
        bl.fit_baselines(bank, train, val, EvalConfig(pool_size=None), ms=(1,), lambdas=(1.0,),
                         select="pool_hit@5")
