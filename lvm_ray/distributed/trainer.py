"""Ray Train adapter: runs the core `fit` loop on N DDP workers.

The worker function only translates: it takes its shard of window ids from Ray Data, wraps the
model with `prepare_model`, all-gathers InfoNCE negatives and predictions through
torch.distributed, and turns the core's `report(row, checkpoint_dir)` into `ray.train.report`.
Everything numerical lives in lvm_ray.train.step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lvm_ray.config import Config, from_dict, to_dict
from lvm_ray.console import say
from lvm_ray.data.bank import ConceptBank
from lvm_ray.data.windows import WindowSet
from lvm_ray.eval.metrics import select_key
from lvm_ray.storage import absolute, is_uri, write_text
from lvm_ray.train.checkpoint import CheckpointError, load_train_state, read_meta
from lvm_ray.train.loop import Runtime, fit
from lvm_ray.train.tracking import (MlflowTracker, NoTracker, TensorBoardTracker, Tracker,
                                    WandbTracker, check_available, flat_params, mlflow_uri)

log = logging.getLogger(__name__)
HISTORY = "training_history.json"


class TorchCollective:
    """The Collective protocol over torch.distributed (gloo on CPU, nccl on GPU)."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if self.world_size == 1:
            return [t]
        import torch.distributed as dist

        src = t.detach().contiguous().to(self.device)
        out = [torch.empty_like(src) for _ in range(self.world_size)]
        dist.all_gather(out, src)
        return [o.to(t.device) for o in out]

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return dict(values)
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                         device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}


def run_dir_of(cfg: Config) -> str:
    return f"{absolute(cfg.run.storage_path).rstrip('/')}/{cfg.run.name}"


def make_ray_tracker(cfg: Config, run_dir: str) -> Tracker:
    """The tracker through Ray Train's own integrations: `setup_mlflow` / `setup_wandb` hand
    rank 0 a live session and the other ranks a no-op; TensorBoard is written by rank 0."""
    import ray.train

    kind = cfg.run.tracking
    check_available(kind)
    if kind == "mlflow":
        from ray.air.integrations.mlflow import setup_mlflow

        mlflow = setup_mlflow(config=flat_params(cfg), tracking_uri=mlflow_uri(cfg, run_dir),
                              experiment_name=cfg.run.name, run_name=cfg.run.name,
                              create_experiment_if_not_exists=True, rank_zero_only=True)
        return MlflowTracker(cfg, run_dir, mlflow_module=mlflow)
    if kind == "wandb":
        from ray.air.integrations.wandb import setup_wandb

        run = setup_wandb(config=flat_params(cfg), project="lvm_ray", name=cfg.run.name,
                          dir=run_dir, mode="offline", rank_zero_only=True)
        return WandbTracker(cfg, run_dir, wandb_run=run)
    if kind == "tensorboard" and ray.train.get_context().get_world_rank() == 0:
        if is_uri(run_dir):
            raise ValueError("run.tracking=tensorboard writes event files under a local run "
                             "directory; use mlflow with a tracking server for URI storage")
        return TensorBoardTracker(run_dir)
    return NoTracker()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = from_dict(Config, config["cfg"])
    bank: ConceptBank = ray.get(config["bank_ref"])
    train_ws: WindowSet = ray.get(config["train_ws_ref"])
    val_ws: WindowSet = ray.get(config["val_ws_ref"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # One intra-op thread per CPU the worker owns: oversubscribed OpenMP threads spin and
    # made the GRU 8x slower on 2 shared cores.
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per epoch is ours
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if not config.get("verbose"):
        # Ray Train logs every report's whole TrainingReport (all metrics) at INFO from a logger
        # named by its file path, which LoggingConfig(log_level) does not reach.
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    run_dir = config["run_dir"]
    node_id = ray.get_runtime_context().get_node_id()
    say(f"rank {rank}/{world}: pid {os.getpid()} on node {node_id}")
    if rank == 0 or config.get("record_pids"):
        # Operators (and the fault-injection test) find the worker processes here.
        write_text(f"{run_dir}/worker_pids/rank{rank}.pid", str(os.getpid()))
        write_text(f"{run_dir}/worker_pids/rank{rank}.node", node_id)

    shard = ray.train.get_dataset_shard("train")
    cache: dict[int, np.ndarray] = {}

    def epoch_indices(epoch: int) -> np.ndarray:
        # The shard's window ids, re-read every epoch (Ray Data re-splits), then a seeded
        # shuffle so batches differ per epoch but a restarted run repeats them exactly.
        if epoch not in cache:
            cache.clear()
            ids = np.concatenate([b["window"] for b in shard.iter_batches(
                batch_size=8192, batch_format="numpy")] or [np.zeros(0, np.int64)])
            ids = np.sort(ids)
            np.random.default_rng([cfg.train.seed, epoch, rank]).shuffle(ids)
            if cfg.train.max_train_windows is not None:
                ids = ids[: cfg.train.max_train_windows // world]
            cache[epoch] = ids
        return cache[epoch]

    history_rows: list[dict[str, Any]] = []
    ckpt_root = Path(tempfile.mkdtemp(prefix="lvm_ckpt_"))
    tracker = make_ray_tracker(cfg, run_dir)

    def report(row: dict[str, Any], ckpt_dir: Path | None) -> None:
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float, bool, str))}
        history_rows.append(metrics)
        tracker.log(metrics, step=int(row["epoch"]))
        if rank == 0:
            write_text(f"{run_dir}/{HISTORY}", json.dumps(resumed_history + history_rows,
                                                          indent=2))
        checkpoint = None
        if ckpt_dir is not None:
            checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir))
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"epoch_{row['epoch']:03d}" if checkpoint else None)
        if ckpt_dir is not None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # persisted by Ray; free local disk

    resume_from = None
    resumed_history: list[dict[str, Any]] = []
    restored = ray.train.get_checkpoint()
    if restored is not None:
        resume_from = Path(tempfile.mkdtemp(prefix="lvm_resume_"))
        restored.to_directory(str(resume_from))
        try:
            read_meta(resume_from)  # a checkpoint cut short mid-write fails its checksums
        except CheckpointError as e:
            raise CheckpointError(f"Ray Train restored checkpoint {restored.path}, which is not "
                                  f"valid ({e}); refusing to resume from it") from None
        state = load_train_state(resume_from) or {}
        resumed_history = json.loads(state.get("history_json", "[]"))
        if rank == 0:
            say(f"resuming from checkpoint of epoch {state.get('epoch')}")

    rt = Runtime(
        epoch_indices=epoch_indices,
        report=report,
        collective=TorchCollective(rank, world, device),
        wrap_model=ray.train.torch.prepare_model,
        device=device,
        checkpoint_root=ckpt_root,
        resume_from=resume_from,
    )
    try:
        fit(cfg, bank, train_ws, val_ws, rt)
    finally:
        tracker.close()


@dataclass
class TrainRun:
    run_dir: str
    best_checkpoint: str  # a local directory with the best model
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]
    result: Any  # ray.train.Result


def build_trainer(cfg: Config, bank_ref: Any, train_ws: WindowSet, val_ws: WindowSet, *,
                  storage_path: str, name: str, use_gpu: bool, gpus_per_worker: float = 1.0,
                  record_pids: bool = False, callbacks: tuple = (), verbose: bool = False):
    """The TorchTrainer for one run: window-id dataset, scaling from cfg.scaling, checkpoints
    kept by the val selection metric. Shared by train_with_ray and multi-worker Tune trials."""
    import pyarrow as pa
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    select = f"val_{select_key(cfg.eval.select_metric, cfg.eval.pool_size)}"
    # Windows go to Ray Data as ids only: the vectors stay in the bank, shared once through
    # the object store, so overlapping windows are never copied.
    window_table = pa.table({
        "window": np.arange(len(train_ws), dtype=np.int64),
        "target_concept": train_ws.target_rows,
    })
    # Window-id shards are tiny; their progress bars would drown the per-epoch lines.
    ray.data.DataContext.get_current().enable_progress_bars = False
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": to_dict(cfg),
            "bank_ref": bank_ref,
            "train_ws_ref": ray.put(train_ws),
            "val_ws_ref": ray.put(val_ws),
            "run_dir": f"{storage_path.rstrip('/')}/{name}",
            "record_pids": record_pids,
            "verbose": verbose,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                  **({"GPU": gpus_per_worker} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=list(callbacks),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=select, checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            # Train's own INFO lines (resource requests, every report's full dict) only with -v.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
        ),
        datasets={"train": ray.data.from_arrow(window_table)},
    )


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint Ray Train will resume `run_dir` from (the latest one its checkpoint
    manager snapshot records), verified; None for a new run. A run re-submitted under the same
    name resumes silently, so a checkpoint that fails verification (a write cut short, a
    corrupted file) stops the run here with one clear error instead."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return None
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        name = latest.get("checkpoint_dir_name")
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{snapshot} is corrupted ({e}); move {run_dir} away or choose "
                              "another run.name") from None
    if not name:
        return None
    try:
        read_meta(run_dir / name)
    except CheckpointError as e:
        raise CheckpointError(f"run {run_dir} would resume from {name}, which is not a valid "
                              f"checkpoint ({e}); move {run_dir} away or choose another "
                              "run.name to start over") from None
    return run_dir / name


def share_bank(bank: ConceptBank, vector_dtype: str = "float32") -> tuple[Any, ConceptBank]:
    """Put the lean bank (numeric arrays only: vectors, document codes, positions, splits; no
    texts) in the object store once. Every worker on a node then maps that node's one copy,
    zero-copy. Returns (ref, the driver's bank): with float32 the driver's vectors become a view
    of the stored copy too, so the driver holds no second one."""
    import ray

    # Workers need no texts (not even the lazy reader, which would reopen the bank's files).
    lean = dataclasses.replace(bank.lean(vector_dtype), texts=None)
    ref = ray.put(lean)
    if vector_dtype == "float32":
        stored = ray.get(ref)  # read-only arrays backed by the object store
        bank = dataclasses.replace(bank, vectors=stored.vectors)
    return ref, bank


def train_with_ray(cfg: Config, bank: ConceptBank, train_ws: WindowSet, val_ws: WindowSet,
                   record_pids: bool = False, verbose: bool = False,
                   bank_ref: Any = None) -> TrainRun:
    """Driver side: run the TorchTrainer, fetch the best checkpoint and the history.
    bank_ref: the bank already shared (share_bank); else it is shared here."""
    import ray

    use_gpu = cfg.scaling.use_gpu
    if use_gpu == "auto":
        use_gpu = ray.cluster_resources().get("GPU", 0) >= cfg.scaling.num_workers
    select = f"val_{select_key(cfg.eval.select_metric, cfg.eval.pool_size)}"
    run_dir = run_dir_of(cfg)
    if not is_uri(run_dir):
        resume = resume_checkpoint(Path(run_dir))
        if resume is not None:
            say(f"run {run_dir} exists: resuming from {resume.name}")
    if bank_ref is None:
        bank_ref, _ = share_bank(bank, cfg.train.vector_dtype)
    trainer = build_trainer(cfg, bank_ref, train_ws, val_ws,
                            storage_path=absolute(cfg.run.storage_path), name=cfg.run.name,
                            use_gpu=bool(use_gpu), record_pids=record_pids, verbose=verbose)
    result = trainer.fit()
    if not result.best_checkpoints:
        raise RuntimeError(f"training reported no checkpoint; see {run_dir}")
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1][select])
    local_best = Path(run_dir) / "best" if not is_uri(run_dir) else \
        Path(tempfile.mkdtemp(prefix="lvm_best_")) / "best"
    # Copied aside, verified, then renamed: best/ is never a half-copied checkpoint.
    local_best.parent.mkdir(parents=True, exist_ok=True)
    tmp_best = Path(tempfile.mkdtemp(dir=local_best.parent, prefix=".best.tmp"))
    try:
        best_ckpt.to_directory(str(tmp_best))
        read_meta(tmp_best)
        if local_best.exists():
            shutil.rmtree(local_best)
        os.replace(tmp_best, local_best)
    finally:
        shutil.rmtree(tmp_best, ignore_errors=True)
    history = json.loads((Path(run_dir) / HISTORY).read_text()) if not is_uri(run_dir) else []
    return TrainRun(run_dir, str(local_best), best_metrics, history, result)
