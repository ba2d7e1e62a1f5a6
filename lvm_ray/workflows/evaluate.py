"""Evaluating saved checkpoints: load them, cut each one's own windows, score it beside the
baselines on the same windows (lvm_ray.eval.compare) and write the report. Used at the end of a
training run, by `lvm evaluate`, and for a sweep's best trial."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lvm_ray.config import Config, WindowConfig, from_dict
from lvm_ray.data.bank import ConceptBank
from lvm_ray.eval.compare import evaluate_on_windows, lanes_of
from lvm_ray.eval.lanes import lane_document, write_lanes
from lvm_ray.eval.report import (markdown_report, plot_comparison, plot_training_curves,
                                 summary_table, write_report)
from lvm_ray.eval.sweep import objective_metric, trial_config
from lvm_ray.train.checkpoint import load_checkpoint
from lvm_ray.workflows.prepare import Windows, ensure_bank, prepare_windows

TEST_METRICS = "test_metrics.json"


def evaluate_run(cfg: Config, bank: ConceptBank, ws: Windows, best: Path, run_dir: Path,
                 history: list[dict[str, Any]], split: str = "test") -> dict[str, Any]:
    """The end of a training run: best checkpoint on test vs baselines, artifacts in run_dir."""
    ck = load_checkpoint(best)
    name = f"{cfg.run.name} ({cfg.model.kind})"
    eval_ws = ws.test if split == "test" else ws.val
    lanes = lanes_of(cfg, bank)
    results = evaluate_on_windows({name: ck.model}, bank, ws.baseline_train, ws.val, eval_ws,
                                  cfg, None if lanes is None else lanes.ids)
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
    bank = ensure_bank(cfg)
    out_dir = Path(out_dir)
    lanes = lanes_of(cfg, bank)
    all_results: dict[str, dict[str, Any]] = {}
    for name, path in ckpts.items():
        ck = load_checkpoint(path)
        win = ck.meta.get("config", {}).get("window")
        ccfg = cfg if win is None else dataclasses.replace(cfg, window=from_dict(WindowConfig, win))
        ws = prepare_windows(ccfg, bank)
        eval_ws = ws.test if split == "test" else ws.val
        res = evaluate_on_windows({name: ck.model}, bank, ws.baseline_train, ws.val, eval_ws,
                                  ccfg, None if lanes is None else lanes.ids)
        if lanes is not None and split == "test":
            write_lanes(path, lane_document(res, name, lanes, split))
        for k, v in res.items():
            key = k if k == name else f"{k} @L={ccfg.window.context}"
            all_results.setdefault(key, v)
    report = write_report(all_results, out_dir, f"lvm_ray evaluation on {split}",
                          {"split": split, "encoder": bank.meta.get("encoder"),
                           "checkpoints": ", ".join(f"{k}={v}" for k, v in ckpts.items())})
    return {"report": str(report), "results": all_results, "table": summary_table(all_results)}


def evaluate_best_trial(best: dict[str, Any], cfg: Config, bank: ConceptBank,
                        sweep_dir: Path) -> dict[str, dict]:
    """A sweep's best trial (a row of lvm_ray.eval.sweep.trial_rows) on TEST beside the
    baselines (same windows), 95% CIs: test_report.md, test_comparison.png, test_results.json."""
    tcfg = trial_config(cfg, best)
    ck = load_checkpoint(best["checkpoint"])
    ws = prepare_windows(tcfg, bank)
    name = f"best trial {best['trial_id']} (L={best['context']}, alpha={best['alpha']:.3g})"
    results = evaluate_on_windows({name: ck.model}, bank, ws.baseline_train, ws.val, ws.test,
                                  tcfg)
    metric = objective_metric(cfg)
    meta = {"split": "test", "checkpoint": best["checkpoint"], "epoch": ck.meta.get("epoch"),
            "selected by": f"{metric} = {100 * best[metric]:.2f}% on val",
            "window": f"{tcfg.window.policy}, L={tcfg.window.context}",
            "encoder": bank.meta.get("encoder"), "n_parameters": ck.meta.get("n_parameters")}
    md = markdown_report(results, "Best sweep trial on test", meta)
    plot_comparison(results, sweep_dir / "test_comparison.png")
    md += "\n![bank-Hit@5 and CA with 95% CIs](test_comparison.png)\n"
    (sweep_dir / "test_report.md").write_text(md)
    (sweep_dir / "test_results.json").write_text(json.dumps(results, indent=2))
    return results
