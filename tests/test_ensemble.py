"""Ensembles: fusion math against the protocol's ranks, an ensemble of one checkpoint equals that
checkpoint, fused scores are deterministic, weights come from val only, and the Ray-free serving
predictor continues sessions exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lvm_ray.config import ModelConfig, WindowConfig, load_config
from lvm_ray.data.bank import save_bank
from lvm_ray.data.synthetic import make_synthetic_bank
from lvm_ray.data.windows import make_windows
from lvm_ray.eval import ensemble as ens
from lvm_ray.eval.metrics import bank_ranks_for_windows, hits_from_ranks, l2n
from lvm_ray.model import build_model
from lvm_ray.predictor import Predictor
from lvm_ray.serve.fusion import EnsemblePredictor, read_spec
from lvm_ray.train.checkpoint import load_checkpoint, save_checkpoint

D = 32


@pytest.fixture(scope="module")
def bank():
    return make_synthetic_bank(n_docs=30, doc_len=(30, 50), dim=D, seed=5)


def noisy_preds(bank, ws, n, seed=0, noise=1.5):
    """n members' predictions: the target plus member-specific noise (so fusion helps)."""
    rng = np.random.default_rng(seed)
    y = bank.vectors[ws.target_rows]
    return [l2n(y + noise * rng.standard_normal(y.shape).astype(np.float32) / np.sqrt(D))
            for _ in range(n)]


def test_weight_grid_is_the_simplex():
    for n, size in ((1, 1), (2, 11), (3, 66)):
        g = ens.weight_grid(n)
        assert g.shape == (size, n) and np.allclose(g.sum(1), 1) and (g >= 0).all()
        assert len({tuple(r) for r in g}) == size
    with pytest.raises(ValueError):
        ens.weight_grid(2, step=0.3)


def test_ensemble_of_one_equals_the_member(bank):
    ws = make_windows(bank, "test", WindowConfig(context=8))
    (p,) = noisy_preds(bank, ws, 1)
    np.testing.assert_allclose(ens.fuse_vectors([p]), p, atol=1e-6)
    ranks = bank_ranks_for_windows(p, bank.vectors, ws)
    lists = [ens.member_lists(p, bank.vectors, ws)]
    fused = ens.rrf_ranks(lists, ws)
    for k in (1, 5, 10):
        np.testing.assert_array_equal(fused <= k, ranks <= k)
    inside = np.isfinite(fused)
    np.testing.assert_array_equal(fused[inside], ranks[inside])
    assert np.all(ranks[~inside] > ens.RRF_DEPTH)


def test_score_grid_equals_ranking_the_fused_vector(bank):
    ws = make_windows(bank, "val", WindowConfig(context=8))
    preds = noisy_preds(bank, ws, 3)
    grid = ens.weight_grid(3, step=0.25)
    got = ens.score_grid_hits(preds, bank.vectors, ws, grid, k=5)
    want = [hits_from_ranks(bank_ranks_for_windows(ens.fuse_vectors(preds, w), bank.vectors, ws),
                            5).mean() for w in grid]
    np.testing.assert_allclose(got, want, atol=1.5 / len(ws))  # a float tie at most
    # Fusing independent noisy members beats each member alone.
    assert got[np.argmax(got)] > max(got[i] for i in range(len(grid)) if grid[i].max() == 1)


def test_rrf_grid_matches_rrf_ranks_and_fusion_is_deterministic(bank):
    ws = make_windows(bank, "val", WindowConfig(context=8))
    preds = noisy_preds(bank, ws, 2, seed=1)
    lists = [ens.member_lists(p, bank.vectors, ws) for p in preds]
    again = [ens.member_lists(p, bank.vectors, ws) for p in preds]
    assert all(np.array_equal(a, b) for a, b in zip(lists, again))
    grid = ens.weight_grid(2)
    hits = ens.rrf_grid_hits(lists, ws, grid)
    np.testing.assert_array_equal(hits, [np.mean(ens.rrf_ranks(lists, ws, w) <= 5) for w in grid])
    np.testing.assert_array_equal(ens.rrf_ranks(lists, ws, [0.3, 0.7]),
                                  ens.rrf_ranks(again, ws, [0.3, 0.7]))
    np.testing.assert_array_equal(ens.fuse_vectors(preds, [0.3, 0.7]),
                                  ens.fuse_vectors(preds, [0.3, 0.7]))
    for fusion in ens.FUSIONS:
        assert np.array_equal(ens.choose_weights(fusion, preds, bank.vectors, ws)[0],
                              ens.choose_weights(fusion, preds, bank.vectors, ws)[0])


def test_weights_are_chosen_on_val_only(bank):
    test_ws = make_windows(bank, "test", WindowConfig(context=8))
    with pytest.raises(ValueError, match="val"):
        ens.choose_weights("score", noisy_preds(bank, test_ws, 2), bank.vectors, test_ws)


# ----------------------------------------------------------------------------- checkpoints


def make_members(root, n=2):
    """Random-init checkpoints (a MemoryGRU and a GRU) with a wide-awake head."""
    paths = []
    for i, kind in enumerate(["memory_gru", "gru", "memory_gru"][:n]):
        cfg = ModelConfig(kind=kind, d_in=D, hidden=16, layers=1, slots=4)
        torch.manual_seed(i)
        model = build_model(cfg)
        with torch.no_grad():
            model.head[-1].weight.normal_(0, 0.2)
        paths.append(save_checkpoint(root / f"m{i}", model, cfg, epoch=0, metrics={},
                                     config={"window": {"context": 8}, "run": {"name": f"m{i}"}}))
    return paths


def test_evaluate_ensembles_weights_ignore_the_test_split(bank, tmp_path):
    from lvm_ray.workflows.ensemble import evaluate_ensembles

    paths = [str(p) for p in make_members(tmp_path)]
    moved = make_synthetic_bank(n_docs=30, doc_len=(30, 50), dim=D, seed=5)
    test = moved.split_rows("test")
    moved.vectors[test] = l2n(np.random.default_rng(9).standard_normal((len(test), D)))
    records = {}
    for name, b in (("orig", bank), ("moved", moved)):
        save_bank(b, tmp_path / f"{name}.parquet")
        cfg = load_config(overrides={
            "corpus": {"source": "bank"}, "bank_path": str(tmp_path / f"{name}.parquet"),
            "window": {"context": 8}, "eval": {"lanes": 4, "bootstrap": 50}})
        out = evaluate_ensembles({"pair": paths}, cfg, out_dir=tmp_path / name, step=0.25)
        records[name] = out["records"][0]
        assert {"pair (score)", "pair (rrf)", "m0", "m1"} <= set(out["results"])
        assert any(k.startswith("context-mean") for k in out["results"])
    for fusion in ens.FUSIONS:
        assert records["orig"]["fusions"][fusion]["weights"] == \
            records["moved"]["fusions"][fusion]["weights"]
    spec = read_spec(tmp_path / "orig" / "pair")
    assert [m["name"] for m in spec["members"]] == ["m0", "m1"]
    assert spec["weights_chosen_on"] == "val"
    assert (tmp_path / "orig" / "pair" / "lanes.json").is_file()


def test_one_checkpoint_spec_serves_like_the_checkpoint(bank, tmp_path):
    (path,) = make_members(tmp_path, 1)
    ref = Predictor(load_checkpoint(path), bank, device="cpu")
    one = EnsemblePredictor(read_spec(path), bank, device="cpu")
    ctx = [bank.vectors[:7], bank.vectors[10:30]]
    for a, b in zip(ref.predict_batch(ctx, k=5), one.predict_batch(ctx, k=5)):
        np.testing.assert_allclose(a.vector, b.vector, atol=1e-6)
        assert [n.concept_id for n in a.neighbors] == [n.concept_id for n in b.neighbors]


@pytest.mark.parametrize("fusion", ens.FUSIONS)
def test_ensemble_sessions_continue_exactly(bank, tmp_path, fusion):
    paths = make_members(tmp_path, 2)
    doc = ens.ensemble_document("pair", [(f"m{i}", str(p)) for i, p in enumerate(paths)],
                                {fusion: [0.4, 0.6]}, {fusion: 0.0}, fusion)
    (tmp_path / "pair.json").write_text(json.dumps(doc))
    pred = EnsemblePredictor(read_spec(tmp_path / "pair.json"), bank, device="cpu")
    x = bank.vectors[40:48]  # within both members' trained context of 8
    full = pred.predict(x, k=5)
    h = last = None
    for chunk in (x[:3], x[3:4], x[4:]):
        (p, h, last), = pred.append_batch([chunk], [h], [last], k=5)
    assert h.shape == pred.state_shape and last.shape == (D,)
    np.testing.assert_allclose(p.vector, full.vector, atol=1e-5)
    assert [n.concept_id for n in p.neighbors] == [n.concept_id for n in full.neighbors]


def test_evaluate_ensembles_refuses_a_member_of_another_bank(bank, tmp_path):
    from lvm_ray.data.bank import BankMismatch
    from lvm_ray.train.checkpoint import load_checkpoint
    from lvm_ray.workflows.ensemble import evaluate_ensembles

    paths = [str(p) for p in make_members(tmp_path)]
    save_bank(bank, tmp_path / "bank.parquet")
    other = make_synthetic_bank(n_docs=30, doc_len=(30, 50), dim=D, seed=11)
    # m1 records the identity of another bank of the same shape.
    ck = load_checkpoint(paths[1])
    save_checkpoint(tmp_path / "m1b", ck.model, ck.model_config, epoch=0, metrics={},
                    config={"window": {"context": 8}, "run": {"name": "m1b"}},
                    data=other.identity())
    cfg = load_config(overrides={
        "corpus": {"source": "bank"}, "bank_path": str(tmp_path / "bank.parquet"),
        "window": {"context": 8}, "eval": {"lanes": 4, "bootstrap": 50}})
    with pytest.raises(BankMismatch, match="m1b"):
        evaluate_ensembles({"pair": [paths[0], str(tmp_path / "m1b")]}, cfg,
                           out_dir=tmp_path / "out")
