"""Splits by document and index-range windows, as EVAL_PROTOCOL.md defines them."""

import numpy as np
import pytest

from lvm_ray.config import SplitConfig, WindowConfig
from lvm_ray.data.bank import ConceptBank
from lvm_ray.data.windows import (LeakageError, WindowSet, assign_splits, check_split_disjoint,
                                  check_windows, gather_batch, make_windows)


def tiny_bank(doc_lens=(5, 7, 3, 9, 6, 4, 8, 5, 6, 7), dim=4, seed=0):
    rng = np.random.default_rng(seed)
    doc_ids, pos = [], []
    for d, n in enumerate(doc_lens):
        doc_ids += [f"d{d}"] * n
        pos += list(range(n))
    splits = assign_splits(sorted(set(doc_ids)), SplitConfig(train=0.6, val=0.2, test=0.2))
    v = rng.normal(size=(len(doc_ids), dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return ConceptBank(np.array(doc_ids, dtype=object), np.array(pos, np.int32),
                       np.array([f"t{i}" for i in range(len(doc_ids))], dtype=object), v,
                       np.array([splits[d] for d in doc_ids], dtype=object),
                       np.full(len(doc_ids), -1, np.int16))


def test_split_is_by_document_and_deterministic():
    ids = [f"doc{i}" for i in range(200)]
    a = assign_splits(ids, SplitConfig())
    b = assign_splits(list(reversed(ids)), SplitConfig())
    assert a == b
    counts = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 160, "val": 20, "test": 20}
    assert assign_splits(ids, SplitConfig(salt="other")) != a


def test_no_document_in_two_splits():
    bank = tiny_bank()
    check_split_disjoint(bank)
    bank.splits[0] = "test" if bank.splits[0] != "test" else "train"  # corrupt one row
    with pytest.raises(LeakageError):
        check_split_disjoint(bank)


@pytest.mark.parametrize("policy", ["document", "stream"])
def test_windows_never_cross_splits(policy):
    bank = tiny_bank()
    cfg = WindowConfig(policy=policy, context=4, min_context=2, stride=1)
    for split in ("train", "val", "test"):
        ws = make_windows(bank, split, cfg)
        check_windows(bank, ws)
        for i in range(len(ws)):
            rows = np.r_[ws.context_rows(i), ws.target_rows[i]]
            assert set(bank.splits[rows]) == {split}
            assert 2 <= len(rows) - 1 <= 4
            if policy == "document":
                assert len(set(bank.doc_ids[rows])) == 1


def test_document_windows_enumerate_expected_targets():
    bank = tiny_bank(doc_lens=(5, 7, 3, 9, 6, 4, 8, 5, 6, 7))
    cfg = WindowConfig(policy="document", context=3, min_context=2, stride=1)
    ws = make_windows(bank, "train", cfg)
    # Brute force: every position p >= 2 in each train document is a target.
    expected = []
    for r in bank.split_rows("train"):
        if bank.positions[r] >= 2:
            expected.append(r)
    assert ws.target_rows.tolist() == expected
    assert np.all(ws.lengths == np.minimum(bank.positions[ws.target_rows], 3))


def test_stream_windows_cross_documents_but_not_splits():
    bank = tiny_bank()
    ws = make_windows(bank, "train", WindowConfig(policy="stream", context=6, min_context=6))
    crosses = [len(set(bank.doc_ids[np.r_[ws.context_rows(i), ws.target_rows[i]]])) > 1
               for i in range(len(ws))]
    assert any(crosses)
    check_windows(bank, ws)


def test_leakage_check_fails_loudly():
    bank = tiny_bank()
    ws = make_windows(bank, "val", WindowConfig(policy="document", context=3, min_context=1))
    # A forged window whose rows include another split's rows.
    bad = WindowSet("val", np.arange(len(bank)), ws.start, ws.end, 3, "document")
    with pytest.raises(LeakageError):
        check_windows(bank, bad)
    long = WindowSet("val", ws.rows, np.zeros_like(ws.start), ws.end, 3, "document")
    with pytest.raises(LeakageError):
        check_windows(bank, long)


def test_stride_and_min_context():
    bank = tiny_bank()
    ws = make_windows(bank, "train", WindowConfig(policy="document", context=8, min_context=3,
                                                  stride=2))
    pos = bank.positions[ws.target_rows]
    assert np.all(pos >= 3) and np.all((pos - 3) % 2 == 0)


def test_gather_batch_is_right_padded_and_exact():
    bank = tiny_bank()
    ws = make_windows(bank, "train", WindowConfig(policy="document", context=4, min_context=1))
    idx = np.arange(min(6, len(ws)))
    ctx, lengths, target, last = gather_batch(bank.vectors, ws, idx)
    for b, i in enumerate(idx):
        rows = ws.context_rows(i)
        assert lengths[b] == len(rows)
        np.testing.assert_array_equal(ctx[b, : len(rows)], bank.vectors[rows])
        assert np.all(ctx[b, len(rows):] == 0)
        np.testing.assert_array_equal(target[b], bank.vectors[ws.target_rows[i]])
        np.testing.assert_array_equal(last[b], bank.vectors[rows[-1]])


def test_documents_too_short_for_a_window_are_counted_and_reported(capsys):
    from lvm_ray.config import load_config
    from lvm_ray.data.windows import short_documents
    from lvm_ray.workflows.prepare import prepare_windows

    bank = tiny_bank(doc_lens=(2, 3, 9, 1, 12))  # min_context 2: documents of 1 and 2 concepts give no window
    cfg = WindowConfig(context=4, min_context=2)
    assert short_documents(bank, cfg) == (2, 3)
    assert short_documents(bank, WindowConfig(context=4, min_context=2, policy="stream")) == (0, 0)
    prepare_windows(load_config(overrides={"window": {"context": 4, "min_context": 2}}), bank)
    assert "2 document(s), 3 concept(s) in all" in capsys.readouterr().out
