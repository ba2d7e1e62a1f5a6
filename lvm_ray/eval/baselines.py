"""The protocol's baselines: copy-last, context-mean(m) and ridge, scored on the model's windows.

A baseline has a `name`, its chosen `params` and `predict(bank_vectors, ws) -> (M, D)` unit
vectors. Hyperparameters (m, lambda) are chosen on val; ridge is fit on train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from lvm_ray.config import EvalConfig
from lvm_ray.data.bank import ConceptBank
from lvm_ray.data.windows import WindowSet
from lvm_ray.eval.metrics import evaluate, l2n, select_key, select_score

SEGMENT = 8192  # bank rows per cumulative-sum segment (bounds memory on large splits)


class Baseline(Protocol):
    name: str
    params: dict[str, Any]

    def predict(self, bank_vectors: np.ndarray, ws: WindowSet) -> np.ndarray: ...


def last_m_mean(bank_vectors: np.ndarray, ws: WindowSet, m: int) -> np.ndarray:
    """Mean of each window's last min(m, length) context vectors, unnormalised. (M, D) float32.

    Differences of a float64 cumulative sum over ws.rows, computed per segment of SEGMENT rows
    (windows grouped by the segment of their end) so memory and rounding stay local."""
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    d = bank_vectors.shape[1]
    hi = ws.end  # (M,) exclusive, index into ws.rows
    lo = np.maximum(ws.start, hi - m)
    out = np.empty((len(ws), d), dtype=np.float32)
    seg = hi // SEGMENT
    for s in np.unique(seg):
        idx = np.flatnonzero(seg == s)
        a, z = int(lo[idx].min()), int(hi[idx].max())
        cs = np.zeros((z - a + 1, d))  # (span + 1, D) float64
        np.cumsum(bank_vectors[ws.rows[a:z]], axis=0, dtype=np.float64, out=cs[1:])
        out[idx] = (cs[hi[idx] - a] - cs[lo[idx] - a]) / (hi[idx] - lo[idx])[:, None]
    return out


@dataclass
class CopyLast:
    name: str = "copy-last"
    params: dict[str, Any] = field(default_factory=dict)

    def predict(self, bank_vectors: np.ndarray, ws: WindowSet) -> np.ndarray:
        return l2n(bank_vectors[ws.last_rows])


@dataclass
class ContextMean:
    m: int
    name: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = self.name or f"context-mean(m={self.m})"
        self.params = {"m": self.m, **self.params}

    def predict(self, bank_vectors: np.ndarray, ws: WindowSet) -> np.ndarray:
        return l2n(last_m_mean(bank_vectors, ws, self.m))


@dataclass
class Ridge:
    """p = l2(W^T f + b), f = mean of the last m context vectors (m=1: the last vector)."""

    m: int
    lam: float
    w: np.ndarray  # (D, D)
    b: np.ndarray  # (D,)
    name: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = self.name or f"ridge(m={self.m},lambda={self.lam:g})"
        self.params = {"m": self.m, "lambda": self.lam, **self.params}

    def predict(self, bank_vectors: np.ndarray, ws: WindowSet) -> np.ndarray:
        f = last_m_mean(bank_vectors, ws, self.m)
        return l2n(f @ self.w.astype(np.float32) + self.b.astype(np.float32))


def ridge_stats(bank_vectors: np.ndarray, ws: WindowSet, m: int, block: int = 16384
                ) -> tuple[np.ndarray, np.ndarray]:
    """Sufficient statistics of the ridge fit with a bias column: A = X1^T X1 (D+1, D+1) and
    B = X1^T Y (D+1, D), accumulated over blocks of windows so no (M, D) float64 matrix exists."""
    d = bank_vectors.shape[1]
    a = np.zeros((d + 1, d + 1))
    b = np.zeros((d + 1, d))
    for s in range(0, len(ws), block):
        sub = ws.subset(np.arange(s, min(s + block, len(ws))))
        x = last_m_mean(bank_vectors, sub, m).astype(np.float64)
        x1 = np.hstack([x, np.ones((len(x), 1))])  # (B, D+1)
        a += x1.T @ x1
        b += x1.T @ bank_vectors[sub.target_rows].astype(np.float64)
    return a, b


def ridge_solve(a: np.ndarray, b: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """W (D, D), bias (D,) minimising ||X W + 1 b^T - Y||^2 + lam ||W||^2 (bias unpenalised)."""
    reg = np.full(len(a), float(lam))
    reg[-1] = 0.0
    sol = np.linalg.solve(a + np.diag(reg), b)  # (D+1, D)
    return sol[:-1], sol[-1]


def fit_baselines(bank: ConceptBank, train_ws: WindowSet, val_ws: WindowSet,
                  eval_cfg: EvalConfig, ms: Sequence[int] = (1, 2, 3, 4, 6, 8, 16),
                  lambdas: Sequence[float] = (0.1, 1, 10, 100, 1000), select: str | None = None,
                  max_val_windows: int | None = 2000) -> list[Baseline]:
    """copy-last, context-mean with m chosen on val, ridge (fit on train) with (m, lambda) chosen
    on val, each selected by `select` (default eval_cfg.select_metric) on at most
    max_val_windows val windows. Each baseline's params record its val score."""
    if len(train_ws) == 0 or len(val_ws) == 0:
        raise ValueError("fit_baselines needs train and val windows")
    select = select or eval_cfg.select_metric
    val = val_ws.sample(max_val_windows, eval_cfg.seed)
    vecs = bank.vectors
    score_key = f"val_{select_key(select, eval_cfg.pool_size)}"  # names the fixed pool size

    def score(p: np.ndarray) -> float:
        return select_score(p, val, bank, eval_cfg, select)

    ms = sorted({min(int(m), val_ws.context) for m in ms})
    copy = CopyLast()
    copy.params[score_key] = score(copy.predict(vecs, val))

    best_mean: tuple[float, int] = (-np.inf, ms[0])
    for m in ms:
        best_mean = max(best_mean, (score(ContextMean(m).predict(vecs, val)), -m))
    mean = ContextMean(-best_mean[1])  # ties go to the smaller m
    mean.params[score_key] = best_mean[0]

    best: tuple[float, Ridge] | None = None
    for m in ms:
        stats = ridge_stats(vecs, train_ws, m)
        for lam in lambdas:
            w, b = ridge_solve(*stats, lam)
            r = Ridge(m=m, lam=float(lam), w=w, b=b)
            sc = score(r.predict(vecs, val))
            if best is None or sc > best[0]:
                best = (sc, r)
    assert best is not None, "ms and lambdas must be non-empty"
    best[1].params[score_key] = best[0]
    return [copy, mean, best[1]]


def evaluate_baselines(baselines: Sequence[Baseline], bank: ConceptBank, ws: WindowSet,
                       cfg: EvalConfig) -> dict[str, dict]:
    """name -> evaluate() summary, every baseline on the very same windows."""
    return {bl.name: evaluate(bl.predict(bank.vectors, ws), ws, bank, cfg) for bl in baselines}
