"""Lanes (the design's TMD lanes): every concept belongs to one of a few topic lanes, and quality is
checked per lane so that a model cannot look good on average while failing one kind of content.

Lanes come from the corpus when it gives them (the bank's `lane` column, -1 = unknown); otherwise
16 lanes from k-means over the training split's vectors, every concept assigned to its nearest
centroid (val and test concepts never shape the centroids). Per-lane Hit@K groups the evaluated
windows by the lane of their target.

The design's canary rule: no lane's Hit@5 more than 20% below the average. "The average" is the
mean of the per-lane values (each lane weighted equally), and "20% below" is relative: a lane
fails when its Hit@5 < 0.8 x average. Small lanes are noisy, so each lane also carries its 95%
bootstrap CI, and a failure is called confident when even the upper end of the CI is below the
threshold.

`evaluate_run` writes `lanes.json` next to `test_metrics.json` in the checkpoint directory;
`lane_report(checkpoint_dir)` reads it back (what Serve's status shows).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lvm_ray.data.bank import ConceptBank
from lvm_ray.eval.metrics import bootstrap_cis

N_LANES = 16
CANARY_DROP = 0.20  # a lane may sit at most this fraction below the average
LANES_JSON = "lanes.json"


@dataclass
class Lanes:
    """A lane id for every bank row, and where the ids came from."""

    ids: np.ndarray  # (N,) int16, -1 = unknown
    source: str  # "corpus" or "kmeans(k=16, train)"
    labels: dict[int, list[str]]  # lane -> a few texts nearest its centroid (k-means only)
    # (lanes, D) unit rows, lane order: the k-means centroids, or each corpus lane's mean training
    # vector. Lane experts route an arbitrary vector by its nearest centroid.
    centroids: np.ndarray | None = None


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 25) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding, by inner product on unit rows (spherical).
    x (N, D) -> centroids (k, D) unit rows. Deterministic for a seed."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N={n}], got {k}")
    rng = np.random.default_rng(seed)
    cent = np.empty((k, x.shape[1]), dtype=np.float32)
    cent[0] = x[rng.integers(n)]
    d2 = np.maximum(0.0, 2.0 - 2.0 * (x @ cent[0]))  # squared distance on unit vectors
    for j in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
        cent[j] = x[rng.choice(n, p=p)]
        d2 = np.minimum(d2, np.maximum(0.0, 2.0 - 2.0 * (x @ cent[j])))
    for _ in range(iters):
        assign = np.argmax(x @ cent.T, axis=1)  # (N,)
        new = np.zeros_like(cent)
        np.add.at(new, assign, x)
        empty = ~new.any(axis=1)
        new[empty] = cent[empty]  # an empty cluster keeps its centroid
        new /= np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
        if np.allclose(new, cent, atol=1e-6):
            break
        cent = new
    return cent


def assign(x: np.ndarray, centroids: np.ndarray, block: int = 8192) -> np.ndarray:
    """Nearest centroid (by inner product) of each row. (N,) int16."""
    out = np.empty(len(x), dtype=np.int16)
    for a in range(0, len(x), block):
        out[a : a + block] = np.argmax(x[a : a + block] @ centroids.T, axis=1)
    return out


def bank_lanes(bank: ConceptBank, n_lanes: int = N_LANES, seed: int = 0) -> Lanes:
    """The bank's own lanes when every row has one, else k-means lanes fit on the train split."""
    train = bank.split_rows("train")
    if len(bank.lanes) and (bank.lanes >= 0).all():
        ids = bank.lanes.astype(np.int16)
        means = [bank.vectors[train[ids[train] == j]].sum(axis=0) for j in np.unique(ids)]
        cent = np.stack(means).astype(np.float32)
        cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
        return Lanes(ids, "corpus", {}, cent)
    if len(train) < n_lanes:
        raise ValueError(f"{len(train)} training concepts cannot make {n_lanes} lanes")
    cent = kmeans(bank.vectors[train], n_lanes, seed)
    ids = assign(bank.vectors, cent)
    labels = {}  # a lane's three most central training texts (none in a texts-free lean bank)
    for j in range(n_lanes if bank.texts is not None else 0):
        rows = train[ids[train] == j]
        top = rows[np.argsort(-(bank.vectors[rows] @ cent[j]))[:3]]
        labels[j] = [str(bank.texts[r])[:80] for r in top]
    return Lanes(ids, f"kmeans(k={n_lanes}, train)", labels, cent)


def lane_metrics(hits: np.ndarray, target_lanes: np.ndarray, k: int = 5, bootstrap: int = 1000,
                 seed: int = 0) -> dict[str, float]:
    """Per-lane Hit@k and the canary rule, as flat float keys (they sit beside evaluate()'s):
    lane{j}_hit@k (+ _lo/_hi, _n), lane_avg_hit@k (mean over lanes), lane_min_hit@k,
    lane_threshold_hit@k (= 0.8 x average), lane_canary_ok (1.0/0.0) and lane_canary_confident_fail
    (1.0 when some lane's CI lies wholly below the threshold). Lane -1 is skipped."""
    hits = np.asarray(hits, dtype=np.float64)
    target_lanes = np.asarray(target_lanes)
    if hits.shape != target_lanes.shape:
        raise ValueError(f"target_lanes must be (M={len(hits)},), got {target_lanes.shape}")
    out: dict[str, float] = {}
    lanes = [int(j) for j in np.unique(target_lanes) if j >= 0]
    if not lanes:
        return out
    vals, his = [], []
    for j in lanes:
        h = hits[target_lanes == j]
        vals.append(float(h.mean()))
        out[f"lane{j}_hit@{k}"] = vals[-1]
        out[f"lane{j}_n"] = float(len(h))
        if bootstrap > 0:
            lo, hi = bootstrap_cis(h[None], bootstrap, seed)
            out[f"lane{j}_hit@{k}_lo"], out[f"lane{j}_hit@{k}_hi"] = float(lo[0]), float(hi[0])
            his.append(float(hi[0]))
    avg = float(np.mean(vals))
    thr = (1.0 - CANARY_DROP) * avg
    out[f"lane_avg_hit@{k}"] = avg
    out[f"lane_min_hit@{k}"] = float(min(vals))
    out[f"lane_threshold_hit@{k}"] = thr
    out["lane_canary_ok"] = float(all(v >= thr for v in vals))
    out["lane_canary_confident_fail"] = float(any(h < thr for h in his))
    return out


def lane_rows(summary: dict[str, Any], k: int = 5) -> list[dict[str, Any]]:
    """[{lane, n, hit, lo, hi, below}] from one result's lane keys, lanes in order."""
    lanes = sorted({int(key[4:].split("_")[0]) for key in summary
                    if key.startswith("lane") and key.endswith(f"_hit@{k}")
                    and key[4:].split("_")[0].isdigit()})
    thr = summary.get(f"lane_threshold_hit@{k}")
    rows = []
    for j in lanes:
        v = summary[f"lane{j}_hit@{k}"]
        rows.append({"lane": j, "n": int(summary.get(f"lane{j}_n", 0)), "hit": v,
                     "lo": summary.get(f"lane{j}_hit@{k}_lo"),
                     "hi": summary.get(f"lane{j}_hit@{k}_hi"),
                     "below_threshold": thr is not None and v < thr})
    return rows


def lane_document(results: dict[str, dict[str, Any]], model: str, lanes: Lanes, split: str,
                  k: int = 5) -> dict[str, Any]:
    """What lanes.json holds: the model's per-lane Hit@k and canary verdict, the same for every
    baseline on the same windows, and the lanes' source and labels."""
    def one(s: dict[str, Any]) -> dict[str, Any]:
        return {"lanes": lane_rows(s, k), "average": s.get(f"lane_avg_hit@{k}"),
                "threshold": s.get(f"lane_threshold_hit@{k}"),
                "canary_ok": bool(s.get("lane_canary_ok", 0.0)),
                "canary_confident_fail": bool(s.get("lane_canary_confident_fail", 0.0)),
                "overall": s.get(f"bank_hit@{k}")}

    return {"k": k, "split": split, "source": lanes.source,
            "rule": f"no lane's Hit@{k} below {1 - CANARY_DROP:.0%} of the mean over lanes",
            "labels": {str(j): v for j, v in lanes.labels.items()},
            "model": model, **one(results[model]),
            "baselines": {n: one(s) for n, s in results.items() if n != model}}


def write_lanes(checkpoint_dir: str | Path, doc: dict[str, Any]) -> Path:
    path = Path(checkpoint_dir) / LANES_JSON
    path.parent.mkdir(parents=True, exist_ok=True)  # `lvm evaluate --out NEW_DIR` writes here first
    path.write_text(json.dumps(doc, indent=2))
    return path


def lane_report(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """The lanes.json of a checkpoint (None when it was never evaluated with lanes). Keys: k,
    split, source, rule, labels, model, lanes [{lane, n, hit, lo, hi, below_threshold}], average,
    threshold, canary_ok, canary_confident_fail, overall, baselines {name: same keys}."""
    path = Path(checkpoint_dir) / LANES_JSON
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def lane_markdown(results: dict[str, dict[str, Any]], k: int = 5) -> str:
    """A per-lane Hit@k table (rows lanes, columns results) and each result's canary verdict."""
    names = [n for n, s in results.items() if f"lane_avg_hit@{k}" in s]
    if not names:
        return ""
    first = lane_rows(results[names[0]], k)
    lines = [f"## Per-lane bank-Hit@{k} (lane of the target; canary: no lane below "
             f"{1 - CANARY_DROP:.0%} of the mean over lanes)", "",
             "| lane (windows) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    per = {n: {r["lane"]: r for r in lane_rows(results[n], k)} for n in names}
    for r0 in first:
        j = r0["lane"]
        cells = []
        for n in names:
            r = per[n].get(j)
            cell = "n/a" if r is None else f"{100 * r['hit']:.1f}%"
            if r is not None and r["lo"] is not None:
                cell += f" [{100 * r['lo']:.1f}, {100 * r['hi']:.1f}]"
            if r is not None and r["below_threshold"]:
                cell = f"**{cell}** (below)"
            cells.append(cell)
        lines.append(f"| {j} ({r0['n']}) | " + " | ".join(cells) + " |")
    for label, key in (("mean over lanes", f"lane_avg_hit@{k}"),
                       ("threshold (80% of mean)", f"lane_threshold_hit@{k}")):
        lines.append(f"| {label} | " + " | ".join(f"{100 * results[n][key]:.1f}%" for n in names)
                     + " |")
    verdict = []
    for n in names:
        s = results[n]
        ok = bool(s.get("lane_canary_ok"))
        conf = bool(s.get("lane_canary_confident_fail"))
        verdict.append("passes" if ok else ("fails (confident)" if conf else "fails (within CI)"))
    lines.append("| canary rule | " + " | ".join(verdict) + " |")
    return "\n".join(lines) + "\n"
