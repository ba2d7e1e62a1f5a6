"""The coherence gate (the design's quality filter): drop incoherent training windows.

A window's coherence is the mean cosine of consecutive concepts over its context,

    coherence = mean over t in [start, end - 1) of cos(x_t, x_{t+1})

(bank vectors are unit, so each cosine is an inner product). A one-vector context has no pair;
its coherence is defined as 1.0, so the gate always keeps it.

`window.min_coherence` keeps the training windows whose coherence is >= that value;
`window.min_coherence_quantile` q sets the threshold to the q-quantile of the training windows'
coherence instead (q = 0.25 keeps about 75%, 0.5 about half), because MiniLM cosines sit lower than
the GTR-T5 ones the design's thresholds (0.0, 0.60, 0.78) were chosen for. Only the train split is
gated: val and test windows are never filtered, so every run is scored on the same windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lvm_ray.config import WindowConfig
from lvm_ray.data.windows import WindowSet

# The design's thresholds (tried on GTR-T5 vectors); the gate report shows what each keeps here.
DESIGN_THRESHOLDS = (0.0, 0.60, 0.78)
_BLOCK = 16384  # rows per block of consecutive-pair products (bounded memory on large splits)


def window_coherence(vectors: np.ndarray, ws: WindowSet) -> np.ndarray:
    """Mean cosine of consecutive context concepts of every window. (M,) float64. O(S*D + M):
    one pass over the split's consecutive pairs, then a prefix sum per window."""
    rows = ws.rows
    pair = np.zeros(max(len(rows) - 1, 0), dtype=np.float64)  # pair[i] = x_rows[i] . x_rows[i+1]
    for a in range(0, len(pair), _BLOCK):
        b = min(a + _BLOCK, len(pair))
        pair[a:b] = np.einsum("nd,nd->n", vectors[rows[a:b]], vectors[rows[a + 1 : b + 1]],
                              dtype=np.float64)
    csum = np.concatenate([[0.0], np.cumsum(pair)])
    # Context positions start..end-1 hold the pairs start..end-2.
    n_pairs = ws.end - ws.start - 1
    total = csum[np.maximum(ws.end - 1, ws.start)] - csum[ws.start]
    return np.where(n_pairs > 0, total / np.maximum(n_pairs, 1), 1.0)


@dataclass(frozen=True)
class GateReport:
    """What the gate did to the training windows: the threshold and how many it kept, beside
    what the design's thresholds would keep on the same windows."""

    threshold: float
    quantile: float | None  # set when the threshold came from window.min_coherence_quantile
    kept: int
    total: int
    design: tuple[tuple[float, int], ...]  # (threshold, windows kept) for DESIGN_THRESHOLDS
    percentiles: tuple[float, ...]  # coherence at 0, 25, 50, 75, 100 %

    def line(self) -> str:
        how = (f"{self.threshold:.3f} (the {self.quantile:g}-quantile of train)"
               if self.quantile is not None else f"{self.threshold:.3f}")
        design = ", ".join(f">= {t:g} keeps {k} ({k / max(self.total, 1):.1%})"
                           for t, k in self.design)
        pct = "/".join(f"{p:.2f}" for p in self.percentiles)
        return (f"coherence gate {how}: keeps {self.kept} of {self.total} training windows "
                f"({self.kept / max(self.total, 1):.1%}); the design's thresholds would keep: "
                f"{design}; train coherence min/25/50/75/max %: {pct}")


def coherence_gate(vectors: np.ndarray, train_ws: WindowSet, cfg: WindowConfig
                   ) -> tuple[WindowSet, GateReport | None]:
    """The training windows that pass the gate (all of them when it is off) and its report."""
    if cfg.min_coherence is None and cfg.min_coherence_quantile is None:
        return train_ws, None
    coh = window_coherence(vectors, train_ws)
    if cfg.min_coherence is not None:
        threshold = float(cfg.min_coherence)
    else:
        threshold = float(np.quantile(coh, cfg.min_coherence_quantile)) if len(coh) else 0.0
    keep = np.flatnonzero(coh >= threshold)
    design = tuple((t, int(np.count_nonzero(coh >= t))) for t in DESIGN_THRESHOLDS)
    pct = tuple(float(v) for v in np.percentile(coh, [0, 25, 50, 75, 100])) if len(coh) \
        else (float("nan"),) * 5
    report = GateReport(threshold, cfg.min_coherence_quantile, len(keep), len(coh), design, pct)
    return train_ws.subset(keep), report
