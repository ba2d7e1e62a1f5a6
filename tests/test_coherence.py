"""The coherence gate: coherence is the mean cosine of consecutive context concepts, the gate
drops exactly the training windows below its threshold, and val and test are never touched."""

import numpy as np
import pytest

from lvm_ray.config import ConfigError, WindowConfig, load_config
from lvm_ray.data.coherence import DESIGN_THRESHOLDS, coherence_gate, window_coherence
from lvm_ray.data.synthetic import make_synthetic_bank
from lvm_ray.data.windows import make_windows
from lvm_ray.workflows.prepare import prepare_windows


@pytest.fixture(scope="module")
def bank():
    return make_synthetic_bank(n_docs=30, doc_len=(20, 40), dim=16, seed=4)


def brute_coherence(vectors, ws, i):
    ctx = vectors[ws.context_rows(i)]
    if len(ctx) < 2:
        return 1.0
    return float(np.mean([ctx[t] @ ctx[t + 1] for t in range(len(ctx) - 1)]))


@pytest.mark.parametrize("policy", ["document", "stream"])
def test_coherence_is_the_mean_cosine_of_consecutive_context_concepts(bank, policy):
    ws = make_windows(bank, "train", WindowConfig(policy=policy, context=8, min_context=1))
    got = window_coherence(bank.vectors, ws)
    want = np.array([brute_coherence(bank.vectors, ws, i) for i in range(len(ws))])
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.all(got[ws.lengths == 1] == 1.0)  # no pair: defined as 1, always kept


def test_gate_drops_exactly_the_windows_below_the_threshold(bank):
    wcfg = WindowConfig(context=8)
    train = make_windows(bank, "train", wcfg)
    coh = window_coherence(bank.vectors, train)
    thr = float(np.median(coh))
    gated, report = coherence_gate(bank.vectors, train,
                                   WindowConfig(context=8, min_coherence=thr))
    keep = coh >= thr
    np.testing.assert_array_equal(gated.end, train.end[keep])
    np.testing.assert_array_equal(gated.start, train.start[keep])
    assert report.kept == int(keep.sum()) and report.total == len(train)
    assert report.threshold == thr and report.quantile is None
    assert [t for t, _ in report.design] == list(DESIGN_THRESHOLDS)
    assert dict(report.design)[0.0] == int(np.count_nonzero(coh >= 0.0))


@pytest.mark.parametrize("q", [0.25, 0.5])
def test_quantile_threshold_keeps_that_share(bank, q):
    train = make_windows(bank, "train", WindowConfig(context=8))
    coh = window_coherence(bank.vectors, train)
    gated, report = coherence_gate(bank.vectors, train,
                                   WindowConfig(context=8, min_coherence_quantile=q))
    assert report.threshold == pytest.approx(float(np.quantile(coh, q)))
    assert abs(report.kept / report.total - (1 - q)) < 0.02
    assert len(gated) == report.kept and "quantile" in report.line()


def test_prepare_windows_gates_train_only(bank):
    plain = prepare_windows(load_config(overrides={"window": {"context": 8}}), bank)
    gated = prepare_windows(load_config(overrides={
        "window": {"context": 8, "min_coherence_quantile": 0.5}}), bank)
    for a, b in ((plain.val, gated.val), (plain.test, gated.test)):
        np.testing.assert_array_equal(a.start, b.start)
        np.testing.assert_array_equal(a.end, b.end)
    assert len(gated.train) < len(plain.train)
    # The baselines still fit on every training window.
    np.testing.assert_array_equal(gated.baseline_train.end, plain.train.end)
    assert plain.baseline_train is plain.train  # the gate is off: nothing was dropped


def test_gate_off_by_default_and_config_checks(bank):
    train = make_windows(bank, "train", WindowConfig(context=8))
    same, report = coherence_gate(bank.vectors, train, WindowConfig(context=8))
    assert same is train and report is None
    with pytest.raises(ConfigError, match="not both"):
        WindowConfig(min_coherence=0.1, min_coherence_quantile=0.5)
    with pytest.raises(ConfigError, match="min_coherence_quantile"):
        WindowConfig(min_coherence_quantile=1.0)
    with pytest.raises(ConfigError, match="cosine"):
        WindowConfig(min_coherence=1.5)
