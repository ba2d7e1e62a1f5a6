"""One optimiser step of the training recipe in plain PyTorch: optimiser, schedule, the batch of
windows, and an accumulation group of micro-batches (with the InfoNCE negatives each sees).

The epoch loop, evaluation during training and early stopping live in lvm_ray.train.loop; a
runtime (the plain local loop, or the Ray Train worker) only supplies data, collectives and a
`report` callback, so the maths is the same everywhere.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch

from lvm_ray.config import LossConfig, TrainConfig
from lvm_ray.data.windows import WindowSet, gather_batch
from lvm_ray.model import lvm_loss

# ----------------------------------------------------------------------------- collectives


class Collective(Protocol):
    """What the loop needs from a process group. Local runs use `LocalCollective`."""

    rank: int
    world_size: int

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]: ...
    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]: ...


class LocalCollective:
    rank = 0
    world_size = 1

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [t]

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        return dict(values)


# ----------------------------------------------------------------------------- optimisation


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on norms, biases, temperatures: decaying them only fights the model.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from ~0 to lr over warmup_frac of all steps, then cosine decay to 0."""
    total_steps = max(1, total_steps)
    warmup = max(1, int(round(cfg.warmup_frac * total_steps))) if cfg.warmup_frac > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-steps per optimiser step so that micro_batch * world_size * steps == batch_size."""
    per_step = cfg.micro_batch * world_size
    if cfg.batch_size % per_step:
        raise ValueError(f"train.batch_size={cfg.batch_size} must be a multiple of "
                         f"micro_batch*workers={per_step}")
    return cfg.batch_size // per_step


@dataclass
class Batch:
    ctx: torch.Tensor  # (B, T, D) right-padded
    lengths: torch.Tensor  # (B,)
    target: torch.Tensor  # (B, D)
    start: torch.Tensor | None = None  # (B,) context start, a position in the split's rows
    step_target: torch.Tensor | None = None  # (B, T, D) the next vector after every step
    step_targets: int = 0  # all-steps: only each row's last step_targets steps are targets


def to_batch(vectors: np.ndarray, ws: WindowSet, idx: np.ndarray, device: torch.device,
             all_steps: bool = False, step_targets: int = 0) -> Batch:
    ctx, lengths, target, _ = gather_batch(vectors, ws, idx)
    start = ws.start[np.asarray(idx, dtype=np.int64)]
    step_target = None
    if all_steps:
        # Step t's target is the row after it: positions start+1 .. end, all inside the window.
        pos = np.minimum(start[:, None] + 1 + np.arange(ctx.shape[1]), (start + lengths)[:, None])
        step_target = torch.from_numpy(  # (B, T, D); a float16 bank widens here
            vectors[ws.rows[pos]].astype(np.float32, copy=False)).to(device)
    return Batch(torch.from_numpy(ctx).to(device), torch.from_numpy(lengths),
                 torch.from_numpy(target).to(device), torch.from_numpy(start), step_target,
                 step_targets)


def noisy_context(b: Batch, std: float) -> Batch:
    """b with N(0, std^2) added to each real context vector (not the padding), re-normalised.
    Drawn from torch's global CPU RNG, as the bank negatives: a resumed run draws the same."""
    T = b.ctx.shape[1]
    real = (torch.arange(T)[None, :] < b.lengths[:, None]).to(b.ctx.device)  # (B, T)
    x = b.ctx + std * torch.randn(b.ctx.shape).to(b.ctx.device) * real[..., None]
    x = torch.where(real[..., None], torch.nn.functional.normalize(x, dim=-1), b.ctx)
    return replace(b, ctx=x)


def _rows_and_mask(model: torch.nn.Module, b: Batch, loss_cfg: LossConfig,
                   negative_pool: torch.Tensor | None, doc_end: torch.Tensor | None = None):
    """The training rows of one micro-batch for the all-steps objective, bank or hard negatives:
    pred, target (N, D), bank negatives (K, D) or None, the InfoNCE mask (N, N+K), and each
    row's hard negatives (N, H, D) with their mask (N, H), or None, None.

    Every target and negative is a position in the split's rows, so the mask removes, per row,
    exactly what the evaluation excludes: the row's own context (positions start .. q-1) and
    its target position q (a duplicate of the positive from an overlapping window). Row q's
    hard negatives are positions q+1 .. q+H of negative_pool (the split's vectors), masked past
    doc_end[q] (S,), the end of q's document."""
    B, T, _ = b.ctx.shape
    start = b.start.to(torch.int64)  # (B,)
    if b.step_target is not None:
        pred_all, _ = model(b.ctx, lengths=b.lengths, all_steps=True)  # (B, T, D)
        t = torch.arange(T)[None, :]
        valid = t < b.lengths[:, None]  # (B, T)
        if b.step_targets > 0:
            valid &= t >= (b.lengths - b.step_targets)[:, None]
        pred, target = pred_all[valid.to(pred_all.device)], b.step_target[valid.to(pred_all.device)]
        q = (start[:, None] + 1 + torch.arange(T)[None, :])[valid]  # (N,) target positions
        s = start[:, None].expand(B, T)[valid]  # (N,)
    else:
        pred, _ = model(b.ctx, lengths=b.lengths)
        target, q, s = b.target, start + b.lengths, start
    cand = q
    negatives = None
    if loss_cfg.negatives == "bank" and negative_pool is not None:
        # torch's global RNG: saved in the training state, so a resumed run draws the same.
        c = torch.randint(len(negative_pool), (loss_cfg.bank_negatives,))
        negatives = negative_pool[c]  # (K, D)
        cand = torch.cat([q, c])
    mask = (cand[None, :] >= s[:, None]) & (cand[None, :] <= q[:, None])  # (N, N+K)
    mask[torch.arange(len(q)), torch.arange(len(q))] = False
    hard = hard_mask = None
    if loss_cfg.hard_negatives > 0:
        if negative_pool is None or doc_end is None:
            raise ValueError("loss.hard_negatives needs the split's vectors and document ends")
        h = q[:, None] + 1 + torch.arange(loss_cfg.hard_negatives)[None, :]  # (N, H)
        past_end = h >= doc_end[q][:, None]
        hard = negative_pool[h.clamp(max=len(negative_pool) - 1).to(negative_pool.device)]
        # The target's own text later in the document is no negative (the evaluation counts
        # such ties in the target's favour).
        same = torch.einsum("nhd,nd->nh", hard, target.detach()) > 1.0 - 1e-6
        hard_mask = past_end.to(pred.device) | same  # (N, H)
    return pred, target, negatives, mask.to(pred.device), hard, hard_mask


def train_group(model: torch.nn.Module, group: list[Batch], opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, loss_cfg: LossConfig,
                train_cfg: TrainConfig, collective: Collective,
                negative_pool: torch.Tensor | None = None,
                doc_end: torch.Tensor | None = None) -> dict[str, float]:
    """One optimiser step over an accumulation group of micro-batches.

    InfoNCE negatives: with `gathered`, every micro-step sees the targets of the whole global
    batch (all micro-batches of the group on all workers), not just its own micro-batch; with
    `bank`, its own targets plus samples of negative_pool (the training split's vectors, (S, D)).
    With hard_negatives, each row also sees the concepts after its target in its document
    (doc_end (S,): document_ends of the split). Batches carrying step targets train on every
    step (the all-steps objective)."""
    n = len(group)
    if loss_cfg.negatives == "gathered" and loss_cfg.alpha > 0:
        local = torch.cat([b.target for b in group])  # (n*B, D)
        gathered = collective.all_gather(local)
    stats: dict[str, float] = {}
    for j, b in enumerate(group):
        if train_cfg.context_noise > 0:
            b = noisy_context(b, train_cfg.context_noise)
        extra = None
        if loss_cfg.negatives == "gathered" and loss_cfg.alpha > 0:
            sizes = [len(x.target) for x in group]
            lo = sum(sizes[:j])
            own = torch.cat([local[:lo], local[lo + sizes[j]:]])
            others = [g for r, g in enumerate(gathered) if r != collective.rank]
            extra = torch.cat([own, *others]) if (len(own) or others) else None
        # DDP: only the last micro-step all-reduces gradients.
        sync = contextlib.nullcontext() if j == n - 1 or not hasattr(model, "no_sync") \
            else model.no_sync()
        with sync:
            if (b.step_target is not None or loss_cfg.negatives == "bank"
                    or loss_cfg.hard_negatives > 0):
                pred, target, negs, mask, hard, hard_mask = _rows_and_mask(
                    model, b, loss_cfg, negative_pool, doc_end)
                if negs is None and extra is not None:
                    # Gathered targets of other micro-batches carry no positions: keep them all.
                    negs = extra
                    mask = torch.cat([mask, mask.new_zeros(len(mask), len(extra))], dim=1)
                loss, parts = lvm_loss(pred, target, loss_cfg, extra_negatives=negs, mask=mask,
                                       row_negatives=hard, row_mask=hard_mask)
            else:
                pred, _ = model(b.ctx, lengths=b.lengths)
                loss, parts = lvm_loss(pred, b.target, loss_cfg, extra_negatives=extra)
            (loss / n).backward()
        for k, v in parts.items():
            stats[k] = stats.get(k, 0.0) + v / n
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    stats["grad_norm"] = float(grad_norm)
    stats["lr"] = float(sched.get_last_lr()[0])
    return stats


def groups_of(it: Iterable[Batch], n: int) -> Iterator[list[Batch]]:
    """Accumulation groups; a trailing partial group is dropped so every rank steps alike."""
    group: list[Batch] = []
    for b in it:
        group.append(b)
        if len(group) == n:
            yield group
            group = []
