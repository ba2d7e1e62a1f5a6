"""`make demo`: the main job end to end on the embedded corpus.

ingest the 10 longest State of the Union speeches with MiniLM (Ray Data, cached; every split holds
a speech of more than 1,000 concepts) -> train a Phase-2 (500-context) and a Phase-3 (1000-context)
model with Ray Train (2 workers) -> evaluate both on the test documents beside the baselines, and
on the test windows where Phase-3 reads more than Phase-2 -> serve them behind the hybrid router
and ask it for the concept after a context long enough to reach Phase-3.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from ray import serve

from lvm_ray.config import Config, load_config, merge
from lvm_ray.console import say
from lvm_ray.data.bank import ConceptBank
from lvm_ray.data.windows import make_windows
from lvm_ray.distributed.runtime import init_ray
from lvm_ray.eval.baselines import fit_baselines
from lvm_ray.eval.context_curve import curve_values, summarize, truncate
from lvm_ray.eval.metrics import paired_diff_ci
from lvm_ray.eval.predict import predict_windows
from lvm_ray.eval.report import is_baseline, summary_table, write_report
from lvm_ray.serve.app import make_app
from lvm_ray.serve.config import RouterUserConfig
from lvm_ray.train.checkpoint import load_checkpoint
from lvm_ray.workflows.prepare import ensure_bank, prepare_windows
from lvm_ray.workflows.train import train_and_evaluate


def run_demo(quick: bool = False, serve: bool = True, address: str | None = None,
             verbose: bool = False) -> int:
    t0 = time.perf_counter()
    # --quick has its own bank and runs: it never overwrites (or is served as) the full demo's.
    overrides = ({"corpus": {"max_docs": 8}, "train": {"max_epochs": 2, "max_train_windows": 256},
                  "bank_path": "data/sotu_demo_quick_bank.parquet",
                  "run": {"storage_path": "runs/demo_quick"}} if quick else {})
    base = load_config(presets=["demo"], overrides=overrides)
    init_ray(address=address, verbose=verbose)
    say(f"1/4 ingest: the {base.corpus.max_docs} longest State of the Union speeches, "
        f"encoder {base.encoder.name} -> {base.bank_path}")
    bank = ensure_bank(base, use_ray=True)

    summaries, cfgs = {}, {}
    for step, phase in ((2, "phase2"), (3, "phase3")):
        cfgs[phase] = merge(load_config(presets=["demo", phase]), overrides)
        cfg = cfgs[phase]
        say(f"{step}/4 train {phase}: context {cfg.window.context}, {cfg.model.kind} "
            f"hidden {cfg.model.hidden}, {cfg.scaling.num_workers} Ray Train workers")
        # Each `make demo` trains afresh: the demo's runs are its own to replace.
        summaries[phase] = train_and_evaluate(cfg, use_ray=True, bank=bank, overwrite=True,
                                              verbose=verbose)

    # Both phases use `document` windows, so their test targets are the same windows and one
    # set of baselines serves both.
    combined: dict = {}
    for phase, s in summaries.items():
        for name, res in s["results"].items():
            if is_baseline(name):
                combined.setdefault(name, res)
            else:
                combined[name] = res
    combined = {k: combined[k] for k in sorted(combined, key=is_baseline)}  # models first
    out = Path(base.run.storage_path)
    report = write_report(combined, out, "lvm_ray demo: test split of the sotu subset",
                          {"split": "test", "encoder": bank.meta.get("encoder"),
                           "bank": base.bank_path})
    say("3/4 test results (bank = every test concept; CIs are 95% bootstrap over windows)")
    print(summary_table(combined), flush=True)
    md = where_phase3_reads_more(bank, cfgs, summaries)
    print(md, flush=True)
    report.write_text(report.read_text() + "\n" + md)

    if serve:
        say("4/4 serve: hybrid router over both checkpoints")
        _serve_once(base, summaries, bank)
    say(f"done in {time.perf_counter() - t0:.0f} s. Report: {report}; runs: "
        + ", ".join(s["run_dir"] for s in summaries.values()))
    (out / "demo_summary.json").write_text(json.dumps(
        {p: {"run_dir": s["run_dir"], "best_checkpoint": s["best_checkpoint"]}
         for p, s in summaries.items()}, indent=2))
    return 0


def where_phase3_reads_more(bank: ConceptBank, cfgs: dict[str, Config],
                            summaries: dict[str, dict]) -> str:
    """Phase-2 and Phase-3 on the test targets past Phase-2's context (only there do they read
    different inputs), beside the baselines on the same targets, with 95% CIs and the paired
    difference. Candidates: the test bank minus each target's Phase-3 context, for every row."""
    p2, p3 = cfgs["phase2"].window.context, cfgs["phase3"].window.context
    test3 = make_windows(bank, "test", cfgs["phase3"].window)
    long = test3.subset(np.flatnonzero(test3.lengths > p2))
    say(f"Phase-3 reads more than Phase-2 on {len(long)} of {len(test3)} test windows (target "
        f"past position {p2}); comparing them there")
    if len(long) == 0:
        return f"No test window has a target past position {p2}: Phase-2 and Phase-3 read alike.\n"
    cfg = cfgs["phase2"]
    preds = {}
    for phase, L in (("phase2", p2), ("phase3", p3)):
        model = load_checkpoint(summaries[phase]["best_checkpoint"]).model
        preds[f"{phase} (reads {L})"] = predict_windows(model, bank.vectors, truncate(long, L))
    ws = prepare_windows(cfg, bank)
    for bl in fit_baselines(bank, ws.train, ws.val, cfg.eval):
        preds[bl.name] = bl.predict(bank.vectors, long)
    per = {n: curve_values(p, truncate(long, p3), long, bank) for n, p in preds.items()}
    b, seed = cfg.eval.bootstrap, cfg.eval.seed
    rows = ["| model | bank-Hit@5 (%) | MRR | CA (%) |", "|---|---|---|---|"]
    for n, v in per.items():
        s = summarize(v, b, seed)
        rows.append(f"| {n} | {100 * s['bank_hit@5']:.1f} [{100 * s['bank_hit@5_lo']:.1f}, "
                    f"{100 * s['bank_hit@5_hi']:.1f}] | {s['mrr']:.3f} [{s['mrr_lo']:.3f}, "
                    f"{s['mrr_hi']:.3f}] | {100 * s['ca']:.1f} [{100 * s['ca_lo']:.1f}, "
                    f"{100 * s['ca_hi']:.1f}] |")
    n2, n3 = list(per)[:2]
    d, lo, hi = paired_diff_ci(per[n3]["bank_hit@5"], per[n2]["bank_hit@5"], b, seed)
    docs = sorted(set(bank.doc_names_of(long.target_rows)))
    return "\n".join([
        f"## Where Phase-3 reads more: {len(long)} test targets past position {p2}", "",
        f"Document(s): {', '.join(docs)}. Candidates: the {len(long.rows):,} test concepts minus "
        f"each target's {p3} preceding ones (the same for every row); [95% bootstrap CI over "
        "targets].", "", *rows, "",
        f"Phase-3 - Phase-2, paired over the same targets: {100 * d:+.2f} points of bank-Hit@5 "
        f"[{100 * lo:+.2f}, {100 * hi:+.2f}]"
        + (" (measurable)" if lo > 0 or hi < 0 else " (not measurable on this subset)"), ""])


def _serve_once(base, summaries, bank: ConceptBank) -> None:
    """Deploy the hybrid app, ask it questions, print the answers, shut down. The long context is
    the start of the longest test speech: the concepts before a target past Phase-2's reach."""
    rows = bank.split_rows("test")
    docs, counts = np.unique(bank.doc_ids[rows], return_counts=True)
    doc = docs[np.argmax(counts)]
    doc_rows = rows[bank.doc_ids[rows] == doc]
    n = min(len(doc_rows) - 1, 1100)
    demo_query(summaries["phase2"]["best_checkpoint"], summaries["phase3"]["best_checkpoint"],
               base.bank_path, long_ids=doc_rows[: n + 1].tolist())


def demo_query(phase2_checkpoint: str, phase3_checkpoint: str, bank: str,
               texts: list[str] | None = None, long_ids: list[int] | None = None
               ) -> dict[str, Any]:
    """For `make demo`: deploy the app on the running Ray (the full rollout: every long context
    may go to Phase-3, at the default threshold), ask it over HTTP for the concept after a few
    sentences (one prediction, then a session fed one sentence at a time) and, with long_ids, after
    long_ids[:-1] (whose true next concept is long_ids[-1]); print the answers, shut Serve down.
    Returns the predict response."""
    texts = texts or ["We must rebuild our economy.", "Our workers deserve better wages.",
                      "Tonight I ask the Congress to act."]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(make_app({"phase2_checkpoint": phase2_checkpoint,
                            "phase3_checkpoint": phase3_checkpoint, "bank": bank},
                           # As serve_configs/hybrid.yaml: on sotu lanes every model and every
                           # baseline fails the lane rule (docs/results.md), so it is not enforced.
                           {"Router": {"user_config": {"canary_fraction": 1.0,
                                                       "enforce_lane_rule": False}}}),
                  name="lvm", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            r = http.post("/v1/predict", json={"texts": texts, "k": 3})
            r.raise_for_status()
            out = r.json()
            print(f"context: {texts}\n{out['model']} ({out['route']}) predicts the next concept "
                  f"is near:", flush=True)
            for n in out["neighbors"]:
                print(f"  {n['score']:.3f}  [{n['doc_id']} #{n['position']}] {n['text'][:100]}")
            s = http.post("/v1/sessions", json={}).json()
            for t in texts:
                r = http.post(f"/v1/sessions/{s['session_id']}/append",
                              json={"state": s["state"], "texts": [t], "k": 1})
                r.raise_for_status()
                s = r.json()
            same = s["neighbors"][0]["concept_id"] == out["neighbors"][0]["concept_id"]
            print(f"a session fed the same {s['n_seen']} sentences one at a time "
                  f"{'agrees' if same else 'DIFFERS'}: {s['neighbors'][0]['text'][:100]!r} "
                  f"(last append {s['timings_ms']['total']:.1f} ms in the router)", flush=True)
            if long_ids:
                _ask_long(http, long_ids)
        return out
    finally:
        serve.shutdown()


def _ask_long(http: httpx.Client, ids: list[int]) -> None:
    """A long context by concept ids: where the router sends it, and both models' answers."""
    ctx, target = ids[:-1], ids[-1]
    threshold = RouterUserConfig().threshold
    routed = http.post("/v1/predict", json={"concept_ids": ctx, "k": 5})
    routed.raise_for_status()
    r = routed.json()
    print(f"a {len(ctx)}-concept context (the test speech up to position {len(ctx) - 1}; router "
          f"threshold {threshold}) went to {r['model']} ({r['route']}), which read "
          f"{r['context_used']} vectors", flush=True)
    for model in ("phase2", "phase3"):
        out = r if model == r["model"] else http.post(
            "/v1/predict", json={"concept_ids": ctx, "k": 5, "model": model}).json()
        ranks = [n["concept_id"] for n in out["neighbors"]]
        hit = f"rank {ranks.index(target) + 1}" if target in ranks else "not in the top 5"
        print(f"  {model} (read {out['context_used']}): true next concept {hit}; top: "
              f"{out['neighbors'][0]['text'][:90]!r}", flush=True)
