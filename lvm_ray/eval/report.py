"""Markdown and PNG reports of evaluate() summaries, as the protocol wants them printed: every
Hit@K beside its pool or bank size and chance, every model beside its best baseline."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lvm_ray.eval.lanes import lane_markdown

BASELINE_PREFIXES = ("copy-last", "context-mean", "ridge")


def is_baseline(name: str) -> bool:
    return name.startswith(BASELINE_PREFIXES)


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.2f}%"


def _cell(s: dict, key: str, percent: bool = True) -> str:
    if key not in s:
        return "n/a"
    fmt = _pct if percent else (lambda v: f"{v:.4f}")
    out = fmt(s[key])
    if f"{key}_lo" in s:
        out += f" [{fmt(s[key + '_lo'])}, {fmt(s[key + '_hi'])}]"
    return out


def _sizes(results: dict[str, dict], key: str) -> str:
    """One size when every result shares it, else the per-result values."""
    vals = [s.get(key) for s in results.values()]
    uniq = sorted({v for v in vals if v is not None})
    return f"{uniq[0]:,}" if len(uniq) == 1 else "/".join(f"{v:,}" for v in vals if v is not None)


def _ks(results: dict[str, dict]) -> list[int]:
    keys = set().union(*(s.keys() for s in results.values()))
    return sorted({int(m.group(1)) for k in keys if (m := re.fullmatch(r"bank_hit@(\d+)", k))})


def _fixed_pools(results: dict[str, dict]) -> list[int]:
    keys = set().union(*(s.keys() for s in results.values()))
    return sorted({int(m.group(1)) for k in keys if (m := re.fullmatch(r"pool(\d+)_hit@\d+", k))})


def _overlap(a: dict, b: dict, key: str) -> str:
    if f"{key}_lo" not in a or f"{key}_lo" not in b:
        return "no CIs"
    sep = a[f"{key}_lo"] > b[f"{key}_hi"] or b[f"{key}_lo"] > a[f"{key}_hi"]
    return "95% CIs do not overlap" if sep else "95% CIs overlap"


def _paired(s: dict, key: str, baseline: str) -> str:
    """", paired 95% CI [lo, hi]" when the difference to this baseline was bootstrapped window
    by window (compare.add_paired_differences), else ""."""
    if s.get("paired_baseline") != baseline or f"paired_{key}_lo" not in s:
        return ""
    return (f", paired 95% CI [{100 * s[f'paired_{key}_lo']:+.2f}, "
            f"{100 * s[f'paired_{key}_hi']:+.2f}]")


def best_baseline(results: dict[str, dict], key: str = "bank_hit@5") -> str | None:
    names = [n for n in results if is_baseline(n) and key in results[n]]
    return max(names, key=lambda n: results[n][key]) if names else None


def comparison_lines(results: dict[str, dict]) -> list[str]:
    """For each model: the best baseline by bank-Hit@5 and the differences in bank-Hit@5 and CA."""
    key = "bank_hit@5" if any("bank_hit@5" in s for s in results.values()) else None
    key = key or next((f"bank_hit@{k}" for k in _ks(results)), None)
    if key is None:
        return []
    best = best_baseline(results, key)
    lines = []
    for name, s in results.items():
        if is_baseline(name):
            continue
        if best is None:
            lines.append(f"- **{name}**: no baseline was evaluated on these windows.")
            continue
        b = results[best]
        parts = []
        for k in (key, "ca"):
            if k in s and k in b:
                label = k.replace("bank_hit", "bank-Hit").replace("ca", "CA")
                diff = 100 * (s[k] - b[k])
                parts.append(f"{label} {_pct(s[k])} vs {_pct(b[k])} ({diff:+.2f} pts"
                             f"{_paired(s, k, best)}, {_overlap(s, b, k)})")
        lines.append(f"- **{name}** vs best baseline **{best}**: " + "; ".join(parts))
    return lines


def markdown_report(results: dict[str, dict], title: str, meta: dict[str, Any] | None = None
                    ) -> str:
    """A Markdown table of every protocol metric (rows) for every result (columns), 95% CIs in
    brackets, then each model against its best baseline."""
    if not results:
        raise ValueError("markdown_report needs at least one result")
    names = list(results)
    first = next(iter(results.values()))
    lines = [f"# {title}", ""]
    for k, v in (meta or {}).items():
        lines.append(f"- {k}: {v}")
    lines += [f"- windows: {_sizes(results, 'n_windows')}; "
              f"bank (candidates for bank-Hit/MRR): {_sizes(results, 'bank_size')} concepts; "
              "Hit and CA in %, MRR, cosine and margin raw; [95% bootstrap CI over windows]", ""]
    lines += ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]

    def row(label: str, key: str, percent: bool = True) -> None:
        if any(key in s for s in results.values()):
            cells = [_cell(results[n], key, percent) for n in names]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")

    bank = _sizes(results, "bank_size")
    for k in _ks(results):
        chance = first.get(f"bank_chance@{k}")
        row(f"bank-Hit@{k} (bank {bank}, chance {_pct(chance)})", f"bank_hit@{k}")
    row(f"MRR (bank {bank})", "mrr", percent=False)
    pool = _sizes(results, "pool_size_full")
    for k in _ks(results):
        chances = {s.get(f"pool_chance@{k}") for s in results.values()}
        chance = _pct(chances.pop()) if len(chances) == 1 else f"{k}/pool"
        row(f"pool-Hit@{k} (full pool {pool}, chance {chance})", f"pool_hit@{k}")
    for n in _fixed_pools(results):
        for k in _ks(results):
            row(f"pool-Hit@{k} (fixed pool {n}, chance {_pct(min(k, n) / n)})",
                f"pool{n}_hit@{k}")
    row("CA (chance 50%)", "ca")
    row("PAR (max cos to context: prediction / truth; > 1 leans to copying)", "par",
        percent=False)
    row("cosine", "cosine", percent=False)
    row("margin cos(p,y) - cos(p,x_last)", "margin", percent=False)
    cmp = comparison_lines(results)
    if cmp:
        lines += ["", "## Against the best baseline (same windows)", ""] + cmp
    return "\n".join(lines) + "\n"


def _bars(ax, results: dict[str, dict], key: str, title: str) -> None:
    names = list(results)
    vals = np.array([100 * results[n].get(key, np.nan) for n in names])
    lo = np.array([100 * results[n].get(f"{key}_lo", np.nan) for n in names])
    hi = np.array([100 * results[n].get(f"{key}_hi", np.nan) for n in names])
    err = np.nan_to_num(np.vstack([vals - lo, hi - vals]))
    colors = ["0.6" if is_baseline(n) else "tab:blue" for n in names]
    ax.bar(np.arange(len(names)), vals, yerr=err, capsize=4, color=colors)
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_title(title)


def _save(fig: Figure, path_png: str | Path) -> Path:
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def plot_comparison(results: dict[str, dict], path_png: str | Path) -> Path:
    """Bar chart of bank-Hit@5 and CA with 95% CI error bars; baselines grey, models blue."""
    fig = Figure(figsize=(10, 4), layout="tight")
    ax1, ax2 = fig.subplots(1, 2)
    bank = _sizes(results, "bank_size")
    _bars(ax1, results, "bank_hit@5", f"bank-Hit@5 (bank {bank})")
    _bars(ax2, results, "ca", "CA (chance 50%)")
    ax2.axhline(50, color="k", lw=0.8, ls="--")
    return _save(fig, path_png)


def plot_training_curves(history: list[dict], path_png: str | Path, select: str,
                         baselines: dict[str, float] | None = None) -> Path:
    """Left: the selection metric on val per epoch (the best epoch marked), each baseline's val
    value on the same windows as a horizontal line. Right: the training loss (and val loss when
    logged). `select` is the history key, e.g. "val_bank_hit@5"."""
    if not history:
        raise ValueError("plot_training_curves needs at least one epoch of history")
    fig = Figure(figsize=(10, 4), layout="tight")
    ax1, ax2 = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    values = [100 * h.get(select, np.nan) for h in history]
    ax1.plot(epochs, values, marker="o", color="tab:blue", label="model")
    best = int(np.nanargmax(values)) if np.isfinite(values).any() else None
    if best is not None:
        ax1.plot([epochs[best]], [values[best]], marker="*", ms=14, color="tab:blue",
                 ls="none", label=f"best (epoch {epochs[best]})")
    styles = {"copy-last": ("k", "--"), "context-mean": ("0.45", ":"), "ridge": ("tab:red", "-.")}
    for name, v in (baselines or {}).items():
        color, ls = next((st for prefix, st in styles.items() if name.startswith(prefix)),
                         ("0.5", "-"))
        ax1.axhline(100 * v, color=color, ls=ls, lw=1.2, label=name)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("%")
    ax1.set_title(f"{select.replace('val_', 'val ')} (model selection), baselines on the same "
                  "windows", fontsize=9)
    ax1.legend(fontsize=7)
    for key, color in (("train_loss", "tab:orange"), ("val_loss", "tab:green")):
        if any(key in h for h in history):
            ax2.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", color=color,
                     label=key)
    ax2.set_xlabel("epoch")
    ax2.set_title("loss")
    ax2.legend(fontsize=7)
    return _save(fig, path_png)


def verdict(model: dict[str, Any], baselines: dict[str, dict[str, Any]], key: str,
            split: str = "val") -> str:
    """One line: does the model beat the best baseline on `key`, by more than the CIs allow?"""
    best = max(baselines, key=lambda n: baselines[n].get(key, -np.inf))
    b = baselines[best]
    label = key.replace("bank_hit", "bank-Hit").replace("_hit", "-Hit")
    where = f"{split} {label}: model {_cell(model, key)} vs {best} {_cell(b, key)}"
    if (paired := _paired(model, key, best)):
        where += f"; difference {100 * model[f'paired_{key}']:+.2f} pts{paired}"
    if f"{key}_lo" in model and f"{key}_lo" in b:
        if model[f"{key}_lo"] > b[f"{key}_hi"]:
            return f"verdict: the model beats the best baseline ({where}); CIs do not overlap"
        if model[f"{key}_hi"] < b[f"{key}_lo"]:
            return (f"verdict: NOT worth serving: the best baseline beats the model ({where}); "
                    "CIs do not overlap")
        return (f"verdict: NOT shown better than the best baseline ({where}); the CIs overlap, "
                "so serving it is not justified by this data")
    better = model.get(key, -np.inf) > b.get(key, -np.inf)
    return f"verdict: {'ahead of' if better else 'behind'} the best baseline ({where}); no CIs"


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """A compact console table: the headline numbers with CIs."""
    first = next(iter(results.values()))
    cols = [("bank-Hit@5", "bank_hit@5"), ("MRR", "mrr"), ("CA", "ca"), ("PAR", "par"),
            ("cosine", "cosine"), ("margin", "margin")]
    if "pool_size_fixed" in first:  # the seed's metric at its fixed pool, beside the honest one
        n = first["pool_size_fixed"]
        cols.insert(1, (f"pool{n}-Hit@5", f"pool{n}_hit@5"))
    width = max(28, *(len(name) for name in results))  # whole names: a ridge row keeps its m
    head = f"{'':{width}s}" + "".join(f" {c:>23s}" for c, _ in cols)
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
        lines.append(f"{name:{width}s}" + "".join(cells))
    return "\n".join(lines)


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
