"""Models and the protocol's baselines scored on the very same windows: the comparison every
report, run summary and sweep shows."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from lvm_ray.config import Config
from lvm_ray.console import say
from lvm_ray.data.bank import ConceptBank
from lvm_ray.data.windows import WindowSet
from lvm_ray.device import resolve_device
from lvm_ray.eval.baselines import Baseline, fit_baselines
from lvm_ray.eval.lanes import Lanes, bank_lanes, lane_metrics
from lvm_ray.eval.metrics import evaluate_detailed, hits_from_ranks, paired_diff_ci
from lvm_ray.eval.predict import predict_windows
from lvm_ray.eval.report import best_baseline, is_baseline


def fit_baselines_logged(bank: ConceptBank, train_ws: WindowSet, val_ws: WindowSet,
                         cfg: Config) -> list[Baseline]:
    t0 = time.perf_counter()
    say(f"baselines: copy-last, context-mean and ridge (fit on {len(train_ws)} train windows, "
        f"chosen on val by {cfg.eval.select_metric})")
    out = fit_baselines(bank, train_ws, val_ws, cfg.eval)
    say(f"baselines chosen in {time.perf_counter() - t0:.0f} s: "
        + ", ".join(b.name for b in out))
    return out


def evaluate_on_windows(models: dict[str, Any], bank: ConceptBank, train_ws: WindowSet,
                        val_ws: WindowSet, eval_ws: WindowSet, cfg: Config,
                        lanes: np.ndarray | None = None,
                        baselines: list[Baseline] | None = None) -> dict[str, dict[str, Any]]:
    """Protocol metrics for each model and for the baselines (fit on train, tuned on val, or
    given already fitted), all on eval_ws. lanes (N,) per bank row adds per-lane Hit@5 and the
    canary verdict."""
    device = resolve_device(cfg.train.device)
    if baselines is None:
        baselines = fit_baselines_logged(bank, train_ws, val_ws, cfg)
    t0 = time.perf_counter()
    say(f"scoring {len(models)} model(s) and {len(baselines)} baselines on {len(eval_ws)} "
        f"{eval_ws.split} windows against a bank of {len(eval_ws.rows)} concepts"
        + (f", {cfg.eval.bootstrap} bootstrap resamples" if cfg.eval.bootstrap else ""))
    preds = {name: predict_windows(model, bank.vectors, eval_ws, device=device)
             for name, model in models.items()}
    for bl in baselines:
        preds[bl.name] = bl.predict(bank.vectors, eval_ws)
    results, per = {}, {}
    for name, pred in preds.items():
        summary, per[name] = evaluate_detailed(pred, eval_ws, bank, cfg.eval)
        if lanes is not None:
            summary.update(lane_metrics(hits_from_ranks(per[name]["rank"], 5),
                                        lanes[eval_ws.target_rows], 5, cfg.eval.bootstrap,
                                        cfg.eval.seed))
        results[name] = summary
    add_paired_differences(results, per, cfg.eval.bootstrap, cfg.eval.seed)
    say(f"scored in {time.perf_counter() - t0:.0f} s")
    return results


PAIRED_KEYS = ("bank_hit@5", "ca")


def add_paired_differences(results: dict[str, dict[str, Any]],
                           per: dict[str, dict[str, np.ndarray]], bootstrap: int, seed: int
                           ) -> None:
    """Each model's difference to the best baseline (by bank-Hit@5) window by window, with a
    paired bootstrap CI: "paired_baseline", "paired_bank_hit@5" (+ "_lo", "_hi"), "paired_ca".
    Two CIs computed apart can overlap while the paired difference is clearly above 0: both
    are scored on the same windows, and what is easy for one is easy for the other."""
    best = best_baseline(results)
    if best is None or bootstrap < 1:
        return
    for name, s in results.items():
        if is_baseline(name):
            continue
        s["paired_baseline"] = best
        for key in (k for k in PAIRED_KEYS if k in per[name] and k in per[best]):
            d, lo, hi = paired_diff_ci(per[name][key], per[best][key], bootstrap, seed)
            s[f"paired_{key}"], s[f"paired_{key}_lo"], s[f"paired_{key}_hi"] = d, lo, hi


def lanes_of(cfg: Config, bank: ConceptBank) -> Lanes | None:
    """The bank's lanes (corpus, else k-means fit on train), or None when eval.lanes is 0."""
    return bank_lanes(bank, cfg.eval.lanes, cfg.eval.seed) if cfg.eval.lanes > 0 else None
