"""The Markdown sections of RELIABILITY.md, from the raw results of bench/reliability.py."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from bench.common import markdown_table
from harness.serve_faults import MODELS, fmt_ms
from harness.train_faults import compare

RELIABILITY = Path(__file__).resolve().parents[1] / "RELIABILITY.md"


def verdict(ok: bool) -> str:
    return "met" if ok else "not met"


def serve_report(s: dict[str, Any]) -> str:
    rows = []
    levels = s["levels"] + ([dict(s["model_bound"], level="32, predict 500 vectors only")]
                            if "model_bound" in s else [])
    for lv in levels:
        rows.append([lv["level"], f"{lv['wall_s']:.0f}", lv["requests"], f"{lv['rps']:.1f}",
                     fmt_ms(lv["p50_ms"]), fmt_ms(lv["p95_ms"]), fmt_ms(lv["p99_ms"]),
                     f"{lv['errors']}" + (f" {lv['errors_by_status']}" if lv["errors"] else ""),
                     lv["replicas"]["Phase2Model"], lv["replicas"]["Phase3Model"],
                     " / ".join(fmt_ms(lv.get("ongoing", {}).get(d, float("nan")))
                                for d in ("Router", "TextEncoder", *MODELS)),
                     f"{lv['routing']} ({lv['rollbacks']} rollback(s))"])
    levels = markdown_table(["concurrency", "s", "requests", "req/s", "P50 ms", "P95 ms",
                             "P99 ms", "errors", "Phase2Model replicas",
                             "Phase3Model replicas",
                             "mean ongoing requests: Router / TextEncoder / Phase2Model / "
                             "Phase3Model", "Phase-3 routing at the end"], rows)
    kinds = sorted({k for lv in s["levels"] for k in lv["by_kind"]})
    krows = [[k] + [f"{fmt_ms(lv['by_kind'][k]['p50_ms'])} / {fmt_ms(lv['by_kind'][k]['p95_ms'])}"
                    f" ({lv['by_kind'][k]['requests']})" if k in lv["by_kind"] else "-"
                    for lv in s["levels"]] for k in kinds]
    by_kind = markdown_table(["kind"] + [f"c={lv['level']}: P50 / P95 ms (n)"
                                         for lv in s["levels"]], krows)
    f = s["fault"]
    fault = markdown_table(["measure", "value"], [
        ["load", f"concurrency {f['concurrency']}, mixed kinds, {f['wall_s']:.0f} s, "
                 f"{f['requests']} requests"],
        ["killed", f"{f['deployment']} replica {f['killed']['tag']} (pid {f['killed']['pid']}) "
                   f"with SIGKILL at {f['kill_at_s']:.1f} s; replicas before: "
                   f"{f['replicas_before']}"],
        ["failed in the 30 s around the kill",
         f"{f['failed_around']} of {f['around']} ({f['failed_around_pct']:.2f}%)"],
        ["their errors", "; ".join(f["errors_around"][:4]) or "none"],
        ["replacement running after (recovery time)",
         f"{f['recovery_s']:.1f} s" if f["recovery_s"] is not None else "NOT RECOVERED"],
        ["failed after recovery", f"{f['failed_after']} of {f['after']}"],
        ["last failure after the kill", "-" if f["last_failure_after_kill_s"] is None
         else f"{f['last_failure_after_kill_s']:.1f} s"],
        ["latency in the 30 s around the kill", f"P50 {fmt_ms(f['p50_ms_around'])}, P99 "
         f"{fmt_ms(f['p99_ms_around'])}, max {fmt_ms(f['max_ms_around'])} ms"],
        ["Phase2Model RUNNING replicas over time", f["replicas"]],
        ["sessions opened before the kill, continued after it with the exact full-context "
         "prediction", f"{f['sessions_continued']} of {f['sessions']} (largest absolute "
                     f"difference {f['session_max_diff']:.1e})"],
    ])
    bad_rows = [[i + 1, r["name"], f"{r['method']} {r['path']}", r["status"],
                 r["detail"][:110].replace("|", "\\|").replace("\n", " "),
                 "ok" if not r["problem"] else f"**{r['problem']}**"]
                for i, r in enumerate(s["bad"])]
    n_bad = len(s["bad"]) - 1
    n_5xx = sum(r["status"] >= 500 or r["status"] == 0 for r in s["bad"])
    n_wrong = sum(bool(r["problem"]) for r in s["bad"])
    bad = markdown_table(["#", "malformed request", "endpoint", "status", "message (truncated)",
                          "as expected"], bad_rows)
    lv8 = next((lv for lv in s["levels"] if lv["level"] == 8), None)
    mb = s.get("model_bound")
    top = s["levels"][-1]
    queue = max(("TextEncoder", *MODELS), key=lambda d: top.get("ongoing", {}).get(d, 0.0))
    queue_text = (f"At concurrency {top['level']} the longest queue behind the router was at "
                  f"{queue} (mean {fmt_ms(top.get('ongoing', {}).get(queue, float('nan')))} "
                  "ongoing requests)" + (", which has a fixed single replica; the model "
                                         "deployments stayed under their target, so nothing "
                                         "was added there." if queue not in MODELS else "."))
    mb_text = "" if mb is None else (
        f"In the model-bound level (32 clients, each request a 500-vector predict, all on "
        f"Phase2Model) its RUNNING replicas went {mb['replicas']['Phase2Model']} "
        f"(mean ongoing requests {fmt_ms(mb['ongoing']['Phase2Model'])}): autoscaling "
        f"{'added a replica' if mb['max_replicas']['Phase2Model'] > 1 else 'added nothing'}.")
    scaled = {d: max(lv["max_replicas"][d] for lv in s["levels"]) for d in MODELS}
    return f"""
## Serve under load

Models: {s['what']}. Config: serve_configs/hybrid.yaml as is (Router user_config
`{json.dumps({k: s['router'][k] for k in ('threshold', 'canary_fraction', 'p95_limit_ms')})}`,
model deployments autoscaled 1-2 replicas at 8 ongoing requests each), except the app args
(paths, a fixed session key) and the port. Serve was started with no `host` and listened on
{', '.join(s['bind']) or 'unknown'} (port {s['port']}).

Load: `harness.loadgen.run_load`, closed loop, loopback only, each level capped at its duration;
kinds (weights) predict JSON 32 vectors (1), predict base64 64/256/600 vectors (2; the 600-vector
ones are long contexts: 5% canary to Phase-3), predict 3 texts (1), predict 50 concept ids (1),
session open with 16 vectors (0.5), session append of 1 vector (3; each client continues its
session for 20 appends). The Phase-3 rollout is re-armed before each level. Percentiles over
successful requests; client, proxy, router and replicas share the machine's 2 cores.

{levels}

Per kind (P50 / P95 ms, requests):

{by_kind}

Goal: zero errors at concurrency 8: **{verdict(lv8 is not None and lv8['errors'] == 0)}**
({lv8['errors'] if lv8 else '?'} errors).

Autoscaling: during the mixed levels at most {scaled['Phase2Model']} Phase2Model and
{scaled['Phase3Model']} Phase3Model replicas were RUNNING. {queue_text} {mb_text}
Replica counts are sampled from `serve.status()` every 2 s; the "replicas" columns list each
change with its time since the level started. "Mean ongoing requests" is what a deployment's
autoscaler compares with its `target_ongoing_requests` (8 per replica for the model
deployments; Router and TextEncoder have fixed replica counts): requests running in its
replicas plus requests queued for it in handles (Serve's `ray_serve_replica_processing_queries`
+ `ray_serve_deployment_queued_queries`, scraped every 2 s from 10 s into each level). A model
deployment gains a replica when this stays above 8 per replica for `upscale_delay_s` (10 s).

## Serve: a model replica process killed under load

{fault}

Goals: under 1% failed in the 30 s around the kill: **{verdict(f['failed_around_pct'] < 1)}**;
zero failures after recovery: **{verdict(f['recovery_s'] is not None and f['failed_after'] == 0)}**;
sessions survive: **{verdict(f['sessions'] and f['sessions_continued'] == f['sessions'])}**.

## Serve: malformed requests

{n_bad} malformed requests (`harness.bad_requests`) against the same app, with its
configured caps (max_context_vectors {s['router']['max_context_vectors']}, max_body_bytes
{s['router']['max_body_bytes']}, max_k {s['router']['max_k']}); the last row checks the service
still answers. 5xx or no answer: **{n_5xx}**; not the expected 4xx with a message: **{n_wrong}**.

{bad}
"""


def train_report(t: dict[str, Any]) -> str:
    # The noise: how far two uninterrupted runs with the same seed end apart.
    noise1 = compare(t["ref1b"]["history"], t["ref1"]["history"])["best_diff"] \
        if "ref1b" in t else 0.0
    noise2 = compare(t["ref2b"]["history"], t["ref2"]["history"])["best_diff"] \
        if "ref2b" in t else None

    def hist_row(label: str, r: dict, ref: dict | None, how: str, noise: float | None) -> list:
        c = compare(r["history"], ref["history"]) if ref else None
        faulted = how != "-"
        return [label, how, r["status"], len(r["history"]), f"{r['best']:.4f}",
                "-" if c is None else ("identical" if c["identical"] else
                                       f"loss {c['max_loss_diff']:.2e}, Hit@5 "
                                       f"{c['max_hit_diff']:.4f}"),
                "-" if c is None else f"{c['best_diff']:.4f}",
                "-" if not faulted or noise is None else
                ("yes" if r["status"] == "SUCCEEDED" and c["best_diff"] <= noise else "**no**"),
                ", ".join(r.get("resumed_from") or []) or "-"]

    rows = []
    ref1 = t["ref1"]
    rows.append(hist_row("1 worker, uninterrupted (reference)", ref1, None, "-", noise1))
    if "ref1b" in t:
        rows.append(hist_row("1 worker, uninterrupted, again", t["ref1b"], ref1, "-", noise1))
    d = t["driver"]
    rows.append(hist_row("1 worker, driver killed, job re-submitted", d, ref1,
                         f"driver pid SIGKILL after {d['epochs_at_kill']} epochs (latest "
                         f"registered checkpoint {d.get('registered_before_resubmit')}); first "
                         f"job {d['first_status']}; same command again", noise1))
    if "worker" in t:
        w = t["worker"]
        rows.append(hist_row("1 worker, worker killed mid-epoch", w, ref1,
                             f"rank-0 pid SIGKILL during epoch {w['killed_in_epoch']} (before "
                             "it was reported); FailureConfig(max_failures=2)", noise1))
    if "ref2" in t:
        ref2 = t["ref2"]
        rows.append(hist_row("2 workers, uninterrupted (reference)", ref2, None, "-", noise2))
        rows.append(hist_row("2 workers, uninterrupted, again", t["ref2b"], ref2, "-", noise2))
        w = t["worker2"]
        rows.append(hist_row("2 workers, worker killed mid-epoch", w, ref2,
                             f"rank-0 pid SIGKILL during epoch {w['killed_in_epoch']}",
                             noise2))
        d2 = t["driver2"]
        rows.append(hist_row("2 workers, driver killed, job re-submitted", d2, ref2,
                             f"driver pid SIGKILL after {d2['epochs_at_kill']} epochs (latest "
                             f"registered checkpoint {d2.get('registered_before_resubmit')})",
                             noise2))
    table = markdown_table(["run", "fault", "job", "epochs", "best val Hit@5",
                            "max per-epoch difference from its reference",
                            "best minus reference best (abs)", "same best within the noise",
                            "resumed from (epoch)"], rows)
    wr = markdown_table(["save_checkpoint killed (SIGKILL)", "into", "target afterwards",
                         "left beside it", "as expected"],
                        [[r["killed"], r["target"],
                          ("valid, epoch " + str(r["epoch"])) if r["valid"] else
                          ("exists, INVALID" if r["target_exists"] else "absent"),
                          ", ".join(r["leftovers"]) + (" (not a valid checkpoint)"
                                                       if r["leftovers"] and not
                                                       r["leftovers_valid"] else ""),
                          "yes" if r["ok"] else "**no**"] for r in t["writes"]])
    c, b = t["corrupt"], t["bad_job"]
    noise_text = f"{noise1:.4f} with 1 worker" + ("" if noise2 is None else
                                                  f", {noise2:.4f} with 2 workers")
    noise = "with 1 worker two uninterrupted runs are " + (
        "not compared (smoke test)" if "ref1b" not in t else "bit-identical"
        if compare(t["ref1b"]["history"], ref1["history"])["identical"] else
        "NOT bit-identical (see the table)") + "."
    if "ref2b" in t:
        c2 = compare(t["ref2b"]["history"], t["ref2"]["history"])
        noise += (" With 2 workers two uninterrupted runs are bit-identical too." if
                  c2["identical"] else
                  f" With 2 workers they differ by up to {c2['max_loss_diff']:.2e} in train "
                  f"loss and {c2['max_hit_diff']:.4f} in val Hit@5 per epoch, "
                  f"{c2['best_diff']:.4f} in best val Hit@5: the noise for the 2-worker rows.")
    return f"""
## Training faults

Jobs submitted with `ray job submit` to a `ray start --head --num-cpus=2` cluster on this
machine (harness/cluster.py), all with the same command: `jobs/train.py --smoke-test`
(synthetic corpus of {t['spec']['docs']} documents, the smoke model), {t['spec']['epochs']} epochs
without early stopping, seed 0, `run.max_failures=2`. A run resumes from the latest checkpoint Ray
Train recorded (checkpoints are written when val Hit@5 improves, so the latest is the best);
epochs after it are trained again.

{table}

Noise: {noise}
Goal "a resumed run reaches the same best val Hit@5 as an uninterrupted one, within the
noise": a faulted run meets it when its best differs from its reference's by no more than two
uninterrupted runs differ ({noise_text}).
"resumed from" is the epoch of the checkpoint the worker was handed (its log line): Ray Train
resumes from the latest checkpoint its controller had registered, which can be older than the
latest one the worker wrote (the controller picks reports up asynchronously; a checkpoint
persisted but not yet registered is ignored, and its epochs are trained again).

A checkpoint that Ray Train would resume from, cut in half after the run finished
({c['checkpoint']}/model.safetensors): the same job submitted again ends **{c['status']}**
without training or writing anything ({len(c['changed'])} files changed), with the one line
`{c['message'][:300]}`.

A job with a malformed config (`--set train.lr=-1`) submitted the same way: **{b['status']}**,
`{b['message'][:200]}`; files written for it: {len(b['written'])}.

Checkpoint writes killed halfway (`save_checkpoint` in a child process that SIGKILLs itself
mid-write; checkpoints are written into a hidden sibling directory and renamed into place, and
checkpoint.json, written last, holds the SHA-256 of every file):

{wr}
"""


def input_report(r: dict[str, Any]) -> str:
    rows = [[i + 1, c["name"], c["command"], c["exit"],
             c["message"][:160].replace("|", "\\|"), "yes" if c["traceback"] else "no",
             len(c["written"]), "yes" if c["ok"] else "**no**"]
            for i, c in enumerate(r["cases"])]
    bad = [c for c in r["cases"] if not c["ok"]]
    return f"""
## Malformed corpora and configs (CLI and job scripts)

Each run as its own process (`python -m lvm_ray.cli ...` or `python jobs/<script> ...`), outputs
pointed at an empty directory. Expected: a non-zero exit, one line `lvm <command>: error: ...`
naming the problem, no traceback, nothing written. {len(r['cases'])} cases, **{len(bad)}** not as
expected; stray temporary files afterwards: {len(r['stray_tmp'])}.

{markdown_table(["#", "malformed input", "command", "exit", "message (truncated)", "traceback",
                 "files written", "as expected"], rows)}
"""


def write_report(sections: dict[str, str], runs: dict[str, dict]) -> None:
    """Replace (or add) each part's section of RELIABILITY.md; `runs` holds, per part, when and
    by which command its numbers were measured."""
    head = ("# lvm_ray reliability\n\nWritten by `make reliability` "
            "(`python bench/reliability.py`): every number below comes from the run named in its "
            "section. Smaller versions of the same checks run in the test suite "
            "(tests/test_reliability_serve.py, tests/test_reliability_train.py, "
            "tests/test_job_submit.py, tests/test_bad_input_cli.py, tests/test_security.py); "
            "security properties and "
            "what a deployment must add: [docs/security.md](docs/security.md).\n")
    text = RELIABILITY.read_text() if RELIABILITY.exists() else head
    for name, body in sections.items():
        r = runs.get(name, {})
        section = (f"<!-- section:{name} -->\n{r.get('stamp', '')} Command: "
                   f"`{r.get('command', '?')}`, {r.get('seconds', 0):.0f} s. Load average at the "
                   f"end: {r.get('load', float('nan')):.1f} on {os.cpu_count()} cores (the machine "
                   f"is shared with other work).\n{body.strip()}\n<!-- /section:{name} -->")
        pattern = re.compile(rf"<!-- section:{name} -->.*?<!-- /section:{name} -->", re.S)
        text = pattern.sub(lambda _: section, text) if pattern.search(text) else \
            text.rstrip() + "\n\n" + section + "\n"
    RELIABILITY.write_text(text)
