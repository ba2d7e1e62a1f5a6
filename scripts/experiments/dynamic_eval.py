"""Dynamic evaluation (Krause et al., 2018), measured as an issue-13 lever: while reading a
document, the model takes a few gradient steps on what it has already read, so later predictions
in that document come from weights adapted to it.

Causal by construction: a document's windows are taken in target order, in chunks of --chunk;
each chunk is predicted first, then the model trains on that chunk's windows (their targets are
now context for every later window). Weights and optimiser are reset at every document, so no
document sees another's text; InfoNCE negatives are drawn from the evaluated split's bank (the
retrieval set, known to the retriever) and masked exactly as in training. Static and adapted
predictions are scored on the same windows with the protocol's metrics.

    python scripts/experiments/dynamic_eval.py CKPT --split val --lr 3e-5 1e-4 3e-4 1e-3
    python scripts/experiments/dynamic_eval.py CKPT --split test --lr LR  # only if val picks an LR

On full sotu val picks none (every lr loses to the static model): docs/results.md 10.12.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from lvm_ray.config import Config
from lvm_ray.eval.metrics import evaluate
from lvm_ray.eval.predict import predict_windows
from lvm_ray.train.loop import RowPool
from lvm_ray.train.step import LocalCollective, to_batch, train_group
from lvm_ray.workflows.evaluate import checkpoint_with_windows


def adapted_predictions(model: torch.nn.Module, cfg: Config, vectors: np.ndarray, ws,
                        doc_of: np.ndarray, lr: float, chunk: int, steps: int, seed: int = 0
                        ) -> np.ndarray:
    """(M, D) predictions, each from the model adapted on its document's earlier chunks."""
    torch.manual_seed(seed)
    pool = RowPool(vectors, ws.rows, "cpu")
    coll, out = LocalCollective(), np.empty((len(ws), vectors.shape[1]), np.float32)
    all_steps = cfg.train.objective == "all_steps"
    docs = np.flatnonzero(np.r_[True, doc_of[1:] != doc_of[:-1]])  # windows are in corpus order
    bounds = np.r_[docs, len(ws)]
    for d in range(len(docs)):
        m = copy.deepcopy(model)
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)  # train_group steps one
        for lo in range(bounds[d], bounds[d + 1], chunk):
            idx = np.arange(lo, min(lo + chunk, bounds[d + 1]))
            out[idx] = predict_windows(m, vectors, ws.subset(idx))  # before it sees them
            batch = to_batch(vectors, ws, idx, torch.device("cpu"), all_steps)
            for _ in range(steps):
                train_group(m, [batch], opt, sched, cfg.loss, cfg.train, coll, pool)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--split", choices=["val", "test"], default="val")
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per setting")
    a = ap.parse_args()

    ck, cfg, bank, ws = checkpoint_with_windows(a.checkpoint)  # the bank it was trained on
    ews = ws.val if a.split == "val" else ws.test
    doc_of = bank.doc_ids[ews.target_rows]
    assert np.all(np.diff(ews.end) > 0), "windows must be in corpus order"

    def score(pred: np.ndarray) -> dict:
        r = evaluate(pred, ews, bank, cfg.eval)
        return {k: r[k] for k in r if k.startswith(("bank_hit@5", "ca", "par", "margin", "cosine"))}

    static = score(predict_windows(ck.model, bank.vectors, ews))
    print(f"{a.split}: {len(ews)} windows in {len(np.unique(doc_of))} documents; "
          f"static: {static}", flush=True)
    rows = [{"split": a.split, "setting": "static", **static}]
    for lr in a.lr:
        t0 = time.time()
        pred = adapted_predictions(ck.model, cfg, bank.vectors, ews, doc_of, lr, a.chunk, a.steps)
        r = {"split": a.split, "setting": f"lr={lr:g} chunk={a.chunk} steps={a.steps}",
             **score(pred), "seconds": round(time.time() - t0, 1)}
        print(r, flush=True)
        rows.append(r)
    if a.out:
        with a.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
