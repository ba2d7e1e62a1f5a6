"""Does a second prediction horizon help a data-starved model? Trains the recipe with an
auxiliary head that predicts, from every step's features, the vector two steps ahead (t+2) besides
the next one (t+1): more supervision per training concept, the multi-token-prediction idea. The
auxiliary InfoNCE (in-batch negatives, the same mask rule as the main loss: a row's own context
and duplicates of its target are no negatives) is added with --weight; the t+1 head is unchanged.

A probe, not a package feature: it patches the training step (the model class, the rows of a
micro-batch and the loss) for the duration of one run, scores val only (the checkpoint loader does
not know the extra head), and prints the val bank-Hit@5 of every epoch next to the auxiliary loss.

    python scripts/experiments/multi_horizon.py --weight 0.5 --out runs/multi_horizon/w05 \
        --config configs/ablations/base.yaml --set train.max_eval_windows=5000 --set train.patience=8

docs/results.md 10.20 reports the run (against val5k's curve, the same settings without the head).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from lvm_ray.config import load_config, parse_overrides
from lvm_ray.model import memory_gru as mg
from lvm_ray.train import loop, step
from lvm_ray.workflows.prepare import prepare_windows, read_bank


class TwoHorizonGRU(mg.MemoryGRU):
    """MemoryGRU plus a second head on the same fused features, predicting t+2 in training."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.aux_head = mg._make_head(cfg)
        self.aux_pred: torch.Tensor | None = None  # (B, T, D) of the last all-steps call

    def _out(self, h_top, last, x_last):
        z = torch.cat([h_top, self.read_memory(h_top)], dim=-1) if self.cfg.slots > 0 else h_top
        z = self.drop(F.gelu(self.fuse(z)))
        if self.training and z.dim() == 3:
            self.aux_pred = mg._predict(self.cfg, self.aux_head(z), last)
        return mg._predict(self.cfg, mg._apply_head(self.head, z, x_last), last)


def aux_rows(model, b: step.Batch, pool) -> tuple[torch.Tensor, ...]:
    """Step t of a window starting at s predicts position s+2+t, kept while it is inside the
    window (t <= length-2) and among the last step_targets steps: prediction, target (N, D),
    target positions and context starts (N,)."""
    m = mg.unwrap(model)
    pred, m.aux_pred = m.aux_pred, None
    B, T, _ = b.ctx.shape
    t = torch.arange(T)[None, :]
    valid = t <= b.lengths[:, None] - 2
    if b.step_targets > 0:
        valid &= t >= (b.lengths - b.step_targets)[:, None]
    start = b.start.to(torch.int64)
    q = (start[:, None] + 2 + t)[valid]
    s = start[:, None].expand(B, T)[valid]
    return pred[valid.to(pred.device)], pool[q], q, s


@contextlib.contextmanager
def two_horizon_training(weight: float) -> Iterator[None]:
    """Within the block, fit() builds TwoHorizonGRU and adds weight * the t+2 InfoNCE."""
    saved = (loop.build_model, step._rows_and_mask, step.lvm_loss)
    build, rows_and_mask, lvm_loss = saved
    pending: list[tuple[torch.Tensor, ...]] = []

    def rows(model, b, loss_cfg, pool, doc_end=None):
        out = rows_and_mask(model, b, loss_cfg, pool, doc_end)
        if pool is None:
            raise ValueError("the probe needs the all-steps objective with bank negatives")
        pending.append(aux_rows(model, b, pool))
        return out

    def loss(pred, target, cfg, **kw):
        total, parts = lvm_loss(pred, target, cfg, **kw)
        if pending:
            ap, at, q, s = pending.pop()
            mask = (q[None, :] >= s[:, None]) & (q[None, :] <= q[:, None])
            mask[torch.arange(len(q)), torch.arange(len(q))] = False
            aux, _ = lvm_loss(ap, at, cfg, mask=mask.to(ap.device))
            total = total + weight * aux
            parts = {**parts, "aux": float(aux.detach())}
        return total, parts

    loop.build_model, step._rows_and_mask, step.lvm_loss = TwoHorizonGRU, rows, loss
    try:
        yield
    finally:
        loop.build_model, step._rows_and_mask, step.lvm_loss = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weight", type=float, default=0.5, help="weight of the t+2 loss")
    ap.add_argument("--out", required=True, help="run folder (checkpoints, history)")
    ap.add_argument("--config", default="configs/ablations/base.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="section.key=value, as lvm train's --set")
    args = ap.parse_args()
    cfg = load_config(args.config, overrides=parse_overrides(args.overrides))
    bank = read_bank(cfg)
    ws = prepare_windows(cfg, bank)
    with two_horizon_training(args.weight):
        res = loop.fit_local(cfg, bank, ws.train, ws.val, args.out)
    print("epoch  val bank-Hit@5  train t+2 InfoNCE")
    for h in res["history"]:
        print(f"{h['epoch']:>5}  {100 * h['val_bank_hit@5']:>14.2f}  {h.get('train_aux', 0):>17.3f}")
    print(json.dumps({"best_epoch": res["best_epoch"], "weight": args.weight,
                      "best_val_bank_hit@5": res["best_val_bank_hit@5"]}))


if __name__ == "__main__":
    main()
