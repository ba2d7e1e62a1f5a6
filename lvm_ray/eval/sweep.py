"""What a Tune sweep's trials reported, as tables and a plot: Ray-free, so it is tested without a
cluster. The driver (lvm_ray.distributed.tune) hands over one plain TrialRecord per trial.

The objective is the val selection metric of ../shared/EVAL_PROTOCOL.md (bank-Hit@5 by default,
or pool-Hit@5 over a FIXED pool): under the `document` window policy every context length has the
same val targets (check_comparable), so trials with different contexts answer the same question.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lvm_ray.config import Config, ConfigError, TuneConfig, deep_update, merge, nested
from lvm_ray.data.bank import ConceptBank
from lvm_ray.data.windows import make_windows
from lvm_ray.eval.baselines import evaluate_baselines, fit_baselines
from lvm_ray.eval.metrics import select_key

EPOCHS_RUN = "epochs_run"  # epochs completed (epoch + 1): ASHA's time axis


@dataclass
class TrialRecord:
    """One trial as Tune saw it, in plain values."""

    trial_id: str
    config: dict[str, Any]  # the sampled values: {"context": ..., "alpha": ...}
    reported: list[dict[str, Any]]  # every row the trial reported, in order
    error: bool
    path: str  # the trial directory
    checkpoint: str | None  # the checkpoint Tune kept (best by the objective)
    starts: int = -1  # how often the trial was started or resumed (-1: not recorded)


def objective_metric(cfg: Config) -> str:
    """The reported metric Tune maximises: never a pool whose size depends on the trial."""
    return f"val_{select_key(cfg.eval.select_metric, cfg.eval.pool_size)}"


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The full config one trial trains with: the base with its sampled values (context, alpha
    and one value of each tune.grid axis, keyed by its dotted field name)."""
    over: dict[str, Any] = {"window": {"context": int(params["context"])},
                            "loss": {"alpha": float(params["alpha"])}}
    for key in base.tune.grid:
        deep_update(over, nested(key, params[key]))
    return merge(base, over)


def check_grid(base: Config) -> None:
    """Every tune.grid value must fit its field: ConfigError before any trial starts."""
    for key, values in base.tune.grid.items():
        for v in values:
            params = {"context": base.tune.contexts[0], "alpha": base.loss.alpha,
                      **{k: vs[0] for k, vs in base.tune.grid.items()}, key: v}
            try:
                trial_config(base, params)
            except ConfigError as e:
                raise ConfigError(f"tune.grid.{key} = {v!r}: {e}") from None


def grid_label(params: dict[str, Any], s: TuneConfig) -> str:
    """A trial's tune.grid values, for tables and plot legends ('' without a grid)."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={params[k]:g}" if isinstance(params[k], float)
                     else f"{k.rsplit('.', 1)[-1]}={params[k]}" for k in s.grid)


def n_trials(s: TuneConfig) -> int:
    per_context = len(s.alphas) if s.search == "grid" else 1
    return len(s.contexts) * per_context * s.num_samples * math.prod(map(len, s.grid.values()))


def check_comparable(bank: ConceptBank, base: Config) -> None:
    """Every context length must score the same val targets, or the objective compares
    different questions. True under both window policies when min_context <= every context."""
    ref = None
    for c in base.tune.contexts:
        if base.window.min_context > c:
            raise ConfigError(f"window.min_context={base.window.min_context} exceeds the sweep's "
                              f"context {c}; lower window.min_context")
        ws = make_windows(bank, "val", dataclasses.replace(base.window, context=c))
        if ref is None:
            ref = ws.target_rows
        elif not np.array_equal(ref, ws.target_rows):
            raise ValueError(f"val targets differ between contexts {base.tune.contexts[0]} and "
                             f"{c}; trials would not be comparable")
    if ref is None or len(ref) == 0:
        raise ValueError("the bank has no val windows to tune on")


def alpha_bucket(alpha: float, s: TuneConfig) -> str:
    """Plot line label of a trial's alpha: its value (grid) or a log-spaced bin (random)."""
    if s.search == "grid":
        return f"alpha={alpha:g}"
    lo, hi = (math.log10(a) for a in s.alpha_range)
    edges = np.linspace(lo, hi, s.alpha_buckets + 1)
    i = int(np.clip(np.searchsorted(edges, math.log10(alpha), side="right") - 1, 0,
                    s.alpha_buckets - 1))
    return f"alpha {10 ** edges[i]:.3g}-{10 ** edges[i + 1]:.3g}"


def trial_rows(records: list[TrialRecord], cfg: Config) -> list[dict[str, Any]]:
    """One row per trial: its best epoch by the objective (the epoch whose checkpoint Tune kept),
    and how its training ended."""
    metric = objective_metric(cfg)
    rows = []
    for rec in records:
        reported = [r for r in rec.reported if metric in r and np.isfinite(r[metric])]
        c = rec.config
        best = max(reported, key=lambda r: r[metric]) if reported else None  # first of ties
        epochs = int(max(r[EPOCHS_RUN] for r in reported)) if reported else 0
        last = reported[-1] if reported else {}
        if rec.error:
            ended = "error"
        elif epochs >= cfg.train.max_epochs:
            ended = "max_epochs"
        elif reported and epochs - 1 - int(last["best_epoch"]) >= cfg.train.patience:
            ended = "patience"
        else:
            ended = cfg.tune.scheduler  # stopped by the scheduler (ASHA)

        def at_best(key: str) -> float:
            return float(best[key]) if best is not None and key in best else float("nan")

        grid = grid_label(c, cfg.tune)
        rows.append({
            "trial_id": rec.trial_id,
            "context": int(c["context"]),
            "alpha": float(c["alpha"]),
            **{k: c[k] for k in cfg.tune.grid},
            "grid": grid,
            # The plot's lines: alpha bucket, and the grid's values when there is a grid.
            "alpha_bucket": alpha_bucket(float(c["alpha"]), cfg.tune)
                            + (f", {grid}" if grid else ""),
            metric: at_best(metric),
            "val_ca": at_best("val_ca"),
            "val_margin": at_best("val_margin"),
            "val_cosine": at_best("val_cosine"),
            "val_mrr": at_best("val_mrr"),
            "best_epoch": int(best["epoch"]) if best is not None else -1,
            "epochs_run": epochs,
            "ended": ended,
            "starts": rec.starts,
            "train_seconds": float(sum(r.get("train_seconds", 0.0) for r in reported)),
            "checkpoint": _checkpoint(best, rec),
            "trial_dir": rec.path,
        })
    rows.sort(key=lambda r: (r["context"], r["alpha"], r["grid"]))
    return rows


def _checkpoint(best: dict[str, Any] | None, rec: TrialRecord) -> str | None:
    path = (best or {}).get("checkpoint_path")
    # A multi-worker trial reports Ray Train's checkpoint; a missing value reads back as NaN.
    return path if isinstance(path, str) else rec.checkpoint


def val_baselines(bank: ConceptBank, cfg: Config) -> dict[str, dict]:
    """copy-last, context-mean and ridge (fit on train, chosen on val) on the val windows every
    trial is scored on (the same val_ws.sample(max_eval_windows, seed) as `fit`). Windows of the
    longest context, so context-mean may pick any m; copy-last is the same for every context."""
    wcfg = dataclasses.replace(cfg.window, context=max(cfg.tune.contexts))
    train_ws, val_ws = make_windows(bank, "train", wcfg), make_windows(bank, "val", wcfg)
    val_eval = val_ws.sample(cfg.train.max_eval_windows, cfg.train.seed)
    ecfg = dataclasses.replace(cfg.eval, bootstrap=0)
    return evaluate_baselines(fit_baselines(bank, train_ws, val_ws, cfg.eval), bank, val_eval,
                              ecfg)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if not np.isfinite(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def write_tables(rows: list[dict[str, Any]], baselines: dict[str, dict], cfg: Config,
                 sweep_dir: Path) -> None:
    """results.csv (every column) and results.md (the table people read)."""
    metric = objective_metric(cfg)
    cols = list(rows[0]) if rows else []
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    first = next(iter(baselines.values()), {})
    label = metric.replace("val_", "val ").replace("bank_hit", "bank-Hit").replace("_hit",
                                                                                  "-Hit")
    lines = [
        "# Sweep results", "",
        f"- objective: {metric} (max), {first.get('n_windows', '?')} val windows, "
        f"bank {first.get('bank_size', '?')} val concepts (chance "
        f"{100 * first.get('bank_chance@5', float('nan')):.2f}% for bank-Hit@5)",
        f"- window policy {cfg.window.policy} (min_context {cfg.window.min_context}): "
        "every context length is scored on the same val targets",
        "- values at each trial's best epoch (the checkpoint kept); Hit and CA in %", "",
        f"| trial | context | alpha | {label} % | CA % | margin | epochs | best epoch | ended "
        f"| starts | checkpoint |{' grid |' if cfg.tune.grid else ''}",
        "|---" * (11 + bool(cfg.tune.grid)) + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['trial_id']} | {r['context']} | {r['alpha']:.4g} | {100 * r[metric]:.2f} | "
            f"{100 * r['val_ca']:.2f} | {r['val_margin']:.4f} | {r['epochs_run']} | "
            f"{r['best_epoch']} | {r['ended']} | {r['starts']} | {_fmt(r['checkpoint'])} |"
            + (f" {r['grid']} |" if cfg.tune.grid else ""))
    key = metric[len("val_"):]
    lines += ["", "Baselines on the same val windows:", "",
              f"| baseline | {label} % | CA % | margin |", "|---|---|---|---|"]
    for name, s in baselines.items():
        lines.append(f"| {name} | {100 * s.get(key, float('nan')):.2f} | "
                     f"{100 * s['ca']:.2f} | {s['margin']:.4f} |")
    (sweep_dir / "results.md").write_text("\n".join(lines) + "\n")


def plot_sweep(rows: list[dict[str, Any]], baselines: dict[str, dict], cfg: Config,
               path_png: Path) -> Path:
    """Val objective (best epoch of each trial) against context length, one line per alpha
    bucket (mean over its trials; every trial as a dot), baselines as horizontal lines."""
    metric = objective_metric(cfg)
    key = metric[len("val_"):]
    fig = Figure(figsize=(7, 4.5), layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    buckets = sorted({r["alpha_bucket"] for r in rows},
                     key=lambda b: min(r["alpha"] for r in rows if r["alpha_bucket"] == b))
    for i, b in enumerate(buckets):
        mine = [r for r in rows if r["alpha_bucket"] == b and np.isfinite(r[metric])]
        color = f"C{i}"
        ctxs = sorted({r["context"] for r in mine})
        means = [100 * np.mean([r[metric] for r in mine if r["context"] == c]) for c in ctxs]
        ax.plot(ctxs, means, color=color, label=b)
        for stopped in (False, True):
            pts = [r for r in mine if (r["ended"] == "asha") == stopped]
            ax.scatter([r["context"] for r in pts], [100 * r[metric] for r in pts], s=30,
                       edgecolors=color, facecolors="none" if stopped else color, alpha=0.6)
    styles = {"copy-last": ("k", "--"), "context-mean": ("0.45", ":"), "ridge": ("tab:red", "-.")}
    for name, s in baselines.items():
        color, ls = next((v for p, v in styles.items() if name.startswith(p)), ("0.5", "-"))
        ax.axhline(100 * s.get(key, float("nan")), color=color, ls=ls, lw=1.2, label=name)
    contexts = sorted({r["context"] for r in rows})
    if len(contexts) > 1 and contexts[-1] / max(contexts[0], 1) >= 8:
        ax.set_xscale("log")
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.minorticks_off()
    first = next(iter(baselines.values()), {})
    ax.set_xlabel("context length L (window.context)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric} vs context (val: {first.get('n_windows', '?')} windows, bank "
                 f"{first.get('bank_size', '?')})\nlines: mean per alpha bucket; dots: trials at "
                 "their best epoch (hollow: stopped by ASHA)", fontsize=9)
    ax.legend(fontsize=7)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path_png, dpi=120)
    return path_png


@dataclass
class SweepResult:
    sweep_dir: str
    status: str  # "finished" | "interrupted"
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    test: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
