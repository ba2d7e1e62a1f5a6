"""The context-scaling curve: one fixed target set at every L, truncation == windows cut at L,
fixed candidates, the router threshold rule, and the demo preset's long documents."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lvm_ray.config import EvalConfig, ModelConfig, WindowConfig, load_config
from lvm_ray.data.windows import make_windows
from lvm_ray.eval.context_curve import (LENGTHS, baseline_candidates, best_within, curve_values,
                                        long_targets, paired_diff_ci, route_threshold, saturation,
                                        summarize, truncate)
from lvm_ray.eval.predict import predict_windows
from lvm_ray.model import build_model


def _model(kind: str, dim: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=kind, d_in=dim, hidden=16, layers=2, slots=4,
                                    heads=2)).eval()
    with torch.no_grad():
        model.head[-1].weight.normal_(0, 0.3)
    return model


def test_same_targets_at_every_length(synthetic_bank):
    targets = long_targets(synthetic_bank, "test", 40)
    assert len(targets) > 0 and np.all(targets.lengths == 40)
    assert np.all(synthetic_bank.positions[targets.target_rows] >= 40)
    ids = [truncate(targets, L).target_rows for L in (1, 2, 4, 8, 16, 32, 40)]
    for got in ids[1:]:
        np.testing.assert_array_equal(got, ids[0])
    assert [int(truncate(targets, L).lengths.max()) for L in (1, 8, 40, 1000)] == [1, 8, 40, 40]


@pytest.mark.parametrize("kind", ["memory_gru", "transformer"])
def test_truncating_to_L_equals_windows_cut_at_L(synthetic_bank, kind):
    """A model read with its context truncated to L answers what it answers on the protocol's
    own windows of context L, for the same targets."""
    bank, model = synthetic_bank, _model(kind, synthetic_bank.dim)
    targets = long_targets(bank, "test", 40)
    for L in (1, 3, 16):
        cut = truncate(targets, L)
        ws = make_windows(bank, "test", WindowConfig(context=L, min_context=1))
        pick = np.searchsorted(ws.end, cut.end)
        assert np.array_equal(ws.end[pick], cut.end)
        own = ws.subset(pick)
        np.testing.assert_array_equal(own.start, cut.start)
        np.testing.assert_allclose(predict_windows(model, bank.vectors, cut),
                                   predict_windows(model, bank.vectors, own), atol=1e-5)


def test_candidates_do_not_change_with_L(synthetic_bank):
    """The same prediction scores the same at every L: only the context changes the curve."""
    bank = synthetic_bank
    targets = long_targets(bank, "test", 40)
    pred = bank.vectors[targets.target_rows] + 0.3 * bank.vectors[targets.last_rows]
    pred /= np.linalg.norm(pred, axis=1, keepdims=True)
    per = [curve_values(pred, truncate(targets, L), targets, bank) for L in (1, 8, 40)]
    for p in per[1:]:
        for k in ("bank_hit@5", "mrr", "ca"):
            np.testing.assert_array_equal(p[k], per[0][k])
    with pytest.raises(ValueError, match="same targets"):
        curve_values(pred[:-1], truncate(targets, 4).subset(np.arange(len(targets) - 1)),
                     targets, bank)
    s = summarize(per[0], bootstrap=200)
    assert s["n"] == len(targets) and s["bank_hit@5_lo"] <= s["bank_hit@5"] <= s["bank_hit@5_hi"]


def test_baselines_never_read_more_than_L(synthetic_bank):
    bank = synthetic_bank
    train = make_windows(bank, "train", WindowConfig(context=16))
    val = make_windows(bank, "val", WindowConfig(context=16))
    means, ridges = baseline_candidates(bank, train, val, EvalConfig(bootstrap=0), ms=(1, 4, 16),
                                        lambdas=(1.0,))
    assert [c.m for c in means] == [1, 4, 16] and len(ridges) == 3
    for L in (1, 2, 4, 100):
        assert best_within(means, L).m <= L and best_within(ridges, L).m <= L
    with pytest.raises(ValueError):
        best_within([c for c in means if c.m > 1], 1)


def test_route_threshold_needs_a_measurable_lead_from_there_on():
    rng = np.random.default_rng(0)
    n = 400
    short = {L: {"bank_hit@5": (rng.random(n) < 0.2).astype(float)} for L in (100, 500, 1000)}
    same = short[500]["bank_hit@5"]
    better = np.maximum(same, (rng.random(n) < 0.3).astype(float))  # wins on the same targets
    long = {100: {"bank_hit@5": short[100]["bank_hit@5"]}, 500: {"bank_hit@5": same},
            1000: {"bank_hit@5": better}}
    d = route_threshold({"p2": short, "p3": long}, "p2", "p3", short_context=500, bootstrap=300)
    assert [r["short_reads"] for r in d["rows"]] == [100, 500, 500]
    assert [r["wins"] for r in d["rows"]] == [False, False, True]
    assert d["wins_from"] == 1000 and d["threshold"] == 999
    # A lead that does not hold at the longest length gives no threshold at all.
    long[1000] = {"bank_hit@5": same}
    long[500] = {"bank_hit@5": better}
    d = route_threshold({"p2": short, "p3": long}, "p2", "p3", short_context=500, bootstrap=300)
    assert d["wins_from"] is None and d["threshold"] is None
    mean, lo, hi = paired_diff_ci(better, same, 300)
    assert lo > 0 and lo <= mean <= hi


def test_saturation_finds_where_more_context_stops_helping():
    rng = np.random.default_rng(1)
    base = rng.random(500)
    # Hit rates 10% -> 30% -> 40% -> 40% on the same targets: gains stop after L=4.
    per = {L: {"bank_hit@5": (base < p).astype(float)}
           for L, p in ((1, 0.1), (2, 0.3), (4, 0.4), (8, 0.4))}
    s = saturation(per, bootstrap=300)
    assert s["best_length"] == 4 and s["enough"] == 4
    assert s["gain_lo"] > 0 and abs(s["gain"] - (s["best"] - s["first"])) < 1e-12


def test_demo_preset_has_test_windows_past_500():
    """`make demo` picks the longest speeches: every split holds a document longer than 1,000
    concepts, and test has windows whose target sits past position 500. Chunking only: no
    encoder runs."""
    from lvm_ray.data.chunking import chunk_document
    from lvm_ray.data.corpus import load_documents
    from lvm_ray.data.windows import assign_splits

    cfg = load_config(presets=["demo", "phase3"])
    docs, _ = load_documents(cfg.corpus)
    lens = {d.doc_id: len(chunk_document(d.text, cfg.corpus.sentences_per_chunk,
                                         cfg.corpus.max_chunk_chars)) for d in docs}
    split = assign_splits(list(lens), cfg.split)
    for s in ("train", "val", "test"):
        assert max(n for d, n in lens.items() if split[d] == s) > 1000, s
    past_500 = sum(max(0, n - 500) for d, n in lens.items() if split[d] == "test")
    assert past_500 >= 500
    assert cfg.window.context == 1000 and len(docs) == cfg.corpus.max_docs


@pytest.mark.slow
def test_context_curve_smoke_cli(tmp_path, monkeypatch):
    from lvm_ray.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["context-curve", "--smoke-test", "--out", "out", "--min-history", "16",
                 "--lengths", "1,2,4,8,16,64"]) == 0
    res = json.loads((tmp_path / "out" / "curve.json").read_text())
    assert res["lengths"] == [1, 2, 4, 8, 16]  # 64 > min-history is dropped
    assert set(res["summary"]) >= {"gru_L4", "transformer_L16", "ridge (best m<=L)"}
    assert set(res["saturation"]) == set(res["summary"])
    assert (tmp_path / "out" / "curve.png").stat().st_size > 0
    routing = json.loads((tmp_path / "out" / "routing.json").read_text())
    assert routing["phase2"] == "gru_L4" and len(routing["candidates"]) == 1
    assert tuple(LENGTHS) == (1, 2, 4, 8, 16, 32, 64, 128, 256, 500, 1000)
