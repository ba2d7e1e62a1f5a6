"""End-to-end workflows shared by the `lvm` CLI, jobs/ and the demo.

document -> ingest (bank) -> windows -> train (Ray Train or the plain loop) -> test evaluation
against the baselines -> run directory with best checkpoint, history, curves and report.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lvm_ray.config import Config
from lvm_ray.data.bank import ConceptBank, load_bank
from lvm_ray.data.windows import WindowSet, check_split_disjoint, check_windows, make_windows

log = logging.getLogger(__name__)


def say(msg: str) -> None:
    """Progress line on stdout (jobs stream it back through `ray job logs`)."""
    print(f"[lvm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_bank(cfg: Config, use_ray: bool = False) -> ConceptBank:
    """Load cfg.bank_path, ingesting the corpus first if needed (cached, resumable). With use_ray,
    ingest embeds through Ray Data actors and the bank is read with ray.data.read_parquet."""
    from lvm_ray.data.ingest import ingest

    bank_path = Path(cfg.bank_path)
    if cfg.corpus.source == "bank":
        # Someone else's bank: checked (finite unit vectors, splits, document order) before use.
        corpus = replace(cfg.corpus, path=cfg.corpus.path or cfg.bank_path)
        bank_path = ingest(corpus, cfg.encoder, cfg.split, bank_path).bank_path
    elif use_ray and cfg.corpus.source != "synthetic":
        from lvm_ray.distributed.data import ingest_with_ray

        res = ingest_with_ray(cfg, bank_path)
        say(f"bank {bank_path}: {res.n_concepts} concepts from {res.n_docs} documents "
            f"({'reused' if res.reused else 'built'} with Ray Data)")
    else:
        res = ingest(cfg.corpus, cfg.encoder, cfg.split, bank_path)
        say(f"bank {bank_path}: {res.n_concepts} concepts from {res.n_docs} documents "
            f"({'reused' if res.reused else 'built'})")
    if use_ray:
        from lvm_ray.distributed.data import read_bank_with_ray

        bank = read_bank_with_ray(bank_path)
    else:
        bank = load_bank(bank_path)
    check_split_disjoint(bank)
    return bank


@dataclass
class Windows:
    train: WindowSet
    val: WindowSet
    test: WindowSet


def prepare_windows(cfg: Config, bank: ConceptBank) -> Windows:
    """Cut and leakage-check the windows of every split."""
    ws = Windows(*(make_windows(bank, s, cfg.window) for s in ("train", "val", "test")))
    for w in (ws.train, ws.val, ws.test):
        check_windows(bank, w)
    say(f"windows (policy={cfg.window.policy}, L={cfg.window.context}, "
        f"stride={cfg.window.stride}): train {len(ws.train)}, val {len(ws.val)}, "
        f"test {len(ws.test)}; leakage check passed")
    return ws


def train_and_evaluate(cfg: Config, use_ray: bool = True, bank: ConceptBank | None = None,
                       record_pids: bool = False) -> dict[str, Any]:
    """Train, pick the best checkpoint by val, evaluate it on test beside the baselines and
    write the run directory. Returns a summary dict."""
    from lvm_ray.eval.evaluate import evaluate_run

    bank = bank if bank is not None else ensure_bank(cfg, use_ray=use_ray)
    ws = prepare_windows(cfg, bank)
    t0 = time.perf_counter()
    if use_ray:
        from lvm_ray.distributed.trainer import run_dir_of, train_with_ray

        say(f"training {cfg.model.kind} with Ray Train on {cfg.scaling.num_workers} worker(s)")
        run = train_with_ray(cfg, bank, ws.train, ws.val, record_pids=record_pids)
        run_dir, best, history = Path(run.run_dir), Path(run.best_checkpoint), run.history
    else:
        from lvm_ray.train.step import fit_local

        run_dir = Path(cfg.run.storage_path) / cfg.run.name
        say(f"training {cfg.model.kind} with the plain PyTorch loop")
        res = fit_local(cfg, bank, ws.train, ws.val, run_dir)
        best, history = Path(res["best_checkpoint"]), res["history"]
    train_seconds = time.perf_counter() - t0
    say(f"training done in {train_seconds:.0f} s; best checkpoint {best}")
    summary = evaluate_run(cfg, bank, ws, best, run_dir, history)
    summary["train_seconds"] = train_seconds
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary

