"""The training recipe in plain PyTorch: optimiser, schedule, accumulated step, evaluation and
early stopping. `fit` runs the whole epoch loop; a runtime (the plain local loop here, or the Ray
Train worker in lvm_ray.distributed.trainer) only supplies the data shard, the collectives and a
`report` callback, so the maths is the same everywhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from lvm_ray.config import Config, LossConfig, TrainConfig, to_dict
from lvm_ray.data.bank import ConceptBank
from lvm_ray.data.windows import WindowSet, gather_batch
from lvm_ray.eval.metrics import evaluate, select_key
from lvm_ray.model import build_model, lvm_loss
from lvm_ray.train.checkpoint import load_train_state, save_checkpoint, unwrap

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
        step_target = torch.from_numpy(vectors[ws.rows[pos]]).to(device)  # (B, T, D)
    return Batch(torch.from_numpy(ctx).to(device), torch.from_numpy(lengths),
                 torch.from_numpy(target).to(device), torch.from_numpy(start), step_target,
                 step_targets)


def _rows_and_mask(model: torch.nn.Module, b: Batch, loss_cfg: LossConfig,
                   negative_pool: torch.Tensor | None):
    """The training rows of one micro-batch for the all-steps objective or bank negatives:
    pred, target (N, D), bank negatives (K, D) or None, and the InfoNCE mask (N, N+K).

    Every target and negative is a position in the split's rows, so the mask removes, per row,
    exactly what the evaluation excludes: the row's own context (positions start .. q-1) and
    its target position q (a duplicate of the positive from an overlapping window)."""
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
    return pred, target, negatives, mask.to(pred.device)


def train_group(model: torch.nn.Module, group: list[Batch], opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, loss_cfg: LossConfig,
                train_cfg: TrainConfig, collective: Collective,
                negative_pool: torch.Tensor | None = None) -> dict[str, float]:
    """One optimiser step over an accumulation group of micro-batches.

    InfoNCE negatives: with `gathered`, every micro-step sees the targets of the whole global
    batch (all micro-batches of the group on all workers), not just its own micro-batch; with
    `bank`, its own targets plus samples of negative_pool (the training split's vectors, (S, D)).
    Batches carrying step targets train on every step (the all-steps objective)."""
    n = len(group)
    if loss_cfg.negatives == "gathered" and loss_cfg.alpha > 0:
        local = torch.cat([b.target for b in group])  # (n*B, D)
        gathered = collective.all_gather(local)
    stats: dict[str, float] = {}
    for j, b in enumerate(group):
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
            if b.step_target is not None or loss_cfg.negatives == "bank":
                pred, target, negs, mask = _rows_and_mask(model, b, loss_cfg, negative_pool)
                if negs is None and extra is not None:
                    # Gathered targets of other micro-batches carry no positions: keep them all.
                    negs = extra
                    mask = torch.cat([mask, mask.new_zeros(len(mask), len(extra))], dim=1)
                loss, parts = lvm_loss(pred, target, loss_cfg, extra_negatives=negs, mask=mask)
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


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_windows(model: torch.nn.Module, vectors: np.ndarray, ws: WindowSet,
                    batch_size: int = 128, device: torch.device | str = "cpu") -> np.ndarray:
    """Predictions (M, D) for every window. Windows are sorted by length so each batch pads
    little; results come back in window order."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = torch.device(device)
    order = np.argsort(ws.lengths, kind="stable")
    out = np.empty((len(ws), vectors.shape[1]), dtype=np.float32)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        b = to_batch(vectors, ws, idx, device)
        pred, _ = model(b.ctx, lengths=b.lengths)
        out[idx] = pred.float().cpu().numpy()
    model.train(was_training)
    return out


def evaluate_model(model: torch.nn.Module, bank: ConceptBank, ws: WindowSet, cfg: Config,
                   collective: Collective | None = None, device: torch.device | str = "cpu",
                   bootstrap: int | None = None) -> dict[str, Any]:
    """Protocol metrics of `model` on `ws`. Under several workers each rank predicts a strided
    share, predictions are all-gathered and every rank computes the same metrics, so early
    stopping decisions agree without a further reduction."""
    collective = collective or LocalCollective()
    r, w = collective.rank, collective.world_size
    mine = np.arange(r, len(ws), w)
    pred = predict_windows(model, bank.vectors, ws.subset(mine), device=device)
    if w > 1:
        n_max = len(range(0, len(ws), w))
        padded = torch.zeros(n_max, bank.dim)
        padded[: len(mine)] = torch.from_numpy(pred)
        parts = collective.all_gather(padded)
        full = np.empty((len(ws), bank.dim), dtype=np.float32)
        for rr, part in enumerate(parts):
            idx = np.arange(rr, len(ws), w)
            full[idx] = part[: len(idx)].numpy()
        pred = full
    ecfg = cfg.eval if bootstrap is None else type(cfg.eval)(**{**to_dict(cfg.eval),
                                                              "ks": cfg.eval.ks,
                                                              "bootstrap": bootstrap})
    return evaluate(pred, ws, bank, ecfg)


# ----------------------------------------------------------------------------- early stopping


@dataclass
class EarlyStopping:
    patience: int
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record one epoch's metric; True if it is a new best."""
        if value > self.best:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"patience": self.patience, "best": self.best, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "EarlyStopping":
        return cls(int(s["patience"]), float(s["best"]), int(s["best_epoch"]),
                   int(s["bad_epochs"]))


# ----------------------------------------------------------------------------- the loop


@dataclass
class Runtime:
    """What `fit` needs from whoever runs it.

    epoch_indices(epoch) -> this rank's window indices into train_ws for that epoch, already
    shuffled (equal counts on every rank). report(metrics, checkpoint_dir or None) is called
    exactly once per epoch on every rank. wrap_model lets Ray wrap in DDP."""

    epoch_indices: Callable[[int], np.ndarray]
    report: Callable[[dict[str, Any], Path | None], None]
    collective: Collective = field(default_factory=LocalCollective)
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
    device: torch.device = torch.device("cpu")
    checkpoint_root: Path = Path("checkpoints")
    resume_from: Path | None = None
    log_every: int = 0


def local_epoch_indices(n_windows: int, cfg: TrainConfig, rank: int = 0, world: int = 1):
    """Seeded per-epoch shuffle, strided across ranks, equal counts per rank."""

    def indices(epoch: int) -> np.ndarray:
        rng = np.random.default_rng([cfg.seed, epoch])
        perm = rng.permutation(n_windows)
        if cfg.max_train_windows is not None:
            perm = perm[: cfg.max_train_windows]
        per_rank = len(perm) // world
        return perm[rank : per_rank * world : world]

    return indices


def steps_per_epoch(n_rank_windows: int, cfg: TrainConfig, world_size: int) -> int:
    return n_rank_windows // cfg.micro_batch // accumulation_steps(cfg, world_size)


def fit(cfg: Config, bank: ConceptBank, train_ws: WindowSet, val_ws: WindowSet,
        rt: Runtime) -> dict[str, Any]:
    """Train with early stopping on the val selection metric; returns the final summary.

    Every epoch: train, evaluate on val (capped at max_eval_windows, a fixed subset), report.
    A checkpoint (weights + full training state) is written whenever val improves; resuming from
    one restores model, optimiser, scheduler, epoch, early stopping and RNG, so a restarted run
    continues exactly where the uninterrupted one would have."""
    tc, device, coll = cfg.train, rt.device, rt.collective
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model).to(device)
    if bank.dim != cfg.model.d_in:
        raise ValueError(f"bank vectors are {bank.dim}-d but model.d_in={cfg.model.d_in}")
    opt = make_optimizer(model, tc)
    accum = accumulation_steps(tc, coll.world_size)
    n_rank = len(rt.epoch_indices(0))
    spe = steps_per_epoch(n_rank, tc, coll.world_size)
    if spe < 1:
        raise ValueError(f"too few training windows ({n_rank} per worker) for one optimiser "
                         f"step of {tc.batch_size}; lower train.batch_size or add data")
    sched = make_scheduler(opt, tc, spe * tc.max_epochs)
    stopper = EarlyStopping(tc.patience)
    start_epoch = 0
    history: list[dict[str, Any]] = []

    if rt.resume_from is not None:
        from lvm_ray.train.checkpoint import load_checkpoint  # local: avoids a cycle at import

        ck = load_checkpoint(rt.resume_from, device="cpu")
        model.load_state_dict(ck.model.state_dict())
        st = load_train_state(rt.resume_from)
        if st is None:
            raise ValueError(f"{rt.resume_from} holds no training state to resume from")
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        stopper = EarlyStopping.from_state(st["early_stopping"])
        torch.set_rng_state(st["torch_rng"])
        history = json.loads(st["history_json"])
        start_epoch = int(st["epoch"]) + 1
        log.info("resumed from %s at epoch %d", rt.resume_from, start_epoch)

    model = rt.wrap_model(model)
    val_eval = val_ws.sample(tc.max_eval_windows, tc.seed)
    select = select_key(cfg.eval.select_metric, cfg.eval.pool_size)
    vectors = bank.vectors
    # Bank negatives are drawn from the training split's rows, indexed like window positions.
    negative_pool = (torch.from_numpy(vectors[train_ws.rows]).to(device)
                     if cfg.loss.negatives == "bank" else None)
    summary: dict[str, Any] = {}

    for epoch in range(start_epoch, tc.max_epochs):
        if stopper.should_stop:
            break
        t0 = time.perf_counter()
        model.train()
        idx = rt.epoch_indices(epoch)
        all_steps = tc.objective == "all_steps"
        micro = (to_batch(vectors, train_ws, idx[i : i + tc.micro_batch], device, all_steps,
                          tc.step_targets)
                 for i in range(0, len(idx) - tc.micro_batch + 1, tc.micro_batch))
        totals: dict[str, float] = {}
        n_steps = 0
        for group in groups_of(micro, accum):
            s = train_group(model, group, opt, sched, cfg.loss, tc, coll, negative_pool)
            for k, v in s.items():
                totals[k] = totals.get(k, 0.0) + v
            n_steps += 1
            if rt.log_every and n_steps % rt.log_every == 0 and coll.rank == 0:
                log.info("epoch %d step %d/%d loss %.4f", epoch, n_steps, spe, s["loss"])
        train_time = time.perf_counter() - t0
        train_stats = coll.all_reduce_mean({k: v / max(1, n_steps) for k, v in totals.items()})
        val = evaluate_model(model, bank, val_eval, cfg, coll, device, bootstrap=0)
        improved = stopper.update(float(val[select]), epoch)
        row = {
            "epoch": epoch,
            "train_loss": train_stats.get("loss", float("nan")),
            **{f"train_{k}": v for k, v in train_stats.items() if k != "loss"},
            **{f"val_{k}": v for k, v in val.items()},
            "train_windows": int(len(idx)) * coll.world_size,
            "train_seconds": train_time,
            "windows_per_s": len(idx) * coll.world_size / max(train_time, 1e-9),
            "best_epoch": stopper.best_epoch,
            f"best_val_{select}": stopper.best,
            "improved": improved,
        }
        history.append(row)
        ckpt_dir = None
        if improved and coll.rank == 0:
            ckpt_dir = save_checkpoint(
                rt.checkpoint_root / f"epoch_{epoch:03d}", model, cfg.model, epoch=epoch,
                metrics={k: v for k, v in row.items() if isinstance(v, (int, float))},
                data=bank.identity(), config=to_dict(cfg),
                train_state={
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "early_stopping": stopper.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "epoch": epoch,
                    "history_json": json.dumps(history),
                })
        rt.report(row, ckpt_dir)
        summary = row
        if coll.rank == 0:
            # print, not logging: under Ray the worker's stdout is what reaches the driver.
            print(f"[lvm] epoch {epoch}: loss {row['train_loss']:.4f}  val {select} "
                  f"{val[select]:.4f}  best {stopper.best:.4f} @{stopper.best_epoch}  "
                  f"{row['windows_per_s']:.0f} windows/s{'  *saved' if improved else ''}",
                  flush=True)
    return {"history": history, "best_epoch": stopper.best_epoch,
            f"best_val_{select}": stopper.best, "last": summary,
            "stopped_early": stopper.should_stop}


def fit_local(cfg: Config, bank: ConceptBank, train_ws: WindowSet, val_ws: WindowSet,
              out_dir: str | Path, resume_from: str | Path | None = None) -> dict[str, Any]:
    """The plain single-process PyTorch loop: same `fit`, no Ray. Keeps the best checkpoint
    at out_dir/best and writes training_history.json."""
    out_dir = Path(out_dir)

    def report(row: dict[str, Any], ckpt: Path | None) -> None:
        # Checkpoints are only written on improvement, so the newest is the best: drop the rest.
        if ckpt is not None:
            for old in ckpt.parent.glob("epoch_*"):
                if old != ckpt:
                    shutil.rmtree(old, ignore_errors=True)

    rt = Runtime(epoch_indices=local_epoch_indices(len(train_ws), cfg.train),
                 report=report, device=resolve_device(cfg.train.device),
                 checkpoint_root=out_dir / "checkpoints",
                 resume_from=Path(resume_from) if resume_from else None)
    result = fit(cfg, bank, train_ws, val_ws, rt)
    (out_dir / "training_history.json").write_text(json.dumps(result["history"], indent=2))
    result["best_checkpoint"] = str(rt.checkpoint_root / f"epoch_{result['best_epoch']:03d}")
    return result
