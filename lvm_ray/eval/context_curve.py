"""The context-scaling curve: quality as a function of the context length L, with only L changing.

One fixed set of targets is chosen first: every target of the split with at least `min_history`
earlier concepts in its own document. At each L every model (and baseline) reads the same targets
with its context cut to the last L vectors, and is ranked against the same candidates: the split's
bank minus the target's `min_history` preceding concepts, whatever L is. (The protocol's usual
"minus the window's own context" would remove more candidates as L grows, and the curve would rise
by itself, the pool effect EVAL_PROTOCOL.md warns about.) CA's pool is the fixed target set.

    targets = long_targets(bank, "test", 1000)
    per = curve_values(pred, truncate(targets, L), targets, bank)     # per-target arrays
    row = summarize(per, bootstrap=1000, seed=0)                    # means and 95% CIs
    lo, hi = paired_diff_ci(per_a["bank_hit@5"], per_b["bank_hit@5"])  # same targets, two models

`route_threshold` turns a curve measured on val into the router's setting: the context length
from which the long-context model measurably beats the short one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from lvm_ray.config import EvalConfig, WindowConfig
from lvm_ray.data.bank import ConceptBank
from lvm_ray.data.windows import WindowSet, make_windows
from lvm_ray.eval.baselines import ContextMean, Ridge, ridge_solve, ridge_stats
from lvm_ray.eval.metrics import (bank_ranks, bootstrap_cis, contrastive_accuracy,
                                  hits_from_ranks, mrr_values, paired_diff_ci, select_score)

LENGTHS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 500, 1000)
METRICS = ("bank_hit@5", "mrr", "ca")


def long_targets(bank: ConceptBank, split: str, min_history: int) -> WindowSet:
    """Every target of `split` with at least min_history earlier concepts in its document, each
    with exactly those min_history concepts as its context (document windows, stride 1)."""
    return make_windows(bank, split, WindowConfig(policy="document", context=min_history,
                                                  min_context=min_history, stride=1))


def truncate(ws: WindowSet, length: int) -> WindowSet:
    """The same targets with each context cut to its last `length` vectors."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    start = np.maximum(ws.start, ws.end - length)
    return WindowSet(ws.split, ws.rows, start, ws.end.copy(), min(length, ws.context), ws.policy)


def curve_values(pred: np.ndarray, ws: WindowSet, full: WindowSet,
                 bank: ConceptBank) -> dict[str, np.ndarray]:
    """Per-target bank-Hit@5, MRR and CA of predictions `pred` (M, D) made from `ws` (the
    targets of `full`, context cut to some L). Candidates: the split's bank minus each target's
    full-history context, the same at every L."""
    if not (np.array_equal(ws.end, full.end) and np.array_equal(ws.rows, full.rows)):
        raise ValueError("ws must hold the same targets as full (truncate(full, L))")
    if pred.shape != (len(ws), bank.dim):
        raise ValueError(f"pred must be (M={len(ws)}, D={bank.dim}), got {pred.shape}")
    tr = full.target_rows
    ranks = bank_ranks(pred, tr, bank.vectors, full.rows, exclude=(full.start, full.end,
                                                                   full.rows))
    ca = contrastive_accuracy(pred, bank.vectors[tr], bank.doc_ids[tr], bank.positions[tr])
    return {"bank_hit@5": hits_from_ranks(ranks, 5), "mrr": mrr_values(ranks), "ca": ca}


def summarize(per: dict[str, np.ndarray], bootstrap: int = 1000, seed: int = 0
              ) -> dict[str, float]:
    """Means and 95% bootstrap CIs (the same resamples for every metric) of curve_values."""
    keys = [k for k in METRICS if k in per]
    vals = np.stack([np.nan_to_num(per[k], nan=np.nanmean(per[k])) for k in keys])
    out: dict[str, float] = {"n": int(vals.shape[1])}
    lo, hi = bootstrap_cis(vals, bootstrap, seed)
    for i, k in enumerate(keys):
        out[k], out[f"{k}_lo"], out[f"{k}_hi"] = float(vals[i].mean()), float(lo[i]), float(hi[i])
    return out


def saturation(per: dict[int, dict[str, np.ndarray]], metric: str = "bank_hit@5",
               bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Where more context stops helping one row of the curve: its best L, the gain from L=1 (or
    the shortest L) to there, and `enough`: the shortest L not measurably worse than the best
    (the paired 95% CI of best - L reaches zero), so no longer context buys anything measurable
    (a longer one may still cost: the table shows it)."""
    lengths = sorted(per)
    means = {L: float(np.mean(per[L][metric])) for L in lengths}
    best = max(lengths, key=lambda L: (means[L], -L))
    below = {L: paired_diff_ci(per[best][metric], per[L][metric], bootstrap, seed) for L in lengths}
    enough = next(L for L in lengths if below[L][1] <= 0)  # the best L itself always qualifies
    gain = below[lengths[0]]
    return {"best_length": best, "best": means[best], "first": means[lengths[0]],
            "gain": gain[0], "gain_lo": gain[1], "gain_hi": gain[2], "enough": enough}


# ----------------------------------------------------------------------------- baselines


@dataclass
class Candidate:
    """A baseline with the context it needs (m vectors) and its val score."""

    baseline: Any  # ContextMean or Ridge
    m: int
    val_score: float


def baseline_candidates(bank: ConceptBank, train_ws: WindowSet, val_ws: WindowSet,
                        eval_cfg: EvalConfig, ms: Sequence[int] = (1, 2, 3, 4, 6, 8, 16),
                        lambdas: Sequence[float] = (0.1, 1, 10, 100, 1000),
                        max_val_windows: int | None = 2000
                        ) -> tuple[list[Candidate], list[Candidate]]:
    """Every context-mean(m) and ridge(m, lambda) of the protocol's grid (ridge fit on train),
    each scored on val by eval_cfg.select_metric: (means, ridges). At a context length L the
    curve uses the best of those with m <= L, so a baseline never reads more than L vectors."""
    val = val_ws.sample(max_val_windows, eval_cfg.seed)
    vecs = bank.vectors

    def score(b: Any) -> float:
        return select_score(b.predict(vecs, val), val, bank, eval_cfg)

    means, ridges = [], []
    for m in sorted(set(ms)):
        cm = ContextMean(m)
        means.append(Candidate(cm, m, score(cm)))
        stats = ridge_stats(vecs, train_ws, m)
        for lam in lambdas:
            w, b = ridge_solve(*stats, lam)
            r = Ridge(m=m, lam=float(lam), w=w, b=b)
            ridges.append(Candidate(r, m, score(r)))
    return means, ridges


def best_within(candidates: Sequence[Candidate], length: int) -> Candidate:
    """The best-on-val candidate that reads at most `length` vectors (ties: the smaller m)."""
    fit = [c for c in candidates if c.m <= length]
    if not fit:
        raise ValueError(f"no candidate reads at most {length} vectors")
    return max(fit, key=lambda c: (c.val_score, -c.m))


# ----------------------------------------------------------------------------- routing


def route_threshold(curve: dict[str, dict[int, dict[str, np.ndarray]]], short: str, long: str,
                    metric: str = "bank_hit@5", bootstrap: int = 1000, seed: int = 0,
                    short_context: int | None = None) -> dict[str, Any]:
    """From per-target curve values {model: {L: per}} on val: at each L, the paired difference
    long - short (the short model reads min(L, short_context) vectors, as Serve would give it).
    The threshold is one less than the smallest L from which the long model's lead has a 95% CI
    above zero at that L and every longer one measured; None when there is no such L (route
    nothing to the long model)."""
    lengths = sorted(set(curve[short]) & set(curve[long]))
    rows = []
    for L in lengths:
        s_len = L if short_context is None else min(L, short_context)
        s_len = max(x for x in lengths if x <= s_len) if s_len not in curve[short] else s_len
        mean, lo, hi = paired_diff_ci(curve[long][L][metric], curve[short][s_len][metric],
                                      bootstrap, seed)
        rows.append({"length": L, "short_reads": s_len, "diff": mean, "lo": lo, "hi": hi,
                     "wins": lo > 0})
    first = None
    for i in range(len(rows)):
        if all(r["wins"] for r in rows[i:]):
            first = rows[i]["length"]
            break
    return {"short": short, "long": long, "metric": metric, "rows": rows,
            "wins_from": first, "threshold": None if first is None else first - 1}


# ----------------------------------------------------------------------------- report


def _fmt(s: dict[str, float], key: str, percent: bool) -> str:
    f = (lambda v: f"{100 * v:.1f}") if percent else (lambda v: f"{v:.3f}")
    return f"{f(s[key])} [{f(s[key + '_lo'])}, {f(s[key + '_hi'])}]"


def curve_markdown(summary: dict[str, dict[int, dict[str, float]]], trained: dict[str, int],
                   meta: dict[str, Any]) -> str:
    """One table per metric: a row per L, a column per model or baseline, 95% CIs. A model's
    points past its training context are marked with *."""
    names = list(summary)
    lengths = sorted(set().union(*(summary[n].keys() for n in names)))
    lines = [f"- {k}: {v}" for k, v in meta.items()]
    for key, label, pct in (("bank_hit@5", "bank-Hit@5 (%)", True), ("mrr", "MRR", False),
                            ("ca", "CA (%, chance 50)", True)):
        lines += ["", f"**{label}**", "", "| L | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for L in lengths:
            cells = []
            for n in names:
                s = summary[n].get(L)
                mark = "*" if n in trained and L > trained[n] else ""
                cells.append("-" if s is None else _fmt(s, key, pct) + mark)
            lines.append(f"| {L} | " + " | ".join(cells) + " |")
    if trained:
        lines += ["", "\\* the model reads more vectors than it was trained on (its context "
                  "length: " + ", ".join(f"{n} {c}" for n, c in trained.items()) + ")."]
    return "\n".join(lines) + "\n"


def plot_curve(summary: dict[str, dict[int, dict[str, float]]], baselines: Sequence[str],
               path_png: str, title: str) -> str:
    """bank-Hit@5, MRR and CA against L (log x) with 95% CI bands; baselines dashed grey."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5), layout="tight")
    axes = fig.subplots(1, 3)
    greys = iter(["0.25", "0.5", "0.7", "0.85"])
    colors = {n: (next(greys, "0.6") if n in baselines else None) for n in summary}
    for ax, (key, label, scale) in zip(axes, (("bank_hit@5", "bank-Hit@5 (%)", 100),
                                              ("mrr", "MRR", 1), ("ca", "CA (%)", 100))):
        for n, pts in summary.items():
            ls = sorted(pts)
            y = np.array([pts[L][key] for L in ls]) * scale
            lo = np.array([pts[L][key + "_lo"] for L in ls]) * scale
            hi = np.array([pts[L][key + "_hi"] for L in ls]) * scale
            style = "--" if n in baselines else "-"
            (line,) = ax.plot(ls, y, style, marker="o", ms=3, label=n, color=colors[n])
            ax.fill_between(ls, lo, hi, alpha=0.15, color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("context length L (vectors, log scale)")
        ax.set_title(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    FigureCanvasAgg(fig)
    fig.savefig(path_png, dpi=120)
    return path_png


def saturation_markdown(sat: dict[str, dict[str, Any]], first_length: int) -> str:
    """One row per curve row: what more context bought, and from which L on it stopped."""
    lines = [f"| row | bank-Hit@5 at L={first_length} | best (at L) | gain over L={first_length}, "
             "pts [95% CI, paired] | no measurable gain past L |", "|---|---|---|---|---|"]
    for n, s in sat.items():
        lines.append(f"| {n} | {100 * s['first']:.1f} | {100 * s['best']:.1f} "
                     f"({s['best_length']}) | {100 * s['gain']:+.1f} [{100 * s['gain_lo']:+.1f}, "
                     f"{100 * s['gain_hi']:+.1f}] | {s['enough']} |")
    return "\n".join(lines) + "\n"


def routing_markdown(decision: dict[str, Any]) -> str:
    """The val comparison behind the router's threshold, one row per L."""
    lines = [f"| L | {decision['long']} - {decision['short']} (bank-Hit@5, pts) | 95% CI | "
             "short model reads | measurably better |", "|---|---|---|---|---|"]
    for r in decision["rows"]:
        lines.append(f"| {r['length']} | {100 * r['diff']:+.2f} | [{100 * r['lo']:+.2f}, "
                     f"{100 * r['hi']:+.2f}] | {r['short_reads']} | "
                     f"{'yes' if r['wins'] else 'no'} |")
    return "\n".join(lines) + "\n"
