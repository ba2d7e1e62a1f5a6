"""Evaluate trained checkpoints on a split beside the protocol's baselines, on the same windows,
and write the report (Markdown + PNGs + JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lvm_ray.config import Config, WindowConfig, from_dict
from lvm_ray.data.bank import ConceptBank
from lvm_ray.eval.baselines import fit_baselines
from lvm_ray.eval.lanes import (Lanes, bank_lanes, lane_document, lane_markdown, lane_metrics,
                                write_lanes)
from lvm_ray.eval.metrics import evaluate_detailed, hits_from_ranks
from lvm_ray.eval.report import markdown_report, plot_comparison, plot_training_curves
from lvm_ray.train.checkpoint import load_checkpoint
from lvm_ray.train.step import predict_windows, resolve_device

TEST_METRICS = "test_metrics.json"


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """A compact console table: the headline numbers with CIs."""
    first = next(iter(results.values()))
    cols = [("bank-Hit@5", "bank_hit@5"), ("MRR", "mrr"), ("CA", "ca"),
            ("cosine", "cosine"), ("margin", "margin")]
    if "pool_size_fixed" in first:  # the seed's metric at its fixed pool, beside the honest one
        n = first["pool_size_fixed"]
        cols.insert(1, (f"pool{n}-Hit@5", f"pool{n}_hit@5"))
    head = f"{'':28s}" + "".join(f" {c:>23s}" for c, _ in cols)
    lines = [f"windows {first['n_windows']}, bank {first['bank_size']} concepts", head]
    for name, s in results.items():
        cells = []
        for _, key in cols:
            v = s.get(key)
            lo, hi = s.get(f"{key}_lo"), s.get(f"{key}_hi")
            cell = f"{v:.4f}" if v is not None else "-"
            if lo is not None and hi is not None:
                cell += f" [{lo:.3f},{hi:.3f}]"
            cells.append(f" {cell:>23s}")
        lines.append(f"{name[:28]:28s}" + "".join(cells))
    return "\n".join(lines)


def evaluate_on_windows(models: dict[str, Any], bank: ConceptBank, train_ws, val_ws, eval_ws,
                        cfg: Config, lanes: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """Protocol metrics for each model and for the baselines (fit on train, tuned on val),
    all on eval_ws. lanes (N,) per bank row adds per-lane Hit@5 and the canary verdict."""
    device = resolve_device(cfg.train.device)
    preds = {name: predict_windows(model, bank.vectors, eval_ws, device=device)
             for name, model in models.items()}
    for bl in fit_baselines(bank, train_ws, val_ws, cfg.eval):
        preds[bl.name] = bl.predict(bank.vectors, eval_ws)
    results = {}
    for name, pred in preds.items():
        summary, per = evaluate_detailed(pred, eval_ws, bank, cfg.eval)
        if lanes is not None:
            summary.update(lane_metrics(hits_from_ranks(per["rank"], 5),
                                        lanes[eval_ws.target_rows], 5, cfg.eval.bootstrap,
                                        cfg.eval.seed))
        results[name] = summary
    return results


def lanes_of(cfg: Config, bank: ConceptBank) -> Lanes | None:
    """The bank's lanes (corpus, else k-means fit on train), or None when eval.lanes is 0."""
    return bank_lanes(bank, cfg.eval.lanes, cfg.eval.seed) if cfg.eval.lanes > 0 else None


def write_report(results: dict[str, dict[str, Any]], out_dir: Path, title: str,
                 meta: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / "report.md"
    md = markdown_report(results, title, meta)
    lane_md = lane_markdown(results)
    if lane_md:
        md += "\n" + lane_md
    plot_comparison(results, out_dir / "comparison.png")
    md += "\n\n![bank-Hit@5 and CA with 95% CIs](comparison.png)\n"
    report.write_text(md)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return report


def evaluate_run(cfg: Config, bank: ConceptBank, ws, best: Path, run_dir: Path,
                 history: list[dict[str, Any]], split: str = "test") -> dict[str, Any]:
    """The end of a training run: best checkpoint on test vs baselines, artifacts in run_dir."""
    ck = load_checkpoint(best)
    name = f"{cfg.run.name} ({cfg.model.kind})"
    eval_ws = ws.test if split == "test" else ws.val
    lanes = lanes_of(cfg, bank)
    results = evaluate_on_windows({name: ck.model}, bank, ws.train, ws.val, eval_ws, cfg,
                                  None if lanes is None else lanes.ids)
    meta = {"split": split, "checkpoint": str(best), "epoch": ck.meta.get("epoch"),
            "window": f"{cfg.window.policy}, L={cfg.window.context}",
            "encoder": bank.meta.get("encoder"), "n_parameters": ck.meta.get("n_parameters")}
    if lanes is not None:
        meta["lanes"] = lanes.source
    report = write_report(results, run_dir, f"Evaluation of {cfg.run.name} on {split}", meta)
    if history:
        (run_dir / "training_history.json").write_text(json.dumps(history, indent=2))
        plot_training_curves(history, run_dir / "training_curves.png")
    # Next to the weights (outside their checksum) so Serve can show them with the model.
    (best / TEST_METRICS).write_text(json.dumps({"split": split, **results[name]}, indent=2))
    if lanes is not None:
        write_lanes(best, lane_document(results, name, lanes, split))
    return {"run_dir": str(run_dir), "best_checkpoint": str(best), "report": str(report),
            "results": results, "table": summary_table(results)}


def evaluate_checkpoints(ckpts: dict[str, str], cfg: Config, split: str = "test",
                         out_dir: str | Path = "runs/evaluate") -> dict[str, Any]:
    """`lvm evaluate`: several checkpoints, each on the windows of its own training config
    (context length may differ), with the baselines on those same windows."""
    from lvm_ray.workflows import ensure_bank, prepare_windows

    bank = ensure_bank(cfg)
    out_dir = Path(out_dir)
    lanes = lanes_of(cfg, bank)
    all_results: dict[str, dict[str, Any]] = {}
    for name, path in ckpts.items():
        ck = load_checkpoint(path)
        win = ck.meta.get("config", {}).get("window")
        ccfg = cfg if win is None else _with_window(cfg, from_dict(WindowConfig, win))
        ws = prepare_windows(ccfg, bank)
        eval_ws = ws.test if split == "test" else ws.val
        res = evaluate_on_windows({name: ck.model}, bank, ws.train, ws.val, eval_ws, ccfg,
                                  None if lanes is None else lanes.ids)
        if lanes is not None and split == "test":
            write_lanes(path, lane_document(res, name, lanes, split))
        for k, v in res.items():
            key = k if k == name else f"{k} @L={ccfg.window.context}"
            all_results.setdefault(key, v)
    report = write_report(all_results, out_dir, f"lvm_ray evaluation on {split}",
                          {"split": split, "encoder": bank.meta.get("encoder"),
                           "checkpoints": ", ".join(f"{k}={v}" for k, v in ckpts.items())})
    return {"report": str(report), "results": all_results, "table": summary_table(all_results)}


def _with_window(cfg: Config, win: WindowConfig) -> Config:
    from lvm_ray.config import merge, to_dict

    return merge(cfg, {"window": to_dict(win)})
