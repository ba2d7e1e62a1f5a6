"""`make demo`: the main job end to end on the embedded corpus.

ingest a subset of the State of the Union speeches with MiniLM (Ray Data, cached) -> train a
Phase-2 (500-context) and a Phase-3 (1000-context) model with Ray Train (2 workers) -> evaluate
both on the test documents beside the baselines -> serve them behind the hybrid router and ask it
for a prediction.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
from ray import serve

from lvm_ray.config import load_config, merge
from lvm_ray.console import say
from lvm_ray.data.windows import make_windows
from lvm_ray.distributed.runtime import init_ray
from lvm_ray.eval.report import is_baseline, summary_table, write_report
from lvm_ray.serve.app import make_app
from lvm_ray.workflows.prepare import ensure_bank
from lvm_ray.workflows.train import train_and_evaluate


def run_demo(quick: bool = False, serve: bool = True, address: str | None = None,
             verbose: bool = False) -> int:
    t0 = time.perf_counter()
    # --quick has its own bank and runs: it never overwrites (or is served as) the full demo's.
    overrides = {"corpus": {"max_docs": 30}, "train": {"max_epochs": 2},
                 "bank_path": "data/sotu_demo_quick_bank.parquet",
                 "run": {"storage_path": "runs/demo_quick"}} if quick else {}
    base = load_config(presets=["demo"], overrides=overrides)
    init_ray(address=address, verbose=verbose)
    say(f"1/4 ingest: first {base.corpus.max_docs} State of the Union speeches, "
        f"encoder {base.encoder.name} -> {base.bank_path}")
    bank = ensure_bank(base, use_ray=True)

    summaries = {}
    for step, phase in ((2, "phase2"), (3, "phase3")):
        cfg = merge(load_config(presets=["demo", phase]), overrides)
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
    p2 = load_config(presets=["demo", "phase2"]).window.context
    test3 = make_windows(bank, "test", load_config(presets=["demo", "phase3"]).window)
    longer = int((test3.lengths > p2).sum())
    say(f"Phase-3 reads more than Phase-2 on {longer} of {len(test3)} test windows (those "
        f"whose document context exceeds {p2} concepts); elsewhere the two see the same input.")

    if serve:
        say("4/4 serve: hybrid router over both checkpoints")
        _serve_once(base, summaries)
    say(f"done in {time.perf_counter() - t0:.0f} s. Report: {report}; runs: "
        + ", ".join(s["run_dir"] for s in summaries.values()))
    (out / "demo_summary.json").write_text(json.dumps(
        {p: {"run_dir": s["run_dir"], "best_checkpoint": s["best_checkpoint"]}
         for p, s in summaries.items()}, indent=2))
    return 0


def _serve_once(base, summaries) -> None:
    """Deploy the hybrid app, ask it one question in text, print the answer, shut down."""
    demo_query(summaries["phase2"]["best_checkpoint"], summaries["phase3"]["best_checkpoint"],
               base.bank_path)


def demo_query(phase2_checkpoint: str, phase3_checkpoint: str, bank: str,
               texts: list[str] | None = None) -> dict[str, Any]:
    """For `make demo`: deploy the app on the running Ray, ask it over HTTP for the concept after
    a few sentences (one prediction, then a session fed one sentence at a time), print the
    answers, shut Serve down. Returns the predict response."""
    texts = texts or ["We must rebuild our economy.", "Our workers deserve better wages.",
                      "Tonight I ask the Congress to act."]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(make_app({"phase2_checkpoint": phase2_checkpoint,
                            "phase3_checkpoint": phase3_checkpoint, "bank": bank}),
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
        return out
    finally:
        serve.shutdown()
