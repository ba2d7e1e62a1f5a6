"""`lvm evaluate --ensemble`: ensembles of saved checkpoints, scored like any model.

    lvm evaluate --ensemble pair=runs/base/best,runs/gru/best            # weights chosen on val
    lvm evaluate --ensemble-pool runs/a/best,runs/b/best,runs/c/best --ensemble-sizes 2,3

Every member predicts the same windows (each reads at most the context it was trained with); the
fusion (lvm_ray.eval.ensemble) gets its weights on val and is scored on test beside its members
and the baselines, on the same windows, with per-lane Hit@5 and the per-query cost. A pool search
ranks every subset of the given sizes on val (equal-weight score fusion), keeps the best of each
size, then chooses its weights on val: the test split never picks anything. Each ensemble gets an
ensemble.json that Serve deploys (serve_configs/ensemble.yaml).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from lvm_ray.config import Config, WindowConfig, from_dict
from lvm_ray.console import say
from lvm_ray.data.bank import ConceptBank, check_identity
from lvm_ray.data.windows import WindowSet
from lvm_ray.device import resolve_device
from lvm_ray.eval.baselines import fit_baselines
from lvm_ray.eval.compare import lanes_of
from lvm_ray.eval.ensemble import (ENSEMBLE_JSON, FUSIONS, choose_weights, ensemble_document,
                                   fuse_vectors, member_lists, rank_summary, rrf_ranks)
from lvm_ray.eval.lanes import Lanes, lane_document, lane_metrics, write_lanes
from lvm_ray.eval.metrics import bank_ranks_for_windows, evaluate_detailed, hits_from_ranks
from lvm_ray.eval.predict import predict_windows
from lvm_ray.eval.report import is_baseline, summary_table, write_report
from lvm_ray.model import count_parameters
from lvm_ray.train.checkpoint import LoadedCheckpoint, load_checkpoint
from lvm_ray.workflows.prepare import prepare_windows, read_bank

ENSEMBLES_JSON = "ensembles.json"


@dataclasses.dataclass
class Member:
    name: str
    path: str
    ckpt: LoadedCheckpoint
    context: int  # the context it was trained with: it reads at most this many vectors
    val: np.ndarray | None = None  # (M_val, D) predictions
    test: np.ndarray | None = None  # (M_test, D)
    ms_per_query: float = 0.0  # model time per test window (batched, this machine)


def _capped(ws: WindowSet, context: int) -> WindowSet:
    """The same windows, each reading at most its last `context` vectors."""
    return WindowSet(ws.split, ws.rows, np.maximum(ws.start, ws.end - context), ws.end,
                     min(context, ws.context), ws.policy)


def load_members(paths: list[str]) -> dict[str, Member]:
    """Checkpoints by path, named by their run (evaluate_ensembles checks each against the
    bank)."""
    members: dict[str, Member] = {}
    for path in dict.fromkeys(paths):
        ck = load_checkpoint(path)
        conf = ck.meta.get("config", {})
        name = conf.get("run", {}).get("name") or Path(path).name
        while name in (m.name for m in members.values()):
            name += "'"
        ctx = int(conf.get("window", {}).get("context") or 1000)
        members[path] = Member(name, path, ck, ctx)
    return members


def _window_config(cfg: Config, members: dict[str, Member]) -> Config:
    """The first member's recorded window settings, with the longest member context."""
    first = next(iter(members.values()))
    win = first.ckpt.meta.get("config", {}).get("window")
    wcfg = cfg.window if win is None else from_dict(WindowConfig, win)
    wcfg = dataclasses.replace(wcfg, context=max(m.context for m in members.values()),
                               min_coherence=None, min_coherence_quantile=None)
    return dataclasses.replace(cfg, window=wcfg)


def _predict_members(members: dict[str, Member], bank: ConceptBank, val_ws: WindowSet,
                     test_ws: WindowSet, device: str) -> None:
    for m in members.values():
        m.val = predict_windows(m.ckpt.model, bank.vectors, _capped(val_ws, m.context),
                                device=device)
        t0 = time.perf_counter()
        m.test = predict_windows(m.ckpt.model, bank.vectors, _capped(test_ws, m.context),
                                 device=device)
        m.ms_per_query = 1000 * (time.perf_counter() - t0) / max(len(test_ws), 1)


def _summary(pred: np.ndarray, ws: WindowSet, bank: ConceptBank, cfg: Config,
             lanes: np.ndarray | None) -> dict[str, Any]:
    summary, per = evaluate_detailed(pred, ws, bank, cfg.eval)
    if lanes is not None:
        summary.update(lane_metrics(hits_from_ranks(per["rank"], 5), lanes[ws.target_rows], 5,
                                    cfg.eval.bootstrap, cfg.eval.seed))
    return summary


def search_pool(members: list[Member], bank: ConceptBank, val_ws: WindowSet, size: int,
                k: int = 5) -> tuple[list[Member], float]:
    """The subset of `size` members with the best val bank-Hit@k under equal-weight score
    fusion (first in pool order on ties)."""
    best, best_hit = None, -1.0
    for combo in itertools.combinations(members, size):
        pred = fuse_vectors([m.val for m in combo])
        hit = float(hits_from_ranks(bank_ranks_for_windows(pred, bank.vectors, val_ws), k).mean())
        say(f"  val bank-Hit@{k} {100 * hit:.2f}%  {' + '.join(m.name for m in combo)}")
        if hit > best_hit:
            best, best_hit = list(combo), hit
    if best is None:
        raise ValueError(f"the pool has {len(members)} members: no subset of size {size}")
    return best, best_hit


def evaluate_ensembles(ensembles: dict[str, list[str]], cfg: Config, split: str = "test",
                       out_dir: str | Path = "runs/evaluate_ensembles",
                       fusions: tuple[str, ...] = FUSIONS, pool: list[str] | None = None,
                       sizes: tuple[int, ...] = (2, 3), step: float = 0.1,
                       allow_bank_mismatch: bool = False) -> dict[str, Any]:
    """Score each ensemble (name -> checkpoint paths) and the best pool subsets on `split`
    beside their members and the baselines; write report.md, ensembles.json and one
    <out_dir>/<ensemble>/ensemble.json per ensemble. cfg names the bank (never ingested; the
    members must have been trained on it unless allow_bank_mismatch)."""
    unknown = sorted(set(fusions) - set(FUSIONS))
    if unknown or not fusions:
        raise ValueError(f"unknown fusion(s) {unknown}; choose from {', '.join(FUSIONS)}")
    if not ensembles and not pool:
        raise ValueError("give at least one ensemble (name=PATH,PATH) or a pool to search")
    out_dir = Path(out_dir)
    bank = read_bank(cfg)
    paths = [p for ps in ensembles.values() for p in ps] + list(pool or [])
    members = load_members(paths)
    for m in members.values():  # every member on this bank (each on what it recorded)
        diffs = check_identity(m.ckpt.meta.get("data"), bank, m.path, cfg.bank_path,
                               allow_bank_mismatch)
        if diffs:
            say(f"warning: {m.name} was not trained on {cfg.bank_path} ({'; '.join(diffs)}); "
                "evaluating anyway (--allow-bank-mismatch)")
    ccfg = _window_config(cfg, members)
    ws = prepare_windows(ccfg, bank)
    eval_ws = ws.test if split == "test" else ws.val
    device = resolve_device(cfg.train.device)
    _predict_members(members, bank, ws.val, eval_ws, device)
    lane_obj = lanes_of(cfg, bank)
    lanes = None if lane_obj is None else lane_obj.ids

    results: dict[str, dict[str, Any]] = {}
    for m in members.values():
        results[m.name] = _summary(m.test, eval_ws, bank, ccfg, lanes)
    for bl in fit_baselines(bank, ws.baseline_train, ws.val, cfg.eval):
        results[bl.name] = _summary(bl.predict(bank.vectors, eval_ws), eval_ws, bank, ccfg, lanes)

    chosen = {name: [members[p] for p in dict.fromkeys(ps)] for name, ps in ensembles.items()}
    searched = {}
    if pool:
        pool_members = [members[p] for p in dict.fromkeys(pool)]
        for size in sizes:
            say(f"ensemble pool search, size {size} (val, equal-weight score fusion):")
            best, hit = search_pool(pool_members, bank, ws.val, size)
            name = f"best{size}"
            chosen[name], searched[name] = best, hit

    records = []
    for name, group in chosen.items():
        rec = _evaluate_one(name, group, bank, ws.val, eval_ws, ccfg, fusions, step, lane_obj,
                            results, out_dir)
        if name in searched:
            rec["searched"] = {"equal_weight_val_bank_hit@5": searched[name]}
        records.append(rec)
    meta = {"split": split, "encoder": bank.meta.get("encoder"),
            "window": f"{ccfg.window.policy}, L={ccfg.window.context} (each member reads at most "
                      "its own trained context)",
            "weights": f"chosen on val ({len(ws.val)} windows), grid step {step}",
            "rrf": "MRR of RRF rows is truncated at the union of the members' top-100 lists; "
                   "RRF makes no vector, so CA, cosine, margin and pool-Hit are n/a",
            "members": ", ".join(f"{m.name}={m.path}" for m in members.values())}
    report = write_report(results, out_dir, f"lvm_ray ensembles on {split}", meta)
    (out_dir / ENSEMBLES_JSON).write_text(json.dumps(records, indent=2))
    return {"report": str(report), "results": results, "records": records,
            "table": summary_table(results)}


def _evaluate_one(name: str, group: list[Member], bank: ConceptBank, val_ws: WindowSet,
                  eval_ws: WindowSet, cfg: Config, fusions: tuple[str, ...], step: float,
                  lane_obj: Lanes | None, results: dict[str, dict], out_dir: Path
                  ) -> dict[str, Any]:
    """Weights on val, scores on eval_ws for each fusion; ensemble.json for Serve."""
    lanes = None if lane_obj is None else lane_obj.ids
    weights, val_hits, rows = {}, {}, {}
    model_ms = sum(m.ms_per_query for m in group)
    for fusion in fusions:
        w, val_hit = choose_weights(fusion, [m.val for m in group], bank.vectors, val_ws,
                                    step=step)
        t0 = time.perf_counter()
        if fusion == "score":
            pred = fuse_vectors([m.test for m in group], w)
            fuse_ms = 1000 * (time.perf_counter() - t0) / len(eval_ws)
            summary = _summary(pred, eval_ws, bank, cfg, lanes)
        else:
            lists = [member_lists(m.test, bank.vectors, eval_ws) for m in group]
            ranks = rrf_ranks(lists, eval_ws, w)
            fuse_ms = 1000 * (time.perf_counter() - t0) / len(eval_ws)
            summary = rank_summary(ranks, eval_ws, cfg.eval.ks, cfg.eval.bootstrap, cfg.eval.seed)
            if lanes is not None:
                summary.update(lane_metrics(hits_from_ranks(ranks, 5), lanes[eval_ws.target_rows],
                                            5, cfg.eval.bootstrap, cfg.eval.seed))
        summary.update(ensemble_model_ms_per_query=model_ms, ensemble_fusion_ms_per_query=fuse_ms)
        label = f"{name} ({fusion})"
        results[label] = summary
        weights[fusion], val_hits[fusion] = w, val_hit
        rows[fusion] = {"label": label, "weights": [float(x) for x in w], "val_bank_hit@5": val_hit,
                        "fusion_ms_per_query": fuse_ms}
        say(f"ensemble {label}: weights {np.round(w, 2).tolist()} (val bank-Hit@5 "
            f"{100 * val_hit:.2f}%), test bank-Hit@5 {100 * summary['bank_hit@5']:.2f}%")
    default = max(val_hits, key=lambda f: val_hits[f])
    (out_dir / name).mkdir(parents=True, exist_ok=True)
    # Member paths relative to the spec, so a runs/ tree can move as a whole.
    rel = [(m.name, os.path.relpath(Path(m.path).resolve(), (out_dir / name).resolve()))
           for m in group]
    doc = ensemble_document(name, rel, weights, val_hits, default)
    (out_dir / name / ENSEMBLE_JSON).write_text(json.dumps(doc, indent=2))
    if lane_obj is not None:  # what Serve's /v1/status shows for the served fusion
        lane_res = {k: v for k, v in results.items() if k == f"{name} ({default})"
                    or is_baseline(k)}
        write_lanes(out_dir / name, lane_document(lane_res, f"{name} ({default})", lane_obj,
                                                  eval_ws.split))
    return {"name": name, "members": [{"name": m.name, "checkpoint": m.path,
                                       "n_parameters": count_parameters(m.ckpt.model),
                                       "model_ms_per_query": m.ms_per_query} for m in group],
            "n_parameters": sum(count_parameters(m.ckpt.model) for m in group),
            "model_ms_per_query": model_ms, "fusions": rows, "default_fusion": default,
            "spec": str(out_dir / name / ENSEMBLE_JSON)}
