"""The metrics of ../shared/EVAL_PROTOCOL.md, on numpy arrays of unit vectors.

Predictions p_i and targets y_i are (M, D) float32 rows, one per window. Every pairwise metric is
blocked over windows, so memory stays O(block * pool) whatever M, the bank or the context length.
Ties count in the target's favour everywhere: only strictly better candidates rank ahead of it,
so an exact duplicate of the target (the same text twice) never costs a hit.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from lvm_ray.config import EvalConfig
from lvm_ray.data.bank import ConceptBank
from lvm_ray.data.windows import WindowSet

BLOCK = 256  # windows scored per matmul block


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, target = _f32(pred), _f32(target)
    if pred.ndim != 2 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be (M, D); got {pred.shape}, {target.shape}")
    return pred, target


def l2n(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation. (M, D) float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


# ----------------------------------------------------------------------------- per-window values


def cosine(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """cos(p_i, y_i). (M,) float64."""
    pred, target = _check_pair(pred, target)
    num = np.einsum("md,md->m", pred, target, dtype=np.float64)
    den = np.linalg.norm(pred, axis=1).astype(np.float64) * np.linalg.norm(target, axis=1)
    return num / np.maximum(den, 1e-12)


def margin(pred: np.ndarray, target: np.ndarray, last: np.ndarray) -> np.ndarray:
    """cos(p_i, y_i) - cos(p_i, x_last,i). (M,) float64; copy-last gives cos(x_last, y) - 1 < 0."""
    return cosine(pred, target) - cosine(pred, last)


def par_values(pred: np.ndarray, target: np.ndarray, bank_vectors: np.ndarray, ws: WindowSet,
               budget: int = 4_000_000) -> np.ndarray:
    """PAR (Meta's Large Concept Model paper): max_j cos(p_i, x_j) / max_j cos(y_i, x_j) over
    window i's context x_j. Above 1: the prediction sits closer to something it was shown than
    the truth does, i.e. it leans toward copying its context. (M,) float64; NaN where the truth's
    best context cosine is <= 0 (no ratio). Blocked so a block's gathered contexts hold about
    `budget` floats whatever L is."""
    pred, target = _check_pair(pred, target)
    m, d = pred.shape
    out = np.full(m, np.nan)
    lengths = ws.lengths
    step = max(1, budget // max(1, int(lengths.max(initial=1)) * d))
    for a in range(0, m, step):
        idx = np.arange(a, min(a + step, m))
        t = int(lengths[idx].max())
        offs = np.arange(t)
        valid = offs[None, :] < lengths[idx, None]  # (B, T)
        pos = np.where(valid, ws.start[idx, None] + offs[None, :], ws.start[idx, None])
        ctx = bank_vectors[ws.rows[pos]]  # (B, T, D)
        best_p = np.where(valid, np.einsum("btd,bd->bt", ctx, pred[idx]), -np.inf).max(axis=1)
        best_y = np.where(valid, np.einsum("btd,bd->bt", ctx, target[idx]), -np.inf).max(axis=1)
        out[idx] = np.where(best_y > 0, best_p / np.maximum(best_y, 1e-12), np.nan)
    return out


def hits_from_ranks(ranks: np.ndarray, k: int) -> np.ndarray:
    """1.0 where the 1-based rank is within the top k. (M,) float64."""
    return (np.asarray(ranks) <= k).astype(np.float64)


def mrr_values(ranks: np.ndarray) -> np.ndarray:
    """Reciprocal rank per window. (M,) float64."""
    ranks = np.asarray(ranks)
    if np.any(ranks < 1):
        raise ValueError("ranks are 1-based; got a rank < 1")
    return 1.0 / ranks.astype(np.float64)


# ----------------------------------------------------------------------------- pool-Hit@K


def _pool_greater(pred: np.ndarray, target: np.ndarray, pools: np.ndarray) -> np.ndarray:
    """pools (G, N) window indices; for each pool member i, #{j in pool: p_i.y_j > p_i.y_i}.
    Returns (G, N) int64."""
    g, n = pools.shape
    out = np.empty((g, n), dtype=np.int64)
    step = max(1, 4_000_000 // (n * n))  # keeps the (step, N, N) score block near 16 MB
    for a in range(0, g, step):
        idx = pools[a : a + step]  # (G', N)
        s = np.matmul(pred[idx], target[idx].transpose(0, 2, 1))  # (G', N, N)
        diag = np.diagonal(s, axis1=1, axis2=2)[..., None]  # (G', N, 1)
        out[a : a + step] = (s > diag).sum(axis=2)
    return out


def pool_hits(pred: np.ndarray, target: np.ndarray, ks: Sequence[int],
              pool_size: int | None = None, rounds: int = 10, seed: int = 0
              ) -> dict[int, np.ndarray]:
    """The seed's metric: rank p_i against the pool of targets {y_j}; a hit if y_i is in the top k.

    pool_size=None uses the full pool of all M windows. pool_size=N shuffles the windows into
    pools of N, `rounds` times; the last, short pool of each round is topped up with windows drawn
    from the full pools (scored only for its own members), so every window is scored exactly
    `rounds` times and its value is its mean hit. Returns {k: (M,) float64}."""
    pred, target = _check_pair(pred, target)
    m = len(pred)
    if pool_size is None:
        greater = np.empty(m, dtype=np.int64)
        for a in range(0, m, BLOCK):
            s = pred[a : a + BLOCK] @ target.T  # (B, M)
            diag = s[np.arange(len(s)), np.arange(a, a + len(s))]
            greater[a : a + BLOCK] = (s > diag[:, None]).sum(axis=1)
        return {k: (greater < k).astype(np.float64) for k in ks}
    if pool_size > m:
        raise ValueError(f"pool_size={pool_size} exceeds the number of windows M={m}")
    if pool_size < 1 or rounds < 1:
        raise ValueError("pool_size and rounds must be >= 1")
    rng = np.random.default_rng(seed)
    n_full = m // pool_size
    hit_sum = {k: np.zeros(m) for k in ks}
    for _ in range(rounds):
        perm = rng.permutation(m)
        full = perm[: n_full * pool_size].reshape(n_full, pool_size)
        greater = _pool_greater(pred, target, full)  # (n_full, N)
        for k in ks:
            hit_sum[k][full.ravel()] += (greater < k).ravel()  # indices are unique per round
        rest = perm[n_full * pool_size :]
        if len(rest):
            fill = rng.choice(full.ravel(), size=pool_size - len(rest), replace=False)
            pool = np.concatenate([rest, fill])[None]  # (1, N)
            g = _pool_greater(pred, target, pool)[0, : len(rest)]
            for k in ks:
                hit_sum[k][rest] += g < k
    return {k: v / rounds for k, v in hit_sum.items()}


# ----------------------------------------------------------------------------- bank ranks


def _as_ranges(exclude, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Normalise `exclude` to (starts, ends, rows): window i excludes rows[starts[i]:ends[i]]."""
    if exclude is None:
        return None
    if isinstance(exclude, tuple) and len(exclude) == 3:
        starts, ends, rows = (np.asarray(a, dtype=np.int64) for a in exclude)
    else:
        parts = [np.unique(np.asarray(e, dtype=np.int64)) for e in exclude]
        lens = np.array([len(p) for p in parts], dtype=np.int64)
        ends = np.cumsum(lens)
        starts = ends - lens
        rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if starts.shape != (m,) or ends.shape != (m,):
        raise ValueError(f"exclude must describe M={m} windows; got {starts.shape[0]}")
    return starts, ends, rows


def bank_ranks(pred: np.ndarray, target_rows: np.ndarray, bank_vectors: np.ndarray,
               candidate_rows: np.ndarray, exclude=None, block: int = BLOCK) -> np.ndarray:
    """1-based rank of each target among the candidate bank rows by inner product.

    rank_i = 1 + #{c in candidates, c not excluded for i, c != target_i, p_i.v_c > p_i.v_target}.
    Strict > on purpose: an exact duplicate of the target (the same text twice) ranks equal and
    the tie goes to the target. `exclude` is None, a list of M row arrays, or (starts, ends, rows)
    meaning window i excludes rows[starts[i]:ends[i]] (a WindowSet's contexts, without copies).
    Blocked: each block is one (block, C) matmul, then the excluded rows it counted are subtracted.
    Returns (M,) int64."""
    pred = _f32(pred)
    target_rows = np.asarray(target_rows, dtype=np.int64)
    candidate_rows = np.asarray(candidate_rows, dtype=np.int64)
    m, n_all = len(pred), len(bank_vectors)
    if pred.ndim != 2 or pred.shape[1] != bank_vectors.shape[1] or target_rows.shape != (m,):
        raise ValueError(f"expected pred (M, D={bank_vectors.shape[1]}) and target_rows (M,); "
                         f"got {pred.shape} and {target_rows.shape}")
    col = np.full(n_all, -1, dtype=np.int64)  # bank row -> candidate column, -1 if not a candidate
    col[candidate_rows] = np.arange(len(candidate_rows))
    if np.count_nonzero(col >= 0) != len(candidate_rows):
        raise ValueError("candidate_rows must be unique")
    cand = _f32(bank_vectors[candidate_rows])  # (C, D)
    ranges = _as_ranges(exclude, m)
    ranks = np.empty(m, dtype=np.int64)
    for a in range(0, m, block):
        p = pred[a : a + block]  # (B, D)
        b = len(p)
        tgt = target_rows[a : a + b]
        s = p @ cand.T  # (B, C)
        tcol = col[tgt]
        # Read the target's score from the same matmul when it is a candidate, so the comparison
        # is exact; otherwise compute it directly.
        t = np.where(tcol >= 0, s[np.arange(b), np.maximum(tcol, 0)],
                     np.einsum("bd,bd->b", p, _f32(bank_vectors[tgt])))
        greater = (s > t[:, None]).sum(axis=1)
        if ranges is not None:
            starts, ends, rows = ranges[0][a : a + b], ranges[1][a : a + b], ranges[2]
            lens = ends - starts
            win = np.repeat(np.arange(b), lens)  # (E,) window of each excluded row
            offs = np.arange(len(win)) - np.repeat(np.cumsum(lens) - lens, lens)
            ex = rows[np.repeat(starts, lens) + offs]  # (E,) excluded bank rows
            ecol = col[ex]
            # Only candidates were counted. An excluded target needs no guard: its own score is
            # never > t, so it was never counted and is never subtracted.
            keep = ecol >= 0
            win, ecol = win[keep], ecol[keep]
            counted = s[win, ecol] > t[win]
            greater -= np.bincount(win[counted], minlength=b)
        ranks[a : a + b] = 1 + greater
    return ranks


def bank_ranks_for_windows(pred: np.ndarray, bank_vectors: np.ndarray, ws: WindowSet,
                           block: int = BLOCK) -> np.ndarray:
    """bank_ranks with the protocol's choices: candidates = the split's bank rows (ws.rows),
    excluded = each window's own context rows. (M,) int64."""
    return bank_ranks(pred, ws.target_rows, bank_vectors, ws.rows,
                      exclude=(ws.start, ws.end, ws.rows), block=block)


# ----------------------------------------------------------------------------- CA


def contrastive_accuracy(pred: np.ndarray, target: np.ndarray, doc_ids: np.ndarray,
                         positions: np.ndarray, block: int = 512) -> np.ndarray:
    """Per window: the fraction of pool targets y_j with ||p_i - y_j|| > ||p_i - y_i||.

    The pool is every other window's target, minus targets in the same document within one
    position of y_i (its two neighbours, and any window sharing its target). Targets are unit, so
    ||p - y||^2 = |p|^2 + 1 - 2 p.y and the distance test is p.y_j < p.y_i exactly. doc_ids and
    positions are those of the targets. Returns (M,) float64; NaN where the pool is empty."""
    pred, target = _check_pair(pred, target)
    m = len(pred)
    codes = np.unique(np.asarray(doc_ids), return_inverse=True)[1].reshape(-1)
    pos = np.asarray(positions, dtype=np.int64)
    if codes.shape != (m,) or pos.shape != (m,):
        raise ValueError(f"doc_ids and positions must be (M={m},)")
    out = np.empty(m)
    for a in range(0, m, block):
        s = pred[a : a + block] @ target.T  # (B, M)
        b = len(s)
        diag = s[np.arange(b), np.arange(a, a + b)]
        near = (codes[a : a + b, None] == codes[None, :]) & (
            np.abs(pos[a : a + b, None] - pos[None, :]) <= 1)  # includes j == i
        valid = ~near
        valid[np.arange(b), np.arange(a, a + b)] = False
        n = valid.sum(axis=1)
        wins = ((s < diag[:, None]) & valid).sum(axis=1)
        out[a : a + b] = np.where(n > 0, wins / np.maximum(n, 1), np.nan)
    return out


# ----------------------------------------------------------------------------- bootstrap


def bootstrap_cis(values: np.ndarray, n: int = 1000, seed: int = 0, alpha: float = 0.05
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap over windows for several metrics at once, with the same resamples.
    values (V, M) -> lo (V,), hi (V,)."""
    values = np.asarray(values, dtype=np.float64)
    v, m = values.shape
    if m == 0 or n < 1:
        return np.full(v, np.nan), np.full(v, np.nan)
    rng = np.random.default_rng(seed)
    means = np.empty((v, n))
    step = max(1, 8_000_000 // max(1, v * m))
    for a in range(0, n, step):
        idx = rng.integers(0, m, size=(min(step, n - a), m))  # (R, M)
        means[:, a : a + len(idx)] = values[:, idx].mean(axis=2)
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=1)
    return lo, hi


def bootstrap_ci(values: np.ndarray, n: int = 1000, seed: int = 0, alpha: float = 0.05
                 ) -> tuple[float, float]:
    """95% (by default) percentile bootstrap CI of the mean of per-window values (M,)."""
    lo, hi = bootstrap_cis(np.asarray(values, dtype=np.float64)[None], n, seed, alpha)
    return float(lo[0]), float(hi[0])


def paired_diff_ci(a: np.ndarray, b: np.ndarray, bootstrap: int = 1000, seed: int = 0
                   ) -> tuple[float, float, float]:
    """Mean of a - b over the same targets and its 95% bootstrap CI (targets resampled together,
    so what both models find easy or hard cancels out). Pairs with a NaN (CA's empty pool) are
    left out."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape and a.ndim == 1, (a.shape, b.shape)
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    lo, hi = bootstrap_cis(d[None], bootstrap, seed)
    return float(d.mean()), float(lo[0]), float(hi[0])


# ----------------------------------------------------------------------------- evaluate


def select_key(metric: str, pool_size: int | None) -> str:
    """The summary key a selection metric reads. "pool_hit@K" means the FIXED pool, because the
    protocol forbids selecting on a pool whose size depends on the trial (its M)."""
    mt = re.fullmatch(r"pool_hit@(\d+)", metric)
    if mt:
        if pool_size is None:
            raise ValueError(f"select metric {metric!r} needs eval.pool_size (a fixed pool)")
        return f"pool{pool_size}_hit@{mt.group(1)}"
    return metric


def _check_windows(pred: np.ndarray, ws: WindowSet, bank: ConceptBank) -> np.ndarray:
    pred = _f32(pred)
    if pred.shape != (len(ws), bank.dim):
        raise ValueError(f"pred must be (M={len(ws)}, D={bank.dim}), got {pred.shape}")
    if len(ws) == 0:
        raise ValueError(f"no windows to evaluate in split {ws.split!r}")
    return pred


def select_score(pred: np.ndarray, ws: WindowSet, bank: ConceptBank, cfg: EvalConfig,
                 metric: str | None = None) -> float:
    """Only the selection metric (cheap: early stopping, baseline selection). Supports
    bank_hit@K, pool_hit@K (fixed pool), poolN_hit@K, mrr, cosine, ca."""
    pred = _check_windows(pred, ws, bank)
    metric = metric or cfg.select_metric
    key = select_key(metric, cfg.pool_size)
    target = bank.vectors[ws.target_rows]
    if mt := re.fullmatch(r"bank_hit@(\d+)", key):
        return float(hits_from_ranks(bank_ranks_for_windows(pred, bank.vectors, ws),
                                     int(mt.group(1))).mean())
    if mt := re.fullmatch(r"pool(\d*)_hit@(\d+)", key):
        size = int(mt.group(1)) if mt.group(1) else None
        k = int(mt.group(2))
        return float(pool_hits(pred, target, [k], size, seed=cfg.seed)[k].mean())
    if key == "mrr":
        return float(mrr_values(bank_ranks_for_windows(pred, bank.vectors, ws)).mean())
    if key == "cosine":
        return float(cosine(pred, target).mean())
    if key == "ca":
        tr = ws.target_rows
        return float(np.nanmean(contrastive_accuracy(pred, target, bank.doc_ids[tr],
                                                     bank.positions[tr])))
    raise ValueError(f"unknown select metric {metric!r}")


def evaluate_detailed(pred: np.ndarray, ws: WindowSet, bank: ConceptBank, cfg: EvalConfig
                      ) -> tuple[dict, dict[str, np.ndarray]]:
    """evaluate() plus the per-window arrays behind it: "rank", "cosine", "margin", "ca", "par",
    "mrr", "bank_hit@k", "pool_hit@k" and (fixed pool) "pool{N}_hit@k", each (M,)."""
    pred = _check_windows(pred, ws, bank)
    m, tr = len(ws), ws.target_rows
    target, last = bank.vectors[tr], bank.vectors[ws.last_rows]
    ranks = bank_ranks_for_windows(pred, bank.vectors, ws)
    per: dict[str, np.ndarray] = {"rank": ranks, "cosine": cosine(pred, target),
                                  "margin": margin(pred, target, last), "mrr": mrr_values(ranks)}
    for k in cfg.ks:
        per[f"bank_hit@{k}"] = hits_from_ranks(ranks, k)
    for k, h in pool_hits(pred, target, cfg.ks).items():
        per[f"pool_hit@{k}"] = h
    fixed = cfg.pool_size is not None and cfg.pool_size <= m
    if fixed:
        for k, h in pool_hits(pred, target, cfg.ks, cfg.pool_size, seed=cfg.seed).items():
            per[f"pool{cfg.pool_size}_hit@{k}"] = h
    per["ca"] = contrastive_accuracy(pred, target, bank.doc_ids[tr], bank.positions[tr])
    per["par"] = par_values(pred, target, bank.vectors, ws)

    bank_size = len(ws.rows)
    summary: dict = {"n_windows": int(m), "bank_size": int(bank_size), "pool_size_full": int(m)}
    if fixed:
        summary["pool_size_fixed"] = int(cfg.pool_size)
    with_ci = [key for key in per if key not in ("rank", "cosine")]
    for key in ["cosine"] + with_ci:
        vals = per[key]
        summary[key] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    if cfg.bootstrap > 0:
        # CA and PAR may hold NaN (an empty pool; a truth with no positive cosine to its
        # context): each is bootstrapped on its finite windows.
        sparse = ("ca", "par")
        dense = [key for key in with_ci if key not in sparse]
        lo, hi = bootstrap_cis(np.stack([per[key] for key in dense]), cfg.bootstrap, cfg.seed)
        for key, a, b in zip(dense, lo, hi):
            summary[f"{key}_lo"], summary[f"{key}_hi"] = float(a), float(b)
        for key in sparse:
            finite = per[key][np.isfinite(per[key])]
            a, b = bootstrap_ci(finite, cfg.bootstrap, cfg.seed)
            summary[f"{key}_lo"], summary[f"{key}_hi"] = a, b
    for k in cfg.ks:
        summary[f"bank_chance@{k}"] = min(k, bank_size) / bank_size  # ignores excluded contexts
        summary[f"pool_chance@{k}"] = min(k, m) / m
        if fixed:
            summary[f"pool{cfg.pool_size}_chance@{k}"] = min(k, cfg.pool_size) / cfg.pool_size
    return summary, per


def evaluate(pred: np.ndarray, ws: WindowSet, bank: ConceptBank, cfg: EvalConfig) -> dict:
    """Every protocol metric for predictions on ws, as a flat JSON-safe dict of fractions."""
    return evaluate_detailed(pred, ws, bank, cfg)[0]
