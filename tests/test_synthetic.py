import numpy as np
import pytest

from lvm_ray.config import SplitConfig
from lvm_ray.data.synthetic import make_synthetic_bank
from lvm_ray.data.windows import assign_splits, check_split_disjoint


def _docs(bank, splits):
    return [bank.vectors[bank.doc_ids == d] for d in bank.doc_order()
            if bank.splits[bank.doc_ids == d][0] in splits]


def _lagged(docs, lags, first_target=3):
    """Features [x_{t-1}, ..., x_{t-lags}] and targets x_t for t >= first_target (same targets
    whatever `lags` is, so the comparison is fair)."""
    xs, ys = [], []
    for x in docs:
        n = len(x)
        xs.append(np.hstack([x[first_target - j : n - j] for j in range(1, lags + 1)]))
        ys.append(x[first_target:])
    return np.vstack(xs), np.vstack(ys)


def _ridge_eval(train, held_out, lags, lam=1e-2):
    x, y = _lagged(train, lags)
    x1 = np.hstack([x, np.ones((len(x), 1))])
    w = np.linalg.solve(x1.T @ x1 + lam * np.eye(x1.shape[1]), x1.T @ y)
    xt, yt = _lagged(held_out, lags)
    pred = np.hstack([xt, np.ones((len(xt), 1))]) @ w
    mse = float(((pred - yt) ** 2).sum(1).mean())
    # Nearest neighbour of the prediction among all held-out vectors must be the target.
    pool = np.vstack(held_out)
    offsets = np.cumsum([0] + [len(x) for x in held_out[:-1]])
    target_rows = np.concatenate([np.arange(3, len(x)) + o for x, o in zip(held_out, offsets)])
    hit = float(((pred @ pool.T).argmax(1) == target_rows).mean())
    return mse, hit


def test_shape_meta_and_splits():
    bank = make_synthetic_bank(n_docs=10, doc_len=(20, 30), dim=16, seed=3)
    assert bank.dim == 16 and bank.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(bank.vectors, axis=1), 1.0, atol=1e-5)
    assert bank.doc_order() == [f"syn-{i:04d}" for i in range(10)]
    for d in bank.doc_order():
        rows = np.flatnonzero(bank.doc_ids == d)
        assert 20 <= len(rows) <= 30
        assert np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows)))  # contiguous
        assert bank.positions[rows].tolist() == list(range(len(rows)))
        assert bank.texts[rows[2]] == f"{d} #2"
    assert bank.meta["encoder"] == "synthetic"
    assert (bank.lanes == -1).all()
    check_split_disjoint(bank)
    expected = assign_splits(bank.doc_order(), SplitConfig())
    assert {d: bank.splits[bank.doc_ids == d][0] for d in bank.doc_order()} == expected


def test_deterministic_in_seed():
    a, b, c = (make_synthetic_bank(seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert len(a) != len(c) or not np.allclose(a.vectors, c.vectors)


@pytest.mark.parametrize("seed", [0, 1])
def test_copy_last_is_far_from_perfect(seed):
    bank = make_synthetic_bank(seed=seed)
    cos = [np.sum(x[1:] * x[:-1], axis=1).mean() for x in _docs(bank, {"train", "val", "test"})]
    assert np.mean(cos) < 0.9


@pytest.mark.parametrize("seed", [0, 1])
def test_two_lags_predict_clearly_better_than_one(seed):
    bank = make_synthetic_bank(seed=seed)
    train, held_out = _docs(bank, {"train"}), _docs(bank, {"val", "test"})
    mse1, hit1 = _ridge_eval(train, held_out, lags=1)
    mse2, hit2 = _ridge_eval(train, held_out, lags=2)
    assert mse2 < 0.6 * mse1, (mse1, mse2)
    # The last vector alone does not say which way a document moves (hidden signed velocity),
    # so a one-lag predictor almost never lands nearest its target; two lags often do.
    assert hit1 < 0.1, hit1
    assert hit2 > hit1 + 0.2, (hit1, hit2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="latent"):
        make_synthetic_bank(latent=3)
    with pytest.raises(ValueError, match="doc_len"):
        make_synthetic_bank(doc_len=(10, 5))
