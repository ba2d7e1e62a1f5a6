"""`lvm context-curve`: saved checkpoints and the baselines on one fixed set of long-history
targets, at every context length L (the maths is lvm_ray.eval.context_curve); a Markdown table, a
PNG and a JSON; and, given the Phase-2 checkpoint's name, the router setting measured on val.

    lvm context-curve --config configs/ablations/base.yaml \
        --checkpoint L100=runs/ablations/base/best --checkpoint L1000=runs/ablations/ctx1000/best \
        --phase2 L100 --out runs/context_curve
    lvm context-curve --smoke-test          # random-init checkpoints on the synthetic bank

The output directory holds curve.md, curve.png, curve.json and, with --phase2, routing.md and
routing.json (the threshold and which checkpoint to serve as Phase-3).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lvm_ray.config import Config, merge, to_dict
from lvm_ray.console import say
from lvm_ray.data.bank import ConceptBank
from lvm_ray.device import resolve_device
from lvm_ray.eval.baselines import ContextMean
from lvm_ray.eval.context_curve import (LENGTHS, baseline_candidates, best_within, curve_markdown,
                                        curve_values, long_targets, plot_curve, route_threshold,
                                        routing_markdown, saturation, saturation_markdown,
                                        summarize, truncate)
from lvm_ray.eval.predict import predict_windows
from lvm_ray.model import build_model
from lvm_ray.serve.config import RouterUserConfig
from lvm_ray.train.checkpoint import load_checkpoint, save_checkpoint
from lvm_ray.train.loop import with_bank_width
from lvm_ray.workflows.prepare import ensure_bank, prepare_windows

MEAN, RIDGE, WHOLE = "context-mean (best m<=L)", "ridge (best m<=L)", "mean of all L"
Per = dict[str, dict[int, dict[str, np.ndarray]]]  # name -> L -> per-target metric arrays


def model_curves(models: dict[str, torch.nn.Module], bank: ConceptBank, split: str,
                 min_history: int, lengths: Sequence[int], device: str) -> Per:
    """Per-target values of every model at every L, on the split's long-history targets."""
    targets = long_targets(bank, split, min_history)
    if len(targets) == 0:
        rows = bank.split_rows(split)
        longest = int(bank.positions[rows].max()) + 1 if len(rows) else 0
        raise ValueError(f"no {split} target has {min_history} earlier concepts in its document "
                         f"(the longest {split} document has {longest}); lower --min-history")
    out: Per = {}
    for name, model in models.items():
        out[name] = {}
        for L in lengths:
            pred = predict_windows(model, bank.vectors, truncate(targets, L), device=device)
            out[name][L] = curve_values(pred, truncate(targets, L), targets, bank)
    return out


def baseline_curves(cfg: Config, bank: ConceptBank, split: str, min_history: int,
                    lengths: Sequence[int]) -> tuple[Per, dict[str, dict[int, str]]]:
    """context-mean and ridge (the best on val among those reading <= L vectors) and the mean of
    the whole L-vector context, on the same targets; and which baseline each point used."""
    ws = prepare_windows(cfg, bank)
    means, ridges = baseline_candidates(bank, ws.train, ws.val, cfg.eval)
    targets = long_targets(bank, split, min_history)
    per: Per = {MEAN: {}, RIDGE: {}, WHOLE: {}}
    chosen: dict[str, dict[int, str]] = {MEAN: {}, RIDGE: {}, WHOLE: {}}
    for L in lengths:
        cut = truncate(targets, L)
        for name, b in ((MEAN, best_within(means, L).baseline),
                        (RIDGE, best_within(ridges, L).baseline), (WHOLE, ContextMean(L))):
            per[name][L] = curve_values(b.predict(bank.vectors, cut), cut, targets, bank)
            chosen[name][L] = b.name
    return per, chosen


def choose_routing(val: Per, trained: dict[str, int], phase2: str, bootstrap: int,
                   seed: int) -> dict[str, Any]:
    """Every checkpoint trained on a longer context than Phase-2 is a Phase-3 candidate; the one
    that measurably beats Phase-2 on val from the shortest length wins (ties: the larger lead at
    the longest length). None of them winning anywhere means: route nothing to Phase-3."""
    if phase2 not in val:
        raise ValueError(f"--phase2 {phase2!r} is not one of the checkpoints {sorted(val)}")
    decisions = [route_threshold(val, phase2, name, bootstrap=bootstrap, seed=seed,
                                 short_context=trained[phase2])
                 for name in val if name != phase2 and trained[name] > trained[phase2]]
    if not decisions:
        raise ValueError(f"no checkpoint was trained on a longer context than {phase2!r} "
                         f"({trained[phase2]})")
    winners = [d for d in decisions if d["wins_from"] is not None]
    best = min(winners, key=lambda d: (d["wins_from"], -d["rows"][-1]["diff"])) if winners \
        else None
    return {"phase2": phase2, "phase3": best["long"] if best else None,
            "threshold": best["threshold"] if best else None, "candidates": decisions}


def serve_snippet(routing: dict[str, Any], checkpoints: dict[str, str]) -> list[str]:
    """The serve config lines that apply a routing decision. No winner: a threshold of
    max_context_vectors, so no request counts as long and Phase-3 gets nothing."""
    p3 = routing["phase3"]
    limit = RouterUserConfig().max_context_vectors
    return [f"args: {{phase2_checkpoint: {checkpoints[routing['phase2']]}, phase3_checkpoint: "
            f"{checkpoints[p3] if p3 else '(any; it receives no routed traffic)'}}}",
            "Router user_config: {threshold: "
            f"{routing['threshold'] if p3 else limit}}}"
            + ("" if p3 else "  # = max_context_vectors: no context is long")]


def _smoke_checkpoints(cfg: Config, out: Path) -> dict[str, str]:
    """Random-init GRU (context 4) and transformer (context 16) checkpoints for --smoke-test."""
    paths = {}
    for name, kind, ctx in (("gru_L4", "gru", 4), ("transformer_L16", "transformer", 16)):
        mcfg = merge(cfg, {"model": {"kind": kind}, "window": {"context": ctx}})
        torch.manual_seed(0)
        model = build_model(mcfg.model)
        paths[name] = str(save_checkpoint(out / "smoke_checkpoints" / name, model, mcfg.model,
                                          epoch=0, metrics={}, config=to_dict(mcfg)))
    return paths


def run_context_curve(cfg: Config, checkpoints: dict[str, str], split: str = "test",
                      lengths: Sequence[int] = LENGTHS, min_history: int = 1000,
                      out_dir: str | Path = "runs/context_curve", phase2: str | None = None,
                      smoke: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not checkpoints and not smoke:
        raise ValueError("give at least one --checkpoint NAME=PATH")
    lengths = sorted({int(L) for L in lengths if int(L) <= min_history})
    bank = ensure_bank(cfg)
    if smoke and not checkpoints:
        checkpoints = _smoke_checkpoints(with_bank_width(cfg, bank), out)
        phase2 = phase2 or "gru_L4"
    device = resolve_device(cfg.train.device)
    models, trained = {}, {}
    for name, path in checkpoints.items():
        ck = load_checkpoint(path, device=device)
        models[name] = ck.model
        trained[name] = int(ck.meta.get("config", {}).get("window", {}).get("context", 0)) \
            or min_history
    targets = long_targets(bank, split, min_history)
    say(f"context curve on {split}: {len(targets)} targets with >= {min_history} earlier concepts "
        f"in their document ({len(set(bank.doc_names_of(targets.target_rows)))} document(s)), "
        f"L in {lengths}")
    per = model_curves(models, bank, split, min_history, lengths, device)
    base_per, chosen = baseline_curves(cfg, bank, split, min_history, lengths)
    per.update(base_per)
    summary = {n: {L: summarize(v, cfg.eval.bootstrap, cfg.eval.seed) for L, v in pts.items()}
               for n, pts in per.items()}
    docs = sorted(set(bank.doc_names_of(targets.target_rows)))
    meta = {"split": split, "targets": f"{len(targets):,} (every {split} target with >= "
            f"{min_history} earlier concepts in its document; {len(docs)} document(s): "
            f"{', '.join(docs)})",
            "candidates": f"the {split} bank ({len(targets.rows):,} concepts) minus each "
            f"target's {min_history} preceding concepts, the same at every L",
            "CIs": f"95% bootstrap over targets ({cfg.eval.bootstrap} resamples); targets of one "
            "document are not independent, so these CIs are too narrow for a claim about "
            "documents",
            "baselines": "context-mean and ridge: the best on val among those reading <= L "
            "vectors (ridge fit on train); mean of all L: the plain mean of the whole context"}
    sat = {n: saturation(pts, "bank_hit@5", cfg.eval.bootstrap, cfg.eval.seed)
           for n, pts in per.items()}
    md = ["# Context-scaling curve", "", curve_markdown(summary, trained, meta),
          "", "![metrics against context length](curve.png)", "",
          "## Where more context stops helping (bank-Hit@5)", "",
          saturation_markdown(sat, lengths[0])]
    plot_curve(summary, [MEAN, RIDGE, WHOLE], str(out / "curve.png"),
               f"{split}: {len(targets)} targets with >= {min_history} earlier concepts")
    result: dict[str, Any] = {"split": split, "min_history": min_history, "lengths": lengths,
                              "n_targets": len(targets), "documents": docs, "trained": trained,
                              "checkpoints": checkpoints, "baselines_chosen": chosen,
                              "saturation": sat,
                              "summary": {n: {str(L): s for L, s in pts.items()}
                                          for n, pts in summary.items()}}
    if phase2 is not None:
        say(f"router threshold: {phase2} against each longer-context checkpoint on val")
        val = model_curves(models, bank, "val", min_history, lengths, device)
        routing = choose_routing(val, trained, phase2, cfg.eval.bootstrap, cfg.eval.seed)
        result["routing"] = routing
        (out / "routing.json").write_text(json.dumps(routing, indent=2))
        n_val = len(long_targets(bank, "val", min_history))
        rmd = [f"# Router threshold from the val curve ({n_val} val targets with >= "
               f"{min_history} earlier concepts)", ""]
        for d in routing["candidates"]:
            rmd += [f"## {d['long']} vs {d['short']}", "", routing_markdown(d)]
        rmd.append(f"Phase-3: **{routing['phase3'] or 'none'}**, threshold: "
                   f"**{routing['threshold'] if routing['threshold'] is not None else 'none'}**"
                   + ("" if routing["phase3"] else " (no candidate measurably beats Phase-2 on "
                      "val at any length: route nothing to a Phase-3)"))
        rmd += ["", "In a serve config (docs/serve.md):", "", "```yaml", *serve_snippet(
            routing, checkpoints), "```"]
        (out / "routing.md").write_text("\n".join(rmd) + "\n")
        md += ["## Routing (val)", "", "\n".join(rmd[2:])]
    (out / "curve.md").write_text("\n".join(md))
    (out / "curve.json").write_text(json.dumps(result, indent=2))
    say(f"context curve written to {out} in {time.perf_counter() - t0:.0f} s")
    result["markdown"] = "\n".join(md)
    return result
