"""The cosine-scale diagnostic (scripts/experiments/cosine_scale.py, docs/results.md 10.14):
a prediction's component outside the bank's principal subspace scales its cosines down without
changing its ranking, and projecting onto the subspace undoes exactly that."""

import numpy as np


def test_projection_undoes_an_off_subspace_component(experiment_script):
    cs = experiment_script("cosine_scale")
    rng = np.random.default_rng(0)
    # Bank vectors living in the first 8 of 16 dimensions.
    x = np.zeros((500, 16), np.float32)
    x[:, :8] = rng.normal(size=(500, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    basis = cs.principal_basis(x, 0.99)
    assert basis.shape[0] == 16 and 6 <= basis.shape[1] <= 8
    p = x[:5] + 0.1 * rng.normal(size=(5, 16)).astype(np.float32) * (np.arange(16) < 8)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    # The same prediction with 90% of its squared norm put outside the bank's span.
    off = np.zeros_like(p)
    off[:, 8] = 1.0
    diluted = np.sqrt(0.1) * p + np.sqrt(0.9) * off
    s_p, s_d = p @ x.T, diluted @ x.T
    np.testing.assert_allclose(s_d, np.sqrt(0.1) * s_p, atol=1e-5)  # every cosine scaled
    assert (np.argsort(-s_d, 1)[:, :5] == np.argsort(-s_p, 1)[:, :5]).all()  # same ranking
    back = cs.projected(diluted, basis)
    np.testing.assert_allclose(np.linalg.norm(back, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(back @ x.T, s_p, atol=0.05)


def test_centring_penalises_concepts_along_the_mean(experiment_script):
    cs = experiment_script("cosine_scale")
    p = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]], np.float32)
    mean = np.array([0.0, 0.5, 0.0], np.float32)
    q = cs.centred(p, mean, 1.0)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(cs.centred(p, mean, 0.0), p, atol=1e-6)  # beta 0: as trained
    np.testing.assert_allclose(q[0], np.array([1.0, -0.5, 0.0]) / np.hypot(1.0, 0.5), atol=1e-6)
    np.testing.assert_allclose(q[1], np.array([0.6, 0.3, 0.0]) / np.hypot(0.6, 0.3), atol=1e-6)
    # A concept along the mean loses against one across it, for the same raw cosine.
    hub, other = np.array([0.6, 0.8, 0.0]), np.array([0.6, 0.0, 0.8])
    assert q[1] @ hub < p[1] @ hub and q[1] @ other > p[1] @ other
