"""lvm_ray.eval.metrics against brute-force double-loop references on tiny seeded data."""

import faiss
import numpy as np
import pytest

from lvm_ray.config import EvalConfig, WindowConfig
from lvm_ray.data.bank import ConceptBank
from lvm_ray.data.windows import make_windows
from lvm_ray.eval import metrics as mt


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_bank(n_docs=40, min_len=20, max_len=60, d=32, seed=0):
    """Documents with random unit vectors; doc i goes to train/val/test by i % 5 (3/1/1)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(min_len, max_len + 1, n_docs)
    n = int(lens.sum())
    split_of = np.array(["train", "train", "train", "val", "test"], dtype=object)
    return ConceptBank(
        doc_ids=np.repeat(np.array([f"d{i:03d}" for i in range(n_docs)], dtype=object), lens),
        positions=np.concatenate([np.arange(k) for k in lens]).astype(np.int32),
        texts=np.array([""] * n, dtype=object),
        vectors=unit(rng.standard_normal((n, d))),
        splits=np.repeat(split_of[np.arange(n_docs) % 5], lens),
        lanes=rng.integers(-1, 3, n).astype(np.int16),
    )


def noisy(y, scale, seed):
    return unit(y + scale * np.random.default_rng(seed).standard_normal(y.shape))


# ----------------------------------------------------------------------------- simple values


def test_cosine_and_margin_match_loops():
    rng = np.random.default_rng(1)
    p, y, x = (unit(rng.standard_normal((17, 8))) for _ in range(3))
    ref_cos = [float(p[i] @ y[i]) for i in range(17)]
    ref_margin = [float(p[i] @ y[i] - p[i] @ x[i]) for i in range(17)]
    np.testing.assert_allclose(mt.cosine(p, y), ref_cos, atol=1e-6)
    np.testing.assert_allclose(mt.margin(p, y, x), ref_margin, atol=1e-6)


def test_copy_last_margin_is_negative_on_distinct_vectors():
    rng = np.random.default_rng(2)
    x, y = unit(rng.standard_normal((500, 32))), unit(rng.standard_normal((500, 32)))
    m = mt.margin(x, y, x)
    assert np.all(m < 0)
    np.testing.assert_allclose(m, np.sum(x * y, axis=1) - 1, atol=1e-6)


def test_mrr_and_hits_from_ranks():
    ranks = np.array([1, 2, 5, 6, 100])
    np.testing.assert_allclose(mt.mrr_values(ranks), [1 / r for r in ranks])
    assert mt.hits_from_ranks(ranks, 5).tolist() == [1, 1, 1, 0, 0]
    with pytest.raises(ValueError):
        mt.mrr_values(np.array([0, 1]))


# ----------------------------------------------------------------------------- pool hits


def brute_pool_hits(p, y, k):
    m = len(p)
    out = np.zeros(m)
    for i in range(m):
        ahead = sum(1 for j in range(m) if float(p[i] @ y[j]) > float(p[i] @ y[i]))
        out[i] = ahead < k
    return out


def test_pool_hits_full_pool_matches_bruteforce_with_a_tie():
    rng = np.random.default_rng(3)
    y = unit(rng.standard_normal((40, 8)))
    y[5] = y[3]  # an exact duplicate target: ties go to the target
    p = noisy(y, 0.6, 4)
    got = mt.pool_hits(p, y, ks=(1, 3, 10))
    for k in (1, 3, 10):
        np.testing.assert_array_equal(got[k], brute_pool_hits(p, y, k))
    perfect = mt.pool_hits(y, y, ks=(1,))[1]
    assert perfect[3] == 1 and perfect[5] == 1 and perfect.mean() == 1


def test_fixed_pool_equal_to_m_is_the_full_pool():
    rng = np.random.default_rng(5)
    y = unit(rng.standard_normal((30, 8)))
    p = noisy(y, 0.8, 6)
    full = mt.pool_hits(p, y, ks=(1, 5))
    fixed = mt.pool_hits(p, y, ks=(1, 5), pool_size=30, rounds=3)
    for k in (1, 5):
        np.testing.assert_array_equal(full[k], fixed[k])


def test_fixed_pool_scores_every_window_each_round_with_a_remainder():
    rng = np.random.default_rng(7)
    y = unit(rng.standard_normal((103, 16)))  # 103 = 4 * 25 + 3: a short last pool each round
    got = mt.pool_hits(noisy(y, 1.0, 8), y, ks=(1,), pool_size=25, rounds=4)[1]
    np.testing.assert_allclose(got * 4, np.round(got * 4))  # each window scored exactly 4 times
    assert np.all(mt.pool_hits(y, y, ks=(1,), pool_size=25, rounds=4)[1] == 1)
    with pytest.raises(ValueError, match="exceeds"):
        mt.pool_hits(y, y, ks=(1,), pool_size=104)


def test_fixed_pool_random_predictions_hit_at_chance():
    # The per-window hit probability varies a lot between windows, so the mean's sd is about
    # sqrt(c / M) = 0.0015 here; 0.0045 is 3 sd and still rejects a pool of 100 (5/100).
    rng = np.random.default_rng(9)
    y, p = unit(rng.standard_normal((20000, 32))), unit(rng.standard_normal((20000, 32)))
    got = mt.pool_hits(p, y, ks=(5,), pool_size=115, rounds=10, seed=0)[5].mean()
    assert abs(got - 5 / 115) < 0.0045, got


# ----------------------------------------------------------------------------- bank ranks


def brute_rank(p, target, vectors, candidates, excluded):
    t = float(p @ vectors[target])
    ex = set(int(e) for e in excluded) - {int(target)}
    return 1 + sum(1 for c in candidates
                   if c not in ex and c != target and float(p @ vectors[c]) > t)


def test_bank_ranks_with_exclusions_match_bruteforce():
    rng = np.random.default_rng(10)
    vectors = unit(rng.standard_normal((300, 16)))
    cand = np.sort(rng.choice(300, 200, replace=False))
    targets = rng.choice(cand, 30)
    targets[0] = np.setdiff1d(np.arange(300), cand)[0]  # a target outside the candidates
    pred = noisy(vectors[targets], 1.0, 11)
    # Excluded sets mix candidates, non-candidates and (once) the target itself.
    exclude = [rng.choice(300, rng.integers(0, 40), replace=False) for _ in range(30)]
    exclude[1] = np.append(exclude[1], targets[1])
    ref = [brute_rank(pred[i], targets[i], vectors, cand, exclude[i]) for i in range(30)]
    got = mt.bank_ranks(pred, targets, vectors, cand, exclude=exclude, block=7)
    np.testing.assert_array_equal(got, ref)
    no_ex = [brute_rank(pred[i], targets[i], vectors, cand, []) for i in range(30)]
    np.testing.assert_array_equal(mt.bank_ranks(pred, targets, vectors, cand), no_ex)
    assert np.any(got < np.array(no_ex))  # the exclusions mattered


def test_bank_ranks_for_windows_excludes_the_context():
    bank = make_bank(n_docs=10, min_len=10, max_len=20, d=16)
    ws = make_windows(bank, "train", WindowConfig(context=8, min_context=2))
    last = bank.vectors[ws.last_rows]
    ranks = mt.bank_ranks_for_windows(last, bank.vectors, ws, block=13)
    ref = [brute_rank(last[i], ws.target_rows[i], bank.vectors, ws.rows, ws.context_rows(i))
           for i in range(len(ws))]
    np.testing.assert_array_equal(ranks, ref)
    # Without the exclusion copy-last would always find its own last vector first.
    plain = mt.bank_ranks(last, ws.target_rows, bank.vectors, ws.rows)
    assert np.all(plain >= 2) and np.all(ranks <= plain)


def test_exact_duplicate_of_the_target_ranks_equal():
    rng = np.random.default_rng(12)
    vectors = unit(rng.standard_normal((50, 8)))
    vectors[7] = vectors[3]
    ranks = mt.bank_ranks(vectors[[3, 7]], np.array([3, 7]), vectors, np.arange(50))
    assert ranks.tolist() == [1, 1]


def test_bank_hits_agree_with_faiss_topk():
    bank = make_bank(n_docs=40, d=32, seed=13)
    rng = np.random.default_rng(14)
    targets = rng.choice(len(bank), 500, replace=False)
    pred = noisy(bank.vectors[targets], 0.35, 15)
    ranks = mt.bank_ranks(pred, targets, bank.vectors, np.arange(len(bank)))
    index = faiss.IndexFlatIP(bank.dim)  # an independent exact search to compare against
    index.add(bank.vectors)
    _, ids = index.search(pred, 10)
    for k in (1, 5, 10):
        faiss_hit = (ids[:, :k] == targets[:, None]).any(axis=1)
        np.testing.assert_array_equal(mt.hits_from_ranks(ranks, k).astype(bool), faiss_hit)
    assert 0.05 < mt.hits_from_ranks(ranks, 1).mean() < 0.95  # a non-trivial mix


# ----------------------------------------------------------------------------- CA


def brute_ca(p, y, docs, pos):
    m = len(p)
    out = np.zeros(m)
    for i in range(m):
        d_true = np.linalg.norm(p[i] - y[i])
        pool = [j for j in range(m)
                if j != i and not (docs[j] == docs[i] and abs(pos[j] - pos[i]) <= 1)]
        out[i] = np.mean([np.linalg.norm(p[i] - y[j]) > d_true for j in pool])
    return out


def test_ca_matches_bruteforce_with_neighbour_exclusion():
    bank = make_bank(n_docs=6, min_len=8, max_len=14, d=8, seed=16)
    ws = make_windows(bank, "train", WindowConfig(context=4, min_context=1))
    tr = ws.target_rows
    y = bank.vectors[tr]
    p = noisy(y, 1.5, 17)
    docs, pos = bank.doc_ids[tr], bank.positions[tr]
    got = mt.contrastive_accuracy(p, y, docs, pos, block=5)
    np.testing.assert_allclose(got, brute_ca(p, y, docs, pos), atol=1e-12)
    # The neighbour exclusion changes the answer for a prediction equal to the next neighbour.
    nb = y.copy()
    nb[:-1] = y[1:]
    assert not np.allclose(mt.contrastive_accuracy(nb, y, docs, pos),
                           mt.contrastive_accuracy(nb, y, np.arange(len(y)), pos))


def test_ca_random_is_half_and_perfect_is_one():
    bank = make_bank(n_docs=60, d=32, seed=18)
    ws = make_windows(bank, "train", WindowConfig(context=8))
    tr = ws.target_rows
    y = bank.vectors[tr]
    rand = unit(np.random.default_rng(19).standard_normal(y.shape))
    ca = mt.contrastive_accuracy(rand, y, bank.doc_ids[tr], bank.positions[tr]).mean()
    assert abs(ca - 0.5) < 0.02, ca
    assert mt.contrastive_accuracy(y, y, bank.doc_ids[tr], bank.positions[tr]).min() == 1.0


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_mean_and_shrinks():
    rng = np.random.default_rng(20)
    small, big = rng.random(200) < 0.3, rng.random(5000) < 0.3
    lo_s, hi_s = mt.bootstrap_ci(small.astype(float), n=500, seed=0)
    lo_b, hi_b = mt.bootstrap_ci(big.astype(float), n=500, seed=0)
    assert lo_s <= small.mean() <= hi_s and lo_b <= big.mean() <= hi_b
    assert (hi_b - lo_b) < 0.5 * (hi_s - lo_s)
    lo, hi = mt.bootstrap_cis(np.stack([small, ~small]).astype(float), n=500, seed=0)
    assert lo[0] == pytest.approx(lo_s) and hi[0] == pytest.approx(hi_s)


# ----------------------------------------------------------------------------- evaluate


CFG = EvalConfig(ks=(1, 5), pool_size=20, bootstrap=50, seed=0)


def expected_keys(n_fixed=20, ks=(1, 5)):
    keys = {"n_windows", "bank_size", "pool_size_full", "pool_size_fixed", "cosine"}
    ci = ["mrr", "ca", "par", "margin"]
    for k in ks:
        ci += [f"bank_hit@{k}", f"pool_hit@{k}", f"pool{n_fixed}_hit@{k}"]
        keys |= {f"bank_chance@{k}", f"pool_chance@{k}", f"pool{n_fixed}_chance@{k}"}
    return keys | set(ci) | {f"{c}_lo" for c in ci} | {f"{c}_hi" for c in ci}


def test_evaluate_perfect_predictor_and_keys():
    bank = make_bank(seed=21)
    ws = make_windows(bank, "val", WindowConfig(context=8))
    s = mt.evaluate(bank.vectors[ws.target_rows], ws, bank, CFG)
    assert set(s) == expected_keys()
    assert s["n_windows"] == len(ws) and s["bank_size"] == len(ws.rows)
    assert s["bank_hit@1"] == 1 and s["ca"] == 1 and s["pool_hit@1"] == 1 and s["mrr"] == 1
    assert s["pool20_chance@5"] == 5 / 20 and s["pool_chance@5"] == 5 / len(ws)
    assert all(isinstance(v, (int, float)) for v in s.values())


def test_evaluate_copy_last_and_random():
    bank = make_bank(seed=22)
    ws = make_windows(bank, "val", WindowConfig(context=8))
    s, per = mt.evaluate_detailed(bank.vectors[ws.last_rows], ws, bank, CFG)
    assert np.all(per["margin"] < 0) and s["margin"] < 0
    for key in ("bank_hit@5", "ca", "mrr"):
        assert s[f"{key}_lo"] <= s[key] <= s[f"{key}_hi"]
    rand = unit(np.random.default_rng(23).standard_normal((len(ws), bank.dim)))
    r = mt.evaluate(rand, ws, bank, CFG)
    assert r["bank_hit@5"] < 0.1 and abs(r["ca"] - 0.5) < 0.1
    small = EvalConfig(ks=(5,), pool_size=len(ws) + 1, bootstrap=0)
    r = mt.evaluate(rand, ws, bank, small)
    assert "pool_size_fixed" not in r and "bank_hit@5_lo" not in r and "pool_hit@5" in r
    with pytest.raises(ValueError, match="pred must be"):
        mt.evaluate(rand[:-1], ws, bank, CFG)


def test_select_score_matches_evaluate():
    bank = make_bank(seed=24)
    ws = make_windows(bank, "val", WindowConfig(context=8))
    pred = noisy(bank.vectors[ws.target_rows], 0.4, 25)
    s = mt.evaluate(pred, ws, bank, CFG)
    assert mt.select_key("pool_hit@5", 20) == "pool20_hit@5"
    for metric in ("bank_hit@5", "pool_hit@5", "mrr", "ca", "cosine"):
        key = mt.select_key(metric, CFG.pool_size)
        assert mt.select_score(pred, ws, bank, CFG, metric) == pytest.approx(s[key])
    with pytest.raises(ValueError, match="fixed pool"):
        mt.select_key("pool_hit@5", None)


# ----------------------------------------------------------------------------- PAR


def test_par_matches_bruteforce_and_flags_copying():
    bank = make_bank(n_docs=6, min_len=10, max_len=30, d=16, seed=21)
    ws = make_windows(bank, "train", WindowConfig(context=7, min_context=2))
    target, last = bank.vectors[ws.target_rows], bank.vectors[ws.last_rows]
    pred = noisy(target, 0.5, 22)
    got = mt.par_values(pred, target, bank.vectors, ws, budget=50)  # many tiny blocks
    checked = 0
    for i in range(len(ws)):
        ctx = bank.vectors[ws.context_rows(i)]
        best_p, best_y = (ctx @ pred[i]).max(), (ctx @ target[i]).max()
        if best_y <= 0:
            assert np.isnan(got[i])  # no ratio without a positive cosine to the context
        elif best_y > 0.05:  # (tiny denominators amplify float32 rounding)
            assert got[i] == pytest.approx(best_p / best_y, rel=1e-4)
            checked += 1
    assert checked > len(ws) // 2
    copy = mt.par_values(last, target, bank.vectors, ws)
    finite = np.isfinite(copy)
    # Copying the last vector reaches cosine 1 with the context: PAR = 1 / the truth's best.
    np.testing.assert_allclose(copy[finite], 1 / np.array(
        [(bank.vectors[ws.context_rows(i)] @ target[i]).max() for i in np.flatnonzero(finite)]),
        rtol=1e-3)
    assert np.all(copy[finite] >= 1 - 1e-6)
    summary = mt.evaluate(pred, ws, bank, EvalConfig(bootstrap=50))
    assert summary["par_lo"] <= summary["par"] <= summary["par_hi"]
