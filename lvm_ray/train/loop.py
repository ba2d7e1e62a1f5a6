"""The training loop: epochs of accumulated steps, evaluation on val, early stopping on the
selection metric, checkpoints that resume exactly. `fit` is the same for every runtime; `fit_local`
is the plain single-process loop (Ray Train's worker is lvm_ray.distributed.trainer).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lvm_ray.config import Config, ModelConfig, TrainConfig, to_dict
from lvm_ray.console import say
from lvm_ray.data.bank import ConceptBank
from lvm_ray.data.windows import WindowSet, document_ends
from lvm_ray.device import resolve_device
from lvm_ray.eval.lanes import bank_lanes
from lvm_ray.eval.metrics import evaluate, select_key
from lvm_ray.eval.predict import predict_windows
from lvm_ray.model import build_model, set_lanes
from lvm_ray.train.checkpoint import load_checkpoint, load_train_state, save_checkpoint
from lvm_ray.train.step import (
    Collective,
    LocalCollective,
    accumulation_steps,
    groups_of,
    make_optimizer,
    make_scheduler,
    to_batch,
    train_group,
)
from lvm_ray.train.tracking import make_tracker

log = logging.getLogger(__name__)


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
    ecfg = cfg.eval if bootstrap is None else dataclasses.replace(cfg.eval, bootstrap=bootstrap)
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


def fit_lanes(model: torch.nn.Module, cfg: Config, bank: ConceptBank) -> None:
    """Give lane experts their lanes: the evaluation's own lanes (k-means on the train split with
    eval.seed, or the corpus's), so that per-lane Hit@5 is reported on the lanes they route by."""
    cent = bank_lanes(bank, cfg.model.expert_lanes, cfg.eval.seed).centroids
    if len(cent) != cfg.model.expert_lanes:
        raise ValueError(f"the bank's corpus gives {len(cent)} lanes but model.expert_lanes="
                         f"{cfg.model.expert_lanes}; set model.expert_lanes={len(cent)}")
    set_lanes(model, torch.from_numpy(cent))


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


def check_steps(n_rank_windows: int, cfg: TrainConfig, world_size: int) -> int:
    """Optimiser steps per epoch; ValueError when the data cannot fill even one."""
    spe = steps_per_epoch(n_rank_windows, cfg, world_size)
    if spe < 1:
        raise ValueError(f"too few training windows ({n_rank_windows} per worker) for one "
                         f"optimiser step of {cfg.batch_size}; lower train.batch_size or add "
                         "data")
    return spe


def windows_per_rank(n_windows: int, cfg: TrainConfig, world_size: int) -> int:
    """How many training windows each rank sees per epoch (max_train_windows caps the total)."""
    n = n_windows if cfg.max_train_windows is None else min(n_windows, cfg.max_train_windows)
    return n // world_size


def with_bank_width(cfg: Config, bank: ConceptBank) -> Config:
    """cfg with model.d_in taken from the bank when unset; a set value must match it."""
    if cfg.model.d_in is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_in=bank.dim))
    if cfg.model.d_in != bank.dim:
        raise ValueError(f"bank vectors are {bank.dim}-d but model.d_in={cfg.model.d_in}; "
                         "leave model.d_in unset to take it from the bank")
    return cfg


def training_bank(bank: ConceptBank, tc: TrainConfig) -> ConceptBank:
    """The bank with vectors in train.vector_dtype (as given when they already are: the Ray
    workers' shared copy). A cast copy is lean and keeps the full bank's identity, which the
    checkpoints record."""
    if bank.vectors.dtype == np.dtype(tc.vector_dtype):
        return bank
    return bank.lean(tc.vector_dtype)


class RowPool:
    """Bank rows sampled as InfoNCE negatives, gathered per draw from the shared vectors rather
    than copied per worker (on a GPU the rows are copied to it once: device memory is not the
    node's). pool[c] -> (K, D) float32 on `device` for positions c into `rows`."""

    def __init__(self, vectors: np.ndarray, rows: np.ndarray, device: torch.device | str):
        self.vectors, self.rows, self.device = vectors, rows, torch.device(device)
        self.on_device = (torch.from_numpy(vectors[rows].astype(np.float32)).to(self.device)
                          if self.device.type == "cuda" else None)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, c: torch.Tensor) -> torch.Tensor:
        if self.on_device is not None:
            return self.on_device[c.to(self.device)]
        rows = self.rows[c.numpy()]
        return torch.from_numpy(self.vectors[rows].astype(np.float32)).to(self.device)


def weight_average(model: torch.nn.Module, decay: float) -> AveragedModel | None:
    """train.ema: an exponential moving average of `model`'s weights (and buffers), updated
    after every optimiser step; None when decay is 0."""
    if decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def init_weights(model: torch.nn.Module, model_cfg: ModelConfig, path: str | Path) -> None:
    """train.init_from: copy checkpoint `path`'s weights into `model` (weights only). Its model
    config must equal model_cfg except dropout (a fine-tune may regularise differently)."""
    ck = load_checkpoint(path, device="cpu")
    theirs, ours = to_dict(ck.model_config), to_dict(model_cfg)
    diff = sorted(k for k in ours if k != "dropout" and theirs.get(k) != ours[k])
    if diff:
        raise ValueError(f"train.init_from={path}: its model config differs from model.* in "
                         + ", ".join(f"{k} ({theirs.get(k)!r} vs {ours[k]!r})" for k in diff))
    model.load_state_dict(ck.model.state_dict())


def fit(cfg: Config, bank: ConceptBank, train_ws: WindowSet, val_ws: WindowSet,
        rt: Runtime) -> dict[str, Any]:
    """Train with early stopping on the val selection metric; returns the final summary.

    Every epoch: train, evaluate on val (capped at max_eval_windows, a fixed subset), report.
    A checkpoint (weights + full training state) is written whenever val improves; resuming from
    one restores model, optimiser, scheduler, epoch, early stopping and RNG, so a restarted run
    continues exactly where the uninterrupted one would have."""
    cfg = with_bank_width(cfg, bank)
    tc, device, coll = cfg.train, rt.device, rt.collective
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model)
    if cfg.model.experts != "none":
        fit_lanes(model, cfg, bank)
    if tc.init_from and rt.resume_from is None:
        init_weights(model, cfg.model, tc.init_from)
        log.info("weights from %s (train.init_from)", tc.init_from)
    model = model.to(device)
    ema = weight_average(model, tc.ema)
    opt = make_optimizer(model, tc)
    accum = accumulation_steps(tc, coll.world_size)
    spe = check_steps(len(rt.epoch_indices(0)), tc, coll.world_size)
    sched = make_scheduler(opt, tc, spe * tc.max_epochs)
    stopper = EarlyStopping(tc.patience)
    start_epoch = 0
    history: list[dict[str, Any]] = []

    if rt.resume_from is not None:
        ck = load_checkpoint(rt.resume_from, device="cpu")
        st = load_train_state(rt.resume_from)
        if st is None:
            raise ValueError(f"{rt.resume_from} holds no training state to resume from")
        if (ema is not None) != ("ema_n_averaged" in st):
            raise ValueError(f"{rt.resume_from} was trained with a different train.ema")
        if ema is None:
            model.load_state_dict(ck.model.state_dict())
        else:  # the checkpoint's weights are the average; the last step's are in the state
            model.load_state_dict(st["train_weights"])
            ema.module.load_state_dict(ck.model.state_dict())
            ema.n_averaged.copy_(st["ema_n_averaged"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        stopper = EarlyStopping.from_state(st["early_stopping"])
        torch.set_rng_state(st["torch_rng"])
        history = json.loads(st["history_json"])
        start_epoch = int(st["epoch"]) + 1
        log.info("resumed from %s at epoch %d", rt.resume_from, start_epoch)

    # What is scored on val and saved: the weight average when train.ema is on.
    scored = model if ema is None else ema.module
    base, model = model, rt.wrap_model(model)
    val_eval = val_ws.sample(tc.max_eval_windows, tc.seed)
    select = select_key(cfg.eval.select_metric, cfg.eval.pool_size)
    bank = training_bank(bank, tc)
    vectors = bank.vectors
    # Bank and hard negatives are the training split's rows, indexed like window positions.
    use_pool = cfg.loss.negatives == "bank" or cfg.loss.hard_negatives > 0
    negative_pool = RowPool(vectors, train_ws.rows, device) if use_pool else None
    doc_end = (torch.from_numpy(document_ends(bank, train_ws.rows))
               if cfg.loss.hard_negatives > 0 else None)
    summary: dict[str, Any] = {}

    def record(epoch: int, row: dict[str, Any], val: dict[str, Any]) -> None:
        """Early stopping, the history, a checkpoint when val improved, the report, one line."""
        nonlocal summary
        improved = stopper.update(float(val[select]), epoch)
        row = {**row, **{f"val_{k}": v for k, v in val.items()},
               "best_epoch": stopper.best_epoch, f"best_val_{select}": stopper.best,
               "improved": improved}
        history.append(row)
        ckpt_dir = None
        if improved and coll.rank == 0:
            ckpt_dir = save_checkpoint(
                rt.checkpoint_root / f"epoch_{epoch:03d}", scored, cfg.model, epoch=epoch,
                metrics={k: v for k, v in row.items() if isinstance(v, (int, float))},
                data=bank.identity(), config=to_dict(cfg),
                train_state={
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "early_stopping": stopper.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "epoch": epoch,
                    "history_json": json.dumps(history),
                    **({} if ema is None else {"train_weights": base.state_dict(),
                                               "ema_n_averaged": ema.n_averaged}),
                })
        rt.report(row, ckpt_dir)
        summary = row
        if coll.rank == 0:
            # stdout, not logging: under Ray the worker's stdout is what reaches the driver.
            name = "start" if epoch < 0 else f"epoch {epoch}"
            say(f"{name}: loss {row['train_loss']:.4f}  val {select} "
                f"{val[select]:.4f}  best {stopper.best:.4f} @{stopper.best_epoch}  "
                f"{row['windows_per_s']:.0f} windows/s{'  *saved' if improved else ''}")

    if tc.init_from and rt.resume_from is None:
        # The starting weights are epoch -1 (checkpoint epoch_-01): a fine-tune that never beats
        # them on val ends with them, instead of with the least bad epoch of a run that only lost.
        val = evaluate_model(scored, bank, val_eval, cfg, coll, device, bootstrap=0)
        record(-1, {"epoch": -1, "train_loss": float("nan"), "train_windows": 0,
                    "train_seconds": 0.0, "step_seconds": 0.0, "step_seconds_median": 0.0,
                    "windows_per_s": 0.0}, val)

    for epoch in range(start_epoch, tc.max_epochs):
        if stopper.should_stop:
            break
        t0 = time.perf_counter()
        model.train()
        idx = rt.epoch_indices(epoch)
        t_steps = time.perf_counter()  # the steps alone: reading the window ids is O(windows)
        all_steps = tc.objective == "all_steps"
        micro = (to_batch(vectors, train_ws, idx[i : i + tc.micro_batch], device, all_steps,
                          tc.step_targets)
                 for i in range(0, len(idx) - tc.micro_batch + 1, tc.micro_batch))
        totals: dict[str, float] = {}
        n_steps = 0
        step_ends = [t_steps]  # per-step times: a median that one slow step does not move
        for group in groups_of(micro, accum):
            s = train_group(model, group, opt, sched, cfg.loss, tc, coll, negative_pool,
                            doc_end)
            if ema is not None:
                ema.update_parameters(base)
            for k, v in s.items():
                totals[k] = totals.get(k, 0.0) + v
            n_steps += 1
            step_ends.append(time.perf_counter())
            if rt.log_every and n_steps % rt.log_every == 0 and coll.rank == 0:
                log.info("epoch %d step %d/%d loss %.4f", epoch, n_steps, spe, s["loss"])
        train_time = time.perf_counter() - t0
        step_time = (time.perf_counter() - t_steps) / max(1, n_steps)
        train_stats = coll.all_reduce_mean({k: v / max(1, n_steps) for k, v in totals.items()})
        val = evaluate_model(scored, bank, val_eval, cfg, coll, device, bootstrap=0)
        record(epoch, {
            "epoch": epoch,
            "train_loss": train_stats.get("loss", float("nan")),
            **{f"train_{k}": v for k, v in train_stats.items() if k != "loss"},
            "train_windows": int(len(idx)) * coll.world_size,
            "train_seconds": train_time,
            "step_seconds": step_time,
            "step_seconds_median": float(np.median(np.diff(step_ends))) if n_steps else 0.0,
            "windows_per_s": len(idx) * coll.world_size / max(train_time, 1e-9),
        }, val)
    return {"history": history, "best_epoch": stopper.best_epoch,
            f"best_val_{select}": stopper.best, "last": summary,
            "stopped_early": stopper.should_stop}


def fit_local(cfg: Config, bank: ConceptBank, train_ws: WindowSet, val_ws: WindowSet,
              out_dir: str | Path, resume_from: str | Path | None = None) -> dict[str, Any]:
    """The plain single-process PyTorch loop: same `fit`, no Ray. Keeps the best checkpoint
    at out_dir/best and writes training_history.json."""
    out_dir = Path(out_dir)
    tracker = make_tracker(cfg, out_dir)

    def report(row: dict[str, Any], ckpt: Path | None) -> None:
        tracker.log(row, step=int(row["epoch"]))
        # Checkpoints are only written on improvement, so the newest is the best: drop the rest.
        if ckpt is not None:
            for old in ckpt.parent.glob("epoch_*"):
                if old != ckpt:
                    shutil.rmtree(old, ignore_errors=True)

    rt = Runtime(epoch_indices=local_epoch_indices(len(train_ws), cfg.train),
                 report=report, device=torch.device(resolve_device(cfg.train.device)),
                 checkpoint_root=out_dir / "checkpoints",
                 resume_from=Path(resume_from) if resume_from else None)
    try:
        result = fit(cfg, bank, train_ws, val_ws, rt)
    finally:
        tracker.close()
    (out_dir / "training_history.json").write_text(json.dumps(result["history"], indent=2))
    result["best_checkpoint"] = str(rt.checkpoint_root / f"epoch_{result['best_epoch']:03d}")
    return result
