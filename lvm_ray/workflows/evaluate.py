"""Evaluating saved checkpoints: load them, cut each one's own windows, score it beside the
baselines on the same windows (lvm_ray.eval.compare) and write the report. Used at the end of a
training run, by `lvm evaluate`, and for a sweep's best trial."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lvm_ray.config import Config, ConfigError, from_dict, load_config
from lvm_ray.console import say
from lvm_ray.data.bank import ConceptBank, check_identity
from lvm_ray.eval.compare import evaluate_on_windows, fit_baselines_logged, lanes_of
from lvm_ray.eval.lanes import lane_document, write_lanes
from lvm_ray.eval.metrics import select_key
from lvm_ray.eval.report import (markdown_report, plot_comparison, plot_training_curves,
                                 summary_table, verdict, write_report)
from lvm_ray.eval.sweep import objective_metric, trial_config
from lvm_ray.train.checkpoint import LoadedCheckpoint, load_checkpoint
from lvm_ray.train.loop import with_bank_width
from lvm_ray.workflows.prepare import Windows, prepare_windows, read_bank

TEST_METRICS = "test_metrics.json"


def evaluate_run(cfg: Config, bank: ConceptBank, ws: Windows, best: Path, run_dir: Path,
                 history: list[dict[str, Any]], split: str = "test") -> dict[str, Any]:
    """The end of a training run: the best checkpoint on test beside the baselines, the
    training curves (with the baselines' val values) and a one-line verdict on val, all in
    run_dir."""
    ck = load_checkpoint(best)
    name = f"{cfg.run.name} ({cfg.model.kind})"
    eval_ws = ws.test if split == "test" else ws.val
    lanes = lanes_of(cfg, bank)
    baselines = fit_baselines_logged(bank, ws.baseline_train, ws.val, cfg)
    results = evaluate_on_windows({name: ck.model}, bank, ws.baseline_train, ws.val, eval_ws,
                                  cfg, None if lanes is None else lanes.ids, baselines=baselines)
    # The val windows every epoch was scored on: the selection metric, with CIs, for the
    # baselines beside the model (the curves' horizontal lines and the verdict).
    select = select_key(cfg.eval.select_metric, cfg.eval.pool_size)
    val_eval = ws.val.sample(cfg.train.max_eval_windows, cfg.train.seed)
    val = evaluate_on_windows({name: ck.model}, bank, ws.baseline_train, ws.val, val_eval, cfg,
                              baselines=baselines)
    line = verdict(val[name], {b.name: val[b.name] for b in baselines}, select)
    say(line)
    meta = {"split": split, "checkpoint": str(best), "epoch": ck.meta.get("epoch"),
            "window": f"{cfg.window.policy}, L={cfg.window.context}",
            "encoder": bank.meta.get("encoder"), "n_parameters": ck.meta.get("n_parameters"),
            "on val (model selection)": line.removeprefix("verdict: ")}
    if lanes is not None:
        meta["lanes"] = lanes.source
    report = write_report(results, run_dir, f"Evaluation of {cfg.run.name} on {split}", meta)
    if history:
        (run_dir / "training_history.json").write_text(json.dumps(history, indent=2))
        plot_training_curves(history, run_dir / "training_curves.png", f"val_{select}",
                             {b.name: val[b.name][select] for b in baselines})
    # Next to the weights (outside their checksum) so Serve can show them with the model.
    (best / TEST_METRICS).write_text(json.dumps({"split": split, **results[name]}, indent=2))
    if lanes is not None:
        write_lanes(best, lane_document(results, name, lanes, split))
    return {"run_dir": str(run_dir), "best_checkpoint": str(best), "report": str(report),
            "results": results, "val_results": val, "verdict": line,
            "table": summary_table(results)}


def checkpoint_config(meta: dict[str, Any], config_path: str | None = None,
                      presets: list[str] | tuple[str, ...] = (),
                      overrides: dict[str, Any] | None = None) -> Config:
    """The config a checkpoint was trained with (corpus, bank, windows, eval), with the user's
    --config / --preset / --set applied on top."""
    recorded = meta.get("config") or {}
    base = from_dict(Config, recorded) if recorded else Config()
    return load_config(config_path, presets, overrides, base=base)


def checkpoint_with_windows(path: str | Path
                            ) -> tuple[LoadedCheckpoint, Config, ConceptBank, Windows]:
    """A checkpoint with the bank and windows of its recorded training config, the bank's
    identity checked against the checkpoint's (BankMismatch otherwise): the start of the
    experiment scripts (scripts/experiments/)."""
    ck = load_checkpoint(path)
    recorded = checkpoint_config(ck.meta)
    bank = read_bank(recorded)
    check_identity(ck.meta.get("data"), bank, str(path), recorded.bank_path)
    cfg = with_bank_width(recorded, bank)
    return ck, cfg, bank, prepare_windows(cfg, bank)


def evaluate_checkpoints(ckpts: dict[str, str], config_path: str | None = None,
                         presets: list[str] | tuple[str, ...] = (),
                         overrides: dict[str, Any] | None = None, split: str = "test",
                         out_dir: str | Path | None = None,
                         allow_bank_mismatch: bool = False) -> dict[str, Any]:
    """`lvm evaluate`: several checkpoints, each on the windows of its own recorded training
    config (context length may differ), with the baselines on those same windows. Reads the
    bank the checkpoints were trained on (never ingests one) and refuses a bank they were not
    trained on. Writes only to out_dir (default runs/evaluate/<names>)."""
    loaded = {name: load_checkpoint(path) for name, path in ckpts.items()}
    cfgs = {name: checkpoint_config(ck.meta, config_path, presets, overrides)
            for name, ck in loaded.items()}
    paths = {c.bank_path for c in cfgs.values()}
    if len(paths) > 1:
        raise ConfigError(f"the checkpoints were trained on different banks {sorted(paths)}; "
                          "evaluate them on one with --bank PATH")
    first = next(iter(cfgs.values()))
    bank = read_bank(first)
    for name, ck in loaded.items():
        diffs = check_identity(ck.meta.get("data"), bank, ckpts[name], first.bank_path,
                               allow_bank_mismatch)
        if diffs:
            say(f"warning: {name} was not trained on {first.bank_path} ({'; '.join(diffs)}); "
                "evaluating anyway (--allow-bank-mismatch)")
    out_dir = Path(out_dir or Path("runs/evaluate") / "+".join(ckpts))
    lanes = lanes_of(first, bank)
    all_results: dict[str, dict[str, Any]] = {}
    for name, ck in loaded.items():
        ccfg = with_bank_width(cfgs[name], bank)
        ws = prepare_windows(ccfg, bank)
        eval_ws = ws.test if split == "test" else ws.val
        res = evaluate_on_windows({name: ck.model}, bank, ws.baseline_train, ws.val, eval_ws,
                                  ccfg, None if lanes is None else lanes.ids)
        if lanes is not None and split == "test":
            write_lanes(out_dir / name, lane_document(res, name, lanes, split))
        if "paired_baseline" in res[name]:  # the baselines are renamed below
            res[name]["paired_baseline"] += f" @L={ccfg.window.context}"
        for k, v in res.items():
            key = k if k == name else f"{k} @L={ccfg.window.context}"
            all_results.setdefault(key, v)
    report = write_report(all_results, out_dir, f"lvm_ray evaluation on {split}",
                          {"split": split, "bank": first.bank_path,
                           "encoder": bank.meta.get("encoder"),
                           "checkpoints": ", ".join(f"{k}={v}" for k, v in ckpts.items())})
    return {"report": str(report), "results": all_results, "table": summary_table(all_results)}


def evaluate_best_trial(best: dict[str, Any], cfg: Config, bank: ConceptBank,
                        sweep_dir: Path) -> dict[str, dict]:
    """A sweep's best trial (a row of lvm_ray.eval.sweep.trial_rows) on TEST beside the
    baselines (same windows), 95% CIs: test_report.md, test_comparison.png, test_results.json."""
    tcfg = trial_config(cfg, best)
    ck = load_checkpoint(best["checkpoint"])
    ws = prepare_windows(tcfg, bank)
    grid = f", {best['grid']}" if best.get("grid") else ""
    name = f"best trial {best['trial_id']} (L={best['context']}, alpha={best['alpha']:.3g}{grid})"
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
