"""Why a lower InfoNCE temperature raises margin and lowers PAR without ranking better: the
prediction puts part of its unit norm in directions where the concept vectors hardly vary, which
scales every cosine down (margin towards 0, PAR below 1) and leaves the ranking alone.

For each checkpoint, on the same windows: mean cos(p, truth), cos(p, last context vector) and
their ratio, the share of p's squared norm inside the training bank's principal subspace (the
top directions holding 99% of its squared norm), and bank-Hit@5 / margin / PAR of p as trained
and of p projected onto that subspace (a diagnostic of what margin and PAR measure here, not a way
to raise them: the issue rules such post-processing out).

With --betas, also bank-Hit@5 of p - beta * (mean training concept), re-normalised: whether the
predictions lean toward the bank's mean direction, where "hub" concepts crowd every top 5.

    python scripts/experiments/cosine_scale.py --split val \
        runs/ablations/base/checkpoints/epoch_003 runs/ablations/temp003/checkpoints/epoch_005 \
        runs/ablations/temp001/checkpoints/epoch_007

docs/results.md 10.14 reports the run, 10.17 the --betas check.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from lvm_ray.eval.metrics import evaluate
from lvm_ray.eval.predict import predict_windows
from lvm_ray.workflows.evaluate import checkpoint_with_windows


def principal_basis(x: np.ndarray, share: float) -> np.ndarray:
    """(D, k): the top principal directions of rows x (N, D) (uncentred, as cosines see them)
    that hold `share` of their squared norm."""
    _, s, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    k = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), share)) + 1
    return vt[:k].T.astype(np.float32)


def projected(p: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """p (M, D) projected onto the span of basis (D, k), rows re-normalised."""
    assert p.ndim == 2 and basis.shape[0] == p.shape[1]
    q = (p @ basis) @ basis.T
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def centred(p: np.ndarray, mean: np.ndarray, beta: float) -> np.ndarray:
    """p (M, D) minus beta * mean (D,), rows re-normalised."""
    assert p.ndim == 2 and mean.shape == (p.shape[1],)
    q = p - beta * mean
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--betas", nargs="*", type=float, default=[],
                    help="also score p - beta * mean(training concepts) for each beta")
    a = ap.parse_args()
    print("| checkpoint | predictions | bank-Hit@5 | margin | PAR | cos(p, truth) | "
          "cos(p, last) | ratio | share of p in the subspace |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in a.checkpoints:
        ck, cfg, bank, ws = checkpoint_with_windows(path)
        ews = ws.val if a.split == "val" else ws.test
        ecfg = dataclasses.replace(cfg.eval, bootstrap=0)
        train = bank.vectors[ws.train.rows]
        basis = principal_basis(train, 0.99)
        y = bank.vectors[ews.target_rows]
        last = bank.vectors[ews.last_rows]
        pred = predict_windows(ck.model, bank.vectors, ews)
        inside = float(np.mean(np.sum((pred @ basis) ** 2, 1)))
        for name, p in (("as trained", pred), (f"on the top {basis.shape[1]} directions",
                                               projected(pred, basis))):
            r = evaluate(p, ews, bank, ecfg)
            cy, cl = float(np.mean(np.sum(p * y, 1))), float(np.mean(np.sum(p * last, 1)))
            print(f"| {path} | {name} | {100 * r['bank_hit@5']:.2f} | {r['margin']:.3f} | "
                  f"{r['par']:.3f} | {cy:.3f} | {cl:.3f} | {cy / cl:.2f} | "
                  f"{inside if p is pred else 1.0:.3f} |")
        mean = train.mean(0) if a.betas else None
        for beta in a.betas:
            r = evaluate(centred(pred, mean, beta), ews, bank, ecfg)
            print(f"| {path} | minus {beta:g} x the mean concept | {100 * r['bank_hit@5']:.2f} | "
                  f"{r['margin']:.3f} | {r['par']:.3f} | | | | |")


if __name__ == "__main__":
    main()
