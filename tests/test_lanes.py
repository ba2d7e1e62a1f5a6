"""Lanes: k-means fit on train only, per-lane Hit@5 against a hand count, the canary rule,
lanes.json round trip."""

from __future__ import annotations

import numpy as np
import pytest

from lvm_ray.data.bank import ConceptBank
from lvm_ray.eval import lanes as ln


def _bank(n_per=60, dim=16, seed=0, lanes=None):
    """Four well separated topics (doc i is about topic i % 4); docs 0-5 train, 6 val, 7 test."""
    rng = np.random.default_rng(seed)
    centers = np.eye(dim, dtype=np.float32)[:4] * 12
    topic = np.repeat(np.arange(8) % 4, n_per)
    x = centers[topic] + rng.standard_normal((8 * n_per, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    split_of = np.array(["train"] * 6 + ["val", "test"], dtype=object)
    n = len(x)
    return ConceptBank(
        doc_ids=np.repeat(np.array([f"d{i}" for i in range(8)], dtype=object), n_per),
        positions=np.tile(np.arange(n_per), 8).astype(np.int32),
        texts=np.array([f"t{i}" for i in range(n)], dtype=object), vectors=x,
        splits=np.repeat(split_of, n_per),
        lanes=np.full(n, -1, np.int16) if lanes is None else lanes), topic


def test_kmeans_recovers_separated_topics_and_is_deterministic():
    bank, topic = _bank()
    a = ln.bank_lanes(bank, n_lanes=4, seed=0)
    b = ln.bank_lanes(bank, n_lanes=4, seed=0)
    np.testing.assert_array_equal(a.ids, b.ids)
    assert a.source.startswith("kmeans") and set(a.labels) == {0, 1, 2, 3}
    # Each topic maps to exactly one lane (a permutation).
    pairs = {(int(t), int(lane)) for t, lane in zip(topic, a.ids)}
    assert len(pairs) == 4 and len({lane for _, lane in pairs}) == 4


def test_lanes_are_fit_on_train_only():
    bank, _ = _bank()
    ref = ln.bank_lanes(bank, n_lanes=4, seed=0)
    moved = ConceptBank(bank.doc_ids, bank.positions, bank.texts, bank.vectors.copy(),
                        bank.splits, bank.lanes)
    test = bank.split_rows("test")
    moved.vectors[test] = -moved.vectors[test]  # wildly different test vectors
    got = ln.bank_lanes(moved, n_lanes=4, seed=0)
    train = bank.split_rows("train")
    np.testing.assert_array_equal(got.ids[train], ref.ids[train])  # same centroids


def test_corpus_lanes_win_when_every_row_has_one():
    bank, topic = _bank(lanes=np.repeat(np.arange(8) % 4, 60).astype(np.int16) + 10)
    got = ln.bank_lanes(bank)
    assert got.source == "corpus" and set(np.unique(got.ids)) == {10, 11, 12, 13}


def test_lane_metrics_hand_count_and_canary():
    hits = np.array([1, 0, 1, 1, 1, 0, 0, 0, 1, 1], dtype=float)
    lanes = np.array([0, 0, 0, 0, 1, 1, 2, 2, -1, 2])
    m = ln.lane_metrics(hits, lanes, k=5, bootstrap=200)
    assert m["lane0_hit@5"] == 0.75 and m["lane1_hit@5"] == 0.5
    assert m["lane2_hit@5"] == pytest.approx(1 / 3) and m["lane0_n"] == 4.0
    assert "lane-1_hit@5" not in m  # unknown lane skipped
    avg = (0.75 + 0.5 + 1 / 3) / 3
    assert m["lane_avg_hit@5"] == pytest.approx(avg)
    assert m["lane_threshold_hit@5"] == pytest.approx(0.8 * avg)
    assert m["lane_canary_ok"] == 0.0  # lane 2 (0.33) is below 0.8 x 0.53 = 0.42; lane 1 is not
    assert m["lane0_hit@5_lo"] <= 0.75 <= m["lane0_hit@5_hi"]
    even = ln.lane_metrics(np.ones(6), np.array([0, 0, 1, 1, 2, 2]), bootstrap=0)
    assert even["lane_canary_ok"] == 1.0 and even["lane_canary_confident_fail"] == 0.0
    rows = ln.lane_rows(m)
    assert [r["lane"] for r in rows] == [0, 1, 2]
    assert [r["below_threshold"] for r in rows] == [False, False, True]


def test_lane_json_round_trip_and_markdown(tmp_path):
    m = {"bank_hit@5": 0.5, **ln.lane_metrics(np.array([1, 0, 1, 1.0]), np.array([0, 0, 1, 1]),
                                              bootstrap=50)}
    b = {"bank_hit@5": 0.25, **ln.lane_metrics(np.array([0, 0, 1, 0.0]), np.array([0, 0, 1, 1]),
                                               bootstrap=50)}
    lanes = ln.Lanes(np.array([0, 1], np.int16), "kmeans(k=2, train)", {0: ["a"], 1: ["b"]})
    doc = ln.lane_document({"model": m, "copy-last": b}, "model", lanes, "test")
    out = tmp_path / "report" / "model"  # not there yet, as under `lvm evaluate --out NEW_DIR`
    assert ln.lane_report(out) is None
    ln.write_lanes(out, doc)
    back = ln.lane_report(out)
    assert back["model"] == "model" and back["canary_ok"] is False
    assert [r["lane"] for r in back["lanes"]] == [0, 1] and back["lanes"][0]["hit"] == 0.5
    assert back["labels"] == {"0": ["a"], "1": ["b"]} and "copy-last" in back["baselines"]
    md = ln.lane_markdown({"model": m, "copy-last": b})
    assert "| 0 (2) | **50.0%" in md and "canary rule" in md
