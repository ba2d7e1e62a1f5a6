"""Ensembles of checkpoints trained on the same bank (the design's v2 plan: Memory GRU + GRU,
weighted voting for the top K): the fusion of their neighbour lists, on numpy arrays.

Two fusions of the members' unit predictions p_m with weights w_m (w >= 0, sum 1):

- "score": a weighted sum of cosine scores, s(c) = sum_m w_m cos(p_m, c). Bank vectors are unit,
  so s(c) = c . (sum_m w_m p_m): ranking neighbours by the fused score is ranking them by the fused
  vector q = l2(sum_m w_m p_m), over the whole bank and exactly. The ensemble therefore has a
  prediction vector, and every protocol metric applies to it.
- "rrf": weighted reciprocal-rank fusion of each member's top-`depth` neighbour list,
  s(c) = sum_m w_m / (k0 + rank_m(c)), k0 = 60 (Cormack et al., 2009). It ranks but makes no
  vector, so only bank-Hit@K and MRR exist. A target outside every member's list scores 0, below
  every listed candidate: a miss for every K <= depth, and 0 in the MRR (MRR truncated at the
  union of the lists; the report says so).

Candidates follow the protocol: the evaluated split's concepts minus the window's own context.
Weights are chosen on val only (`choose_weights`): a grid over the simplex in steps of 0.1,
objective val bank-Hit@K as in model selection, first best grid point on ties.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np

from lvm_ray.data.windows import WindowSet
from lvm_ray.eval.metrics import bootstrap_cis, l2n

FUSIONS = ("score", "rrf")
RRF_K0 = 60.0
RRF_DEPTH = 100  # each member's neighbour list
BLOCK = 256  # windows per block: (BLOCK, split size) float32 score blocks


def weight_grid(n: int, step: float = 0.1) -> np.ndarray:
    """Every weight vector of n non-negative multiples of `step` summing to 1. (G, n), in a fixed
    order (lexicographic, first member's weight descending)."""
    if n < 1:
        raise ValueError("an ensemble needs at least one member")
    units = int(round(1.0 / step))
    if abs(units * step - 1.0) > 1e-9:
        raise ValueError(f"step must divide 1, got {step}")
    rows = [c for c in itertools.product(range(units, -1, -1), repeat=n) if sum(c) == units]
    return np.array(rows, dtype=np.float64) / units


def _check_members(preds: Sequence[np.ndarray], weights: Sequence[float] | None = None
                   ) -> np.ndarray:
    if not preds:
        raise ValueError("an ensemble needs at least one member")
    shape = preds[0].shape
    if any(p.ndim != 2 or p.shape != shape for p in preds):
        raise ValueError(f"member predictions must all be (M, D); got {[p.shape for p in preds]}")
    if weights is None:
        return np.full(len(preds), 1.0 / len(preds))
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(preds),) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be {len(preds)} non-negative numbers, not all 0; got {w}")
    return w / w.sum()


def fuse_vectors(preds: Sequence[np.ndarray], weights: Sequence[float] | None = None
                 ) -> np.ndarray:
    """Score fusion as a prediction: l2(sum_m w_m p_m). (M, D) float32; equal weights if None."""
    w = _check_members(preds, weights)
    acc = np.zeros(preds[0].shape, dtype=np.float64)
    for wm, p in zip(w, preds):
        acc += wm * np.asarray(p, dtype=np.float64)
    return l2n(acc)


# ----------------------------------------------------------------------------- scores per block


def _score_blocks(preds: Sequence[np.ndarray], vectors: np.ndarray, ws: WindowSet,
                  block: int = BLOCK) -> Iterator[tuple[slice, list[np.ndarray]]]:
    """Each member's cosine to every candidate (columns = positions in ws.rows), block by block
    of windows, with the window's own context set to -inf. Yields (window slice, [(b, S)])."""
    cand = np.ascontiguousarray(vectors[ws.rows], dtype=np.float32)  # (S, D)
    cols = np.arange(len(ws.rows))
    for a in range(0, len(ws), block):
        sl = slice(a, min(a + block, len(ws)))
        ctx = (cols[None, :] >= ws.start[sl, None]) & (cols[None, :] < ws.end[sl, None])  # (b, S)
        scores = []
        for p in preds:
            s = np.asarray(p[sl], dtype=np.float32) @ cand.T  # (b, S)
            s[ctx] = -np.inf
            scores.append(s)
        yield sl, scores


def member_lists(pred: np.ndarray, vectors: np.ndarray, ws: WindowSet, depth: int = RRF_DEPTH
                 ) -> np.ndarray:
    """One member's neighbour list per window: the top-`depth` candidates by cosine, as columns
    into ws.rows, best first (ties: lower column first, so lists are deterministic). (M, depth)."""
    depth = min(depth, len(ws.rows))
    out = np.empty((len(ws), depth), dtype=np.int64)
    for sl, (s,) in _score_blocks([pred], vectors, ws):
        out[sl] = np.argsort(-s, axis=1, kind="stable")[:, :depth]
    return out


def rrf_ranks(lists: Sequence[np.ndarray], ws: WindowSet, weights: Sequence[float] | None = None,
              k0: float = RRF_K0) -> np.ndarray:
    """1-based rank of each window's target under weighted reciprocal-rank fusion of the members'
    lists (columns into ws.rows); inf where the target is in no list. Strict > as in
    lvm_ray.eval.metrics: ties go to the target. (M,) float64."""
    w = _check_members(lists, weights)
    m, S = len(ws), len(ws.rows)
    ranks = np.empty(m, dtype=np.float64)
    for a in range(0, m, BLOCK):
        b = min(BLOCK, m - a)
        fused = np.zeros((b, S), dtype=np.float64)
        rows = np.arange(b)[:, None]
        for wm, lst in zip(w, lists):
            part = lst[a : a + b]  # (b, depth); columns are unique within a row
            fused[rows, part] += wm / (k0 + 1.0 + np.arange(part.shape[1]))[None, :]
        t = fused[np.arange(b), ws.end[a : a + b]]  # the target's fused score
        greater = (fused > t[:, None]).sum(axis=1)
        ranks[a : a + b] = np.where(t > 0, 1.0 + greater, np.inf)
    return ranks


def score_grid_hits(preds: Sequence[np.ndarray], vectors: np.ndarray, ws: WindowSet,
                    grid: np.ndarray, k: int = 5) -> np.ndarray:
    """Score-fusion Hit@k on ws for every weight vector of `grid` (G, n): one pass of member
    scores, each grid point a weighted sum of them. (G,) float64."""
    hits = np.zeros(len(grid))
    for sl, scores in _score_blocks(preds, vectors, ws):
        b = sl.stop - sl.start
        tcol = ws.end[sl]
        for g, w in enumerate(grid):
            fused = sum(wm * s for wm, s in zip(w, scores) if wm > 0)  # (b, S); -inf on context
            t = fused[np.arange(b), tcol]
            hits[g] += np.count_nonzero((fused > t[:, None]).sum(axis=1) < k)
    return hits / max(len(ws), 1)


def rrf_grid_hits(lists: Sequence[np.ndarray], ws: WindowSet, grid: np.ndarray, k: int = 5,
                  k0: float = RRF_K0) -> np.ndarray:
    """RRF Hit@k on ws for every weight vector of `grid`. (G,) float64."""
    return np.array([float(np.mean(rrf_ranks(lists, ws, w, k0) <= k)) for w in grid])


def choose_weights(fusion: str, val_preds: Sequence[np.ndarray], vectors: np.ndarray,
                   val_ws: WindowSet, k: int = 5, step: float = 0.1,
                   depth: int = RRF_DEPTH) -> tuple[np.ndarray, float]:
    """The weights of `fusion` that maximise val bank-Hit@k (first grid point on ties) and that
    value. Only validation predictions and windows go in: the test split cannot leak into them."""
    if val_ws.split != "val":
        raise ValueError(f"weights are chosen on the val split, got {val_ws.split!r} windows")
    grid = weight_grid(len(val_preds), step)
    if fusion == "score":
        hits = score_grid_hits(val_preds, vectors, val_ws, grid, k)
    elif fusion == "rrf":
        lists = [member_lists(p, vectors, val_ws, depth) for p in val_preds]
        hits = rrf_grid_hits(lists, val_ws, grid, k)
    else:
        raise ValueError(f"unknown fusion {fusion!r}; choose from {', '.join(FUSIONS)}")
    best = int(np.argmax(hits))
    return grid[best], float(hits[best])


def rank_summary(ranks: np.ndarray, ws: WindowSet, ks: Sequence[int], bootstrap: int = 1000,
                 seed: int = 0, depth: int = RRF_DEPTH) -> dict[str, float]:
    """bank-Hit@K (with 95% CIs) and truncated MRR from ranks alone: what a fusion without a
    vector (RRF) can be scored on. Keys as evaluate()'s, plus mrr_truncated_at."""
    m, bank_size = len(ranks), len(ws.rows)
    per = {f"bank_hit@{k}": (ranks <= k).astype(np.float64) for k in ks}
    per["mrr"] = np.where(np.isfinite(ranks), 1.0 / ranks, 0.0)
    out: dict[str, float] = {"n_windows": int(m), "bank_size": int(bank_size),
                             "mrr_truncated_at": int(depth)}
    for key, v in per.items():
        out[key] = float(v.mean())
    if bootstrap > 0:
        lo, hi = bootstrap_cis(np.stack(list(per.values())), bootstrap, seed)
        for key, a, b in zip(per, lo, hi):
            out[f"{key}_lo"], out[f"{key}_hi"] = float(a), float(b)
    for k in ks:
        out[f"bank_chance@{k}"] = min(k, bank_size) / bank_size
    return out


# ----------------------------------------------------------------------------- the spec file

ENSEMBLE_JSON = "ensemble.json"


def ensemble_document(name: str, members: Sequence[tuple[str, str]], weights: dict[str, list],
                      val: dict[str, float], fusion: str, k: int = 5,
                      depth: int = RRF_DEPTH, k0: float = RRF_K0) -> dict:
    """What ensemble.json holds: the members (name, checkpoint), each fusion's weights chosen on
    val with its val bank-Hit@k, and the fusion served by default. Serve reads it back
    (lvm_ray.serve.ensemble)."""
    if fusion not in weights:
        raise ValueError(f"default fusion {fusion!r} has no weights")
    return {"name": name, "members": [{"name": n, "checkpoint": c} for n, c in members],
            "fusion": fusion, "weights": {f: [float(x) for x in w] for f, w in weights.items()},
            f"val_bank_hit@{k}": {f: float(v) for f, v in val.items()},
            "weights_chosen_on": "val", "rrf": {"k0": k0, "depth": depth}}


def check_ensemble_document(doc: dict) -> dict:
    """Validate an ensemble.json document (raises ValueError saying what is wrong)."""
    members = doc.get("members")
    if not isinstance(members, list) or not members or not all(
            isinstance(m, dict) and {"name", "checkpoint"} <= set(m) for m in members):
        raise ValueError("ensemble: 'members' must be a non-empty list of {name, checkpoint}")
    weights = doc.get("weights")
    if not isinstance(weights, dict) or not weights:
        raise ValueError("ensemble: 'weights' must map a fusion to its weights")
    for f, w in weights.items():
        if f not in FUSIONS:
            raise ValueError(f"ensemble: unknown fusion {f!r}; choose from {', '.join(FUSIONS)}")
        _check_members([np.zeros((1, 1))] * len(members), w)
    if doc.get("fusion") not in weights:
        raise ValueError(f"ensemble: default fusion {doc.get('fusion')!r} has no weights")
    return doc
