"""Scale: how the time and memory of every stage grow with the number of concepts.

    python bench/bench_scale.py [--sizes 10k,100k,1m,640kx768] [--ann HNSW32]   (make bench-scale)

Why this file is long: one row per size runs the whole path (ingest, windows, a Ray Train epoch,
exact evaluation, index builds, Serve start-up and latency over HTTP and a handle), with the
memory of every process sampled per stage; each stage is a short function.

Per size, a synthetic corpus of N sentences (JSONL, documents of 40-120 sentences whose words
are drawn from a per-document topic, so neighbours are not random) is ingested with the hashing
encoder through the Ray Data sharded pipeline; the bank that comes out feeds every later stage.
Memory is the PSS of the driver's whole process tree (Ray's raylet, object store, workers,
replicas: PSS shares a page among the processes that map it, so the sum is the node's real use),
peak per stage. Before each size the free memory is checked and a size that would not fit is
skipped with a message. Writes the "scale" section of BENCHMARKS.md and docs/img/scale.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, markdown_table, write_section  # noqa: E402
from harness.memory import Sampler, mem_available  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
GB = 1024**3
MB = 1024**2
PLOT = ROOT / "docs" / "img" / "scale.png"
TRAIN_WINDOWS = 4096  # windows per training epoch, whatever N
EVAL_WINDOWS = 1000  # test windows evaluated exactly
QUERIES = 400  # predict requests per path and index (P95 of 400: the 20th largest)


def parse_size(s: str) -> tuple[int, int]:
    n, _, d = s.lower().partition("x")
    mult = {"k": 10**3, "m": 10**6}.get(n[-1], 1)
    return int(float(n.rstrip("km")) * mult), int(d or 384)


def make_corpus(path: Path, n: int, seed: int = 0) -> int:
    """n sentences in documents of 40-120; each document draws its words from its topic."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(4000)])
    topics = rng.integers(0, len(vocab), size=(64, 120))  # 64 topics of 120 words
    docs, left = 0, n
    with path.open("w") as f:
        while left > 0:
            m = min(left, int(rng.integers(40, 121)))
            words = topics[rng.integers(64)]
            lens = rng.integers(6, 13, size=m)
            picks = vocab[words[rng.integers(0, 120, size=int(lens.sum()))]]
            cuts = np.cumsum(lens)[:-1]
            text = " ".join(" ".join(p).capitalize() + "." for p in np.split(picks, cuts))
            f.write(json.dumps({"id": f"doc{docs:07d}", "text": text}) + "\n")
            docs += 1
            left -= m
    return docs


SERVING = ("serve replica", "serve proxy", "serve controller", "raylet", "gcs")


def mem_row(s: Sampler) -> dict:
    roles = {r: [n, p / GB] for r, (n, p) in s.roles_at_peak.items()}
    return {"s": s.seconds, "pss_gb": s.peak_pss / GB, "rss_gb": s.peak_rss / GB,
            "median_pss_gb": float(np.median(s.totals)) / GB,
            # What a serving node runs (the bench's own driver and idle workers left out).
            "serving_pss_gb": sum(p for r, (_, p) in roles.items() if r in SERVING),
            "roles": roles, "roles_median": {r: p / GB for r, p in s.roles_median.items()}}


def stage_ingest(work: Path, n: int, d: int) -> tuple[dict, Path]:
    from lvm_ray.config import load_config
    from lvm_ray.distributed.data import ingest_with_ray

    corpus = work / "corpus.jsonl"
    n_docs = make_corpus(corpus, n)
    cfg = load_config(overrides={
        "corpus": {"source": "jsonl", "path": str(corpus),
                   "docs_per_shard": max(16, n_docs // 16)},
        "encoder": {"name": f"hashing-{d}", "batch_size": 1024}})
    bank_path = work / "bank"
    with Sampler() as s:
        res = ingest_with_ray(cfg, bank_path, num_encoders=2)
    assert res.n_concepts == n, (res.n_concepts, n)
    return {**mem_row(s), "docs": n_docs}, bank_path


def stage_windows(bank_path: Path, cfg):
    from lvm_ray.data.bank import load_bank
    from lvm_ray.workflows.prepare import prepare_windows

    with Sampler() as s:
        bank = load_bank(bank_path, lean=True)
        t = time.perf_counter()
        ws = prepare_windows(cfg, bank)
        windows_s = time.perf_counter() - t
    return {**mem_row(s), "windows_s": windows_s, "load_s": s.seconds - windows_s}, bank, ws


def stage_train(cfg, holder: list, ws, work: Path) -> tuple[dict, str, object]:
    """holder: [the bank], handed over so that no caller keeps the driver's own copy alive
    once share_bank has put it in the object store (as `lvm train` does not)."""
    from lvm_ray.distributed.trainer import share_bank, train_with_ray

    with Sampler() as s:
        ref, bank = share_bank(holder.pop(), cfg.train.vector_dtype)
        run = train_with_ray(cfg, bank, ws.train, ws.val, bank_ref=ref)
    h = run.history[-1]
    steps = h["train_windows"] // cfg.train.batch_size
    return ({**mem_row(s), "step_ms": 1000 * h["step_seconds_median"], "steps": steps,
             "epoch_s": h["train_seconds"]}, run.best_checkpoint, (ref, bank))


def stage_eval(cfg, bank, ws, checkpoint: str) -> tuple[dict, np.ndarray, np.ndarray]:
    from lvm_ray.eval.metrics import evaluate
    from lvm_ray.eval.predict import predict_windows
    from lvm_ray.train.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint).model
    test = ws.test.sample(EVAL_WINDOWS, 0)
    with Sampler() as s:
        pred = predict_windows(model, bank.vectors, test)
        m = evaluate(pred, test, bank, cfg.eval)
    val_pred = predict_windows(model, bank.vectors, ws.val.sample(EVAL_WINDOWS, 1))
    return ({**mem_row(s), "bank_hit@5": m["bank_hit@5"], "bank_size": m["bank_size"]},
            pred, val_pred)


def stage_index(bank_path: Path, ann: str, test_pred, val_pred) -> dict:
    from lvm_ray.config import IndexConfig
    from lvm_ray.data.index import Retrieval, build_index_files, recall_at_k

    out = {}
    for factory in ("Flat", ann):
        with Sampler() as s:
            build_index_files(bank_path, IndexConfig(factory=factory, train_size=50_000))
        out[f"build_{factory}"] = mem_row(s)
    flat, approx = Retrieval.open(bank_path, "Flat"), Retrieval.open(bank_path, ann)
    param = "ef_search" if "HNSW" in ann else "nprobe"
    exact_val = flat.search(val_pred, 10)[1]
    chosen = None
    for v in (16, 32, 64, 128, 256, 512):  # the smallest value reaching 0.95 on VAL
        approx.set_search_params(**{param: v})
        if recall_at_k(approx.search(val_pred, 10)[1], exact_val) >= 0.95:
            chosen = v
            break
    chosen = chosen or 512
    approx.set_search_params(**{param: chosen})
    out["recall@10"] = recall_at_k(approx.search(test_pred, 10)[1], flat.search(test_pred, 10)[1])
    out["param"], out["param_value"] = param, chosen
    for name, r in (("Flat", flat), (ann, approx)):
        t = []
        for q in test_pred[:QUERIES]:
            t0 = time.perf_counter()
            r.search(q[None], 10)
            t.append(1000 * (time.perf_counter() - t0))
        out[f"search_p95_ms_{name}"] = float(np.percentile(t, 95))
    return out


def stage_serve(bank_path: Path, checkpoint: str, index: str, user: dict, contexts) -> dict:
    """The shipped topology (serve_configs/hybrid.yaml): each model its own application, the
    router in front. Batch-1 predicts through a handle to the model, over HTTP through the router
    (proxy -> router -> model), over HTTP straight to the model's application (proxy -> model)
    and over HTTP to a model replica's own port (direct ingress, no proxy), each in turn."""
    import httpx
    from ray import serve

    from harness.net import free_port
    from lvm_ray.serve.app import make_app, make_model_app, model_app_name
    from lvm_ray.serve.deploy import direct_ingress_targets
    from lvm_ray.serve.sessions import new_key

    key, prefix = new_key(), "scale-"
    models = {"num_replicas": 2, "autoscaling_config": None, "user_config": user,
              "ray_actor_options": {"num_cpus": 0.4}}
    model_apps = {model_app_name(prefix, m): make_model_app(
        {"model": m, "checkpoint": checkpoint, "bank": str(bank_path), "index": index,
         "session_key": key}, dict(models)) for m in ("phase2", "phase3")}
    router = make_app({"phase2_checkpoint": checkpoint, "phase3_checkpoint": checkpoint,
                       "bank": str(bank_path), "index": index, "model_apps": prefix,
                       "session_key": key},
                      {"Router": {"ray_actor_options": {"num_cpus": 0.1}},
                       "TextEncoder": {"ray_actor_options": {"num_cpus": 0.05}}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    phase2 = model_app_name(prefix, "phase2")
    with Sampler() as s:
        t0 = time.perf_counter()
        for name, app in model_apps.items():
            serve.run(app, name=name, route_prefix=f"/{name}")
        serve.run(router, name="scale", route_prefix="/")
        startup = time.perf_counter() - t0
    # The sampler stops before the timed requests: each sample walks the page tables of every
    # replica's mapped files (tens of ms of kernel time at 1M), which would land in the tail.
    # Memory is sampled again after them (a request only adds the pages it touched).
    model = serve.get_deployment_handle("Phase2Model", phase2)
    replicas = direct_ingress_targets().get(phase2, [])  # the model's replicas' own ports
    lat = {k: [] for k in (*PATHS, "replica")}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        for i, ids in enumerate(contexts[: QUERIES + 20]):
            t = time.perf_counter()
            r = model.predict.remote(None, ids, 10, False).result()
            assert "error" not in r, r
            if i >= 20:
                lat["handle"].append(1000 * (time.perf_counter() - t))
                lat["replica"].append(r["model_ms"])  # forward + search + rows, in the replica
            urls = [("http", "/v1/predict"), ("direct", f"/{phase2}/v1/predict")]
            if replicas:  # round robin, as a load balancer in front of them would
                urls.append(("ingress", f"{replicas[i % len(replicas)]}/{phase2}/v1/predict"))
            for how, url in urls:
                t = time.perf_counter()
                resp = client.post(url, json={"concept_ids": ids, "k": 10})
                if i >= 20:
                    lat[how].append(1000 * (time.perf_counter() - t))
                assert resp.status_code == 200, resp.text
    t = time.perf_counter()
    s.sample()
    sample_ms = 1000 * (time.perf_counter() - t)
    serve.shutdown()
    return {**mem_row(s), "startup_s": startup, "mem_sample_ms": sample_ms,
            **{f"{k}_p{q}_ms": float(np.percentile(v, q)) for k, v in lat.items() if v
               for q in (50, 95)}}


def run_size(label: str, n: int, d: int, ann: str, skip_serve: bool,
             only_train: bool = False) -> dict:

    vec_gb = n * d * 4 / GB
    # Peak: the object store's copy plus a transient second one while it is put, or an index
    # being built beside the mapped flat one; plus Ray, 4 replicas and the driver (~3 GB).
    need = 4 * vec_gb + 3.0
    avail = mem_available() / GB
    if avail < need:
        print(f"[scale] {label}: SKIPPED, needs about {need:.1f} GB free, "
              f"{avail:.1f} GB available now", flush=True)
        return {"label": label, "n": n, "d": d, "skipped": f"needs ~{need:.1f} GB, "
                f"{avail:.1f} GB free"}
    work = Path(tempfile.mkdtemp(prefix=f"lvm_scale_{label}_"))
    row = {"label": label, "n": n, "d": d, "vec_gb": vec_gb, "mem_available_gb": avail,
           "load": os.getloadavg()[0]}
    try:
        _run_stages(row, work, label, n, d, ann, skip_serve, only_train)
    except Exception as e:  # noqa: BLE001  a failed size is reported, the next one still runs
        import traceback

        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    row["load_end"] = os.getloadavg()[0]
    print(f"[scale] {label}: {json.dumps(row)}", flush=True)
    return row


def _run_stages(row: dict, work: Path, label: str, n: int, d: int, ann: str,
                skip_serve: bool, only_train: bool) -> None:
    from lvm_ray.config import load_config

    print(f"[scale] {label}: ingest", flush=True)
    row["ingest"], bank_path = stage_ingest(work, n, d)
    cfg = load_config(overrides={
        "window": {"context": 100, "min_context": 2},
        "model": {"hidden": 128, "layers": 1, "slots": 16, "d_in": d},
        "loss": {"negatives": "bank", "bank_negatives": 1024},
        "train": {"batch_size": 256, "micro_batch": 64, "max_epochs": 1,
                  "max_train_windows": TRAIN_WINDOWS, "max_eval_windows": 256},
        "eval": {"bootstrap": 100, "lanes": 0},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1.0},
        "run": {"storage_path": str(work / "runs"), "name": "scale"}})
    print(f"[scale] {label}: windows", flush=True)
    row["windows"], bank, ws = stage_windows(bank_path, cfg)
    holder = [bank]
    del bank
    print(f"[scale] {label}: train", flush=True)
    row["train"], ckpt, shared = stage_train(cfg, holder, ws, work)
    bank = shared[1]
    if only_train:
        return
    print(f"[scale] {label}: evaluate", flush=True)
    row["eval"], test_pred, val_pred = stage_eval(cfg, bank, ws, ckpt)
    rng = np.random.default_rng(0)
    starts = ws.test.rows[ws.test.start[rng.integers(0, len(ws.test), QUERIES + 20)]]
    contexts = [list(range(int(s), int(s) + 100)) for s in starts]
    contexts = [[min(i, n - 1) for i in c] for c in contexts]
    del bank, ws, shared
    gc.collect()
    print(f"[scale] {label}: index", flush=True)
    row["index"] = stage_index(bank_path, ann, test_pred, val_pred)
    if not skip_serve:
        # A serving node runs Serve alone: a fresh Ray, without the training stage's idle
        # workers and object store contents.
        import ray

        ray.shutdown()
        start_ray()
        for index, user in (("Flat", {}),
                            (ann, {row["index"]["param"]: row["index"]["param_value"]})):
            print(f"[scale] {label}: serve {index}", flush=True)
            row[f"serve_{index}"] = stage_serve(bank_path, ckpt, index, user, contexts)


def baseline(r: dict, done: list[dict]) -> dict:
    """The row a size's memory growth is measured from: the smallest size of the same vector
    width when one was run (a wider vector means wider activations and batches in every worker,
    a per-process cost that does not grow with N), else the smallest size."""
    same = [b for b in done if b["d"] == r["d"] and b["n"] < r["n"]]
    return min(same or done, key=lambda b: b["n"])


def verdicts(rows: list[dict], ann: str) -> list[str]:
    done = [r for r in rows if "skipped" not in r and "error" not in r]
    out = [] if len(done) >= 2 else ["memory: fewer than two sizes measured, no growth to judge"]
    checks = [("train", "median_pss_gb", "all processes, median over the stage"),
              ("train", "pss_gb", "all processes, peak (the bank is briefly in the driver and "
                                  "the object store at once while it is shared)"),
              ("serve_Flat", "serving_pss_gb", "replicas, proxy, controller, raylet"),
              (f"serve_{ann}", "serving_pss_gb", "replicas, proxy, controller, raylet")]
    for stage, key, what in checks:
        # Judged where the vectors dominate (>= 1 GB): below that, the ~0.1 GB swings of the
        # fixed per-process memory (Ray's idle workers, allocator pools) swamp the ratio.
        for r in done:
            base = baseline(r, done)
            if base is r or stage not in r or stage not in base or r["vec_gb"] < 1.0:
                continue
            if key not in r[stage] or key not in base[stage]:
                continue
            extra = (r[stage][key] - base[stage][key]) / max(r["vec_gb"] - base["vec_gb"], 1e-9)
            out.append(f"memory, {stage} at {r['label']} ({what}): PSS grew {extra:.2f}x the "
                       f"added vector bytes over {base['label']} (goal <= 1.5x): "
                       f"{'met' if extra <= 1.5 else 'NOT met'}")
    for d in sorted({r["d"] for r in done}):  # a wider vector is a bigger model: its own row
        steps = [r["train"]["step_ms"] for r in done if r["d"] == d]
        if len(steps) < 2:
            continue
        spread = max(steps) / min(steps)
        out.append(f"training ({d}-d): time per optimiser step (the steps alone, not the "
                   f"O(windows) read of the epoch's window ids) {min(steps):.0f}-{max(steps):.0f}"
                   f" ms across {len(steps)} sizes (max/min {spread:.2f}; goal: independent of N "
                   f"within noise, taken as <= 1.2): {'met' if spread <= 1.2 else 'NOT met'}")
    big = [r for r in done if r["n"] >= 10**6 and f"serve_{ann}" in r]
    for r in big:
        rec = r["index"]["recall@10"]
        i = r["index"]
        for how, (_, path) in PATHS.items():
            if f"{how}_p95_ms" not in r[f"serve_{ann}"]:  # a row measured before that path
                continue
            ratio = r[f"serve_{ann}"][f"{how}_p95_ms"] / r["serve_Flat"][f"{how}_p95_ms"]
            out.append(f"serving at {r['label']} ({path}): {ann} predict P95 = {ratio:.2f}x "
                       f"Flat's (goal <= 0.2), recall@10 {rec:.3f} (goal >= 0.95): "
                       f"{'met' if ratio <= 0.2 and rec >= 0.95 else 'NOT met'}")
        ratio = i[f"search_p95_ms_{ann}"] / i["search_p95_ms_Flat"]
        out.append(f"search alone at {r['label']}: {ann} P95 = {ratio:.3f}x Flat's: "
                   f"{'met' if ratio <= 0.2 and rec >= 0.95 else 'NOT met'} (the rest of a "
                   "predict, the model's forward pass and Serve's hops, is the same for both)")
    if not big:
        out.append("serving at 1M concepts: not measured (size skipped or --skip-serve)")
    return out


# Request paths timed by stage_serve: key -> (column label, what it is).
PATHS = {"handle": ("handle", "handle to the model"),
         "http": ("HTTP router", "HTTP through the router"),
         "direct": ("HTTP direct", "HTTP straight to the model's app, through the proxy"),
         "ingress": ("HTTP replica port", "HTTP to a model replica's own port, direct ingress")}


def plot(rows: list[dict], ann: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "skipped" not in r and "error" not in r and r["d"] == 384]
    if not done:
        return
    n = [r["n"] for r in done]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    series = [("ingest", lambda r: r["ingest"]["s"]), ("train step",
              lambda r: r["train"]["step_ms"] / 1000), ("exact eval", lambda r: r["eval"]["s"]),
              (f"{ann} build", lambda r: r["index"][f"build_{ann}"]["s"])]
    for name, f in series:
        a.plot(n, [f(r) for r in done], marker="o", label=name)
    for key in ("Flat", ann):
        if f"serve_{key}" in done[0]:
            a.plot(n, [r[f"serve_{key}"]["handle_p95_ms"] / 1000 for r in done], marker="s",
                   ls="--", label=f"predict P95, {key}")
    a.set(xscale="log", yscale="log", xlabel="concepts (384-d)", ylabel="seconds",
          title="time")
    a.legend(fontsize=7)
    for stage in ("ingest", "train", "eval", f"serve_{ann}"):
        if stage in done[0]:
            b.plot(n, [r[stage]["pss_gb"] for r in done], marker="o", label=stage)
    b.plot(n, [r["vec_gb"] for r in done], "k:", label="raw vectors")
    b.set(xscale="log", yscale="log", xlabel="concepts (384-d)", ylabel="GB (PSS, node)",
          title="peak memory")
    b.legend(fontsize=7)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=80)


def row_cells(r: dict, i: dict, sf: dict, sa: dict, lat, ann: str) -> list[str]:
    """One size's table row (KeyError when a stage did not run)."""
    return [
        f"{r['label']} ({r['vec_gb']:.2f} GB vectors)",
        f"{r['ingest']['s']:.0f} ({r['ingest']['pss_gb']:.1f})",
        f"{r['windows']['load_s']:.1f}+{r['windows']['windows_s']:.1f} "
        f"({r['windows']['pss_gb']:.1f})",
        f"{r['train']['step_ms']:.0f} ({r['train']['epoch_s']:.0f}, "
        f"{r['train']['median_pss_gb']:.1f} / {r['train']['pss_gb']:.1f})",
        f"{r['eval']['s']:.1f} ({r['eval']['pss_gb']:.1f})",
        f"{i[f'build_{ann}']['s']:.0f}", f"{i['recall@10']:.3f} ({i['param']}="
        f"{i['param_value']})", f"{sa.get('startup_s', 0):.0f}" if sa else "-",
        *(lat(sf, k) for k in PATHS), *(lat(sa, k) for k in PATHS),
        f"{sf.get('serving_pss_gb', 0):.2f} / {sa.get('serving_pss_gb', 0):.2f}" if sa else "-"]


def replica_line(rows: list[dict]) -> str:
    """Where a handle predict's time goes: the replica's own work (forward, search, texts, as
    the response's model_ms reports it) and the rest (Serve's queueing and hops)."""
    parts = [f"{r['label']} {k.removeprefix('serve_')}: replica P50 "
             f"{r[k]['replica_p50_ms']:.1f} / P95 {r[k]['replica_p95_ms']:.1f} ms of handle "
             f"P50 {r[k]['handle_p50_ms']:.1f} / P95 {r[k]['handle_p95_ms']:.1f} ms"
             for r in rows for k in r if k.startswith("serve_") and "replica_p50_ms" in r[k]]
    return ("Inside the replica (forward + search + rows) vs the whole handle call: "
            + "; ".join(parts) + ".\n\n") if parts else ""


def report(rows: list[dict], ann: str, command: str, section: str = "scale") -> None:
    """The section (the curve's own, "scale", also writes its plot and JSON; another name is a
    re-run of some sizes beside it)."""
    headers = ["size", "ingest s (GB)", "load+windows s (GB)",
               "train ms/step (epoch s, GB median / peak)",
               "exact eval s (GB)", f"{ann} build s", "recall@10", "serve start s",
               *(f"{'P50/P95 ms ' if k == 'handle' else ''}{label} Flat"
                 for k, (label, _) in PATHS.items()),
               *(f"{label} {ann}" for label, _ in PATHS.values()),
               f"serving GB Flat / {ann}"]
    table = []
    for r in rows:
        if "skipped" in r:
            table.append([f"{r['label']} ({r['d']}-d)", f"skipped: {r['skipped']}"]
                         + [""] * (len(headers) - 2))
            continue
        i, sf, sa = r.get("index", {}), r.get("serve_Flat", {}), r.get(f"serve_{ann}", {})

        def lat(s: dict, k: str) -> str:
            return f"{s[k + '_p50_ms']:.1f} / {s[k + '_p95_ms']:.1f}" if k + "_p50_ms" in s \
                else "-"

        try:
            table.append(row_cells(r, i, sf, sa, lat, ann))
        except KeyError:  # a size that failed part-way: what it measured, then the error
            table.append([f"{r['label']}", f"failed: {r.get('error')}"]
                         + [""] * (len(headers) - 2))
    roles = []
    for r in rows:
        for stage in ("train", f"serve_{ann}"):
            if stage in r:
                parts = ", ".join(f"{k} x{n}: {p:.2f}" for k, (n, p) in
                                  sorted(r[stage]["roles"].items(), key=lambda x: -x[1][1]))
                roles.append(f"- {r['label']} {stage}: {parts}")
    loads = ", ".join(f"{r['label']} {r['load']:.1f}->{r['load_end']:.1f} "
                      f"({r['mem_available_gb']:.1f} GB free)" for r in rows if "load" in r)
    body = f"""Every stage at several bank sizes (synthetic corpora ingested with the hashing
encoder; one Ray Train epoch of {TRAIN_WINDOWS} windows on 2 workers; exact evaluation of
{EVAL_WINDOWS} test windows; serving as serve_configs/hybrid.yaml deploys it (each model its
own application, 2 replicas each, the router in front), batch-1 predicts with a 100-concept
context, {QUERIES} requests per path: {", ".join(what for _, what in PATHS.values())}; Serve in
a fresh Ray, with direct ingress on). Memory: peak PSS (GB) of all processes of the
run, the node's real use (shared pages counted once); "serving GB" counts only what a serving
node runs (replicas, proxy, controller, raylet, gcs), not the bench's driver. Load average
(1 min) at the start -> end of each size, and free memory: {loads}.

{markdown_table(headers, table)}

Goals:
{chr(10).join('- ' + v for v in verdicts(rows, ann))}

Memory by process role at the peak (count, PSS GB):
{chr(10).join(roles)}

{replica_line(rows)}Search alone (in process, batch 1): {"; ".join(
    f"{r['label']} Flat P95 {r['index']['search_p95_ms_Flat']:.1f} ms, {ann} "
    f"{r['index'][f'search_p95_ms_{ann}']:.2f} ms" for r in rows if 'index' in r)}.

![time and memory against N](docs/img/scale.png)
"""
    if section != "scale":
        write_section(section, f"Scale: a re-run ({', '.join(r['label'] for r in rows)})",
                      body.replace("![time and memory against N](docs/img/scale.png)", ""),
                      command)
        return
    write_section("scale", "Scale: time and memory against the number of concepts", body,
                  command)
    (ROOT / "bench" / "scale_results.json").write_text(
        json.dumps({"rows": rows, "ann": ann, "command": command}, indent=1))


def fp16_check(bank_path: str | None) -> None:
    """train.vector_dtype float16 vs float32: the same run (demo preset, plain loop, same seed)
    on the sotu demo bank, each evaluated on test against the float32 bank with the baselines."""
    from lvm_ray.config import load_config
    from lvm_ray.workflows.prepare import ensure_bank
    from lvm_ray.workflows.train import train_and_evaluate

    work = Path(tempfile.mkdtemp(prefix="lvm_fp16_"))
    over = {"run": {"storage_path": str(work)},
            "bank_path": bank_path or str(work / "sotu_demo_bank.parquet")}
    if bank_path:
        over["corpus"] = {"source": "bank", "path": bank_path}
    base = load_config(presets=["demo"], overrides=over)
    bank = ensure_bank(base)
    rows, results = [], {}
    for dtype in ("float32", "float16"):
        cfg = load_config(presets=["demo"], overrides={**over, "train": {"vector_dtype": dtype},
                                                        "run": {"storage_path": str(work),
                                                                "name": dtype}})
        t = time.perf_counter()
        res = train_and_evaluate(cfg, use_ray=False, bank=bank)["results"]
        model = next(k for k in res if k.startswith(dtype))
        results[dtype] = res[model]
        best_base = max((k for k in res if k != model), key=lambda k: res[k]["bank_hit@5"])
        rows.append([dtype, f"{100 * res[model]['bank_hit@5']:.2f} "
                     f"[{100 * res[model]['bank_hit@5_lo']:.1f}, "
                     f"{100 * res[model]['bank_hit@5_hi']:.1f}]",
                     f"{100 * res[model]['ca']:.2f}", f"{best_base}: "
                     f"{100 * res[best_base]['bank_hit@5']:.2f}", f"{time.perf_counter() - t:.0f}"])
    diff = 100 * (results["float16"]["bank_hit@5"] - results["float32"]["bank_hit@5"])
    m = results["float32"]
    body = f"""`train.vector_dtype`: the demo preset (60 sotu speeches, MiniLM, plain loop, seed 0)
trained once on float32 and once on float16 vectors, each best checkpoint evaluated on the test
split against the float32 bank ({m['n_windows']} windows, bank {m['bank_size']}, 95% bootstrap CIs),
beside the best baseline on the same windows.

{markdown_table(["vectors", "test bank-Hit@5 % [CI]", "CA %", "best baseline bank-Hit@5 %",
                 "train+eval s"], rows)}

Difference float16 - float32: {diff:+.2f} points of bank-Hit@5 (goal: within 0.2 point):
{'met' if abs(diff) <= 0.2 else 'NOT met'}.
"""
    write_section("scale_fp16", "Scale: float16 training vectors", body,
                  "python bench/bench_scale.py --fp16-check")
    shutil.rmtree(work, ignore_errors=True)


def report_train(rows: list[dict], command: str) -> None:
    """The training stage alone (section scale_train), with the memory goal at each size."""
    done = [r for r in rows if "train" in r]
    table = [[r["label"], f"{r['vec_gb']:.2f}", f"{r['train']['step_ms']:.0f}",
              f"{r['train']['median_pss_gb']:.2f}", f"{r['train']['pss_gb']:.2f}",
              ", ".join(f"{k} x{n}: {p:.2f}" for k, (n, p) in
                        sorted(r["train"]["roles"].items(), key=lambda x: -x[1][1])),
              f"{r['load']:.1f}->{r['load_end']:.1f}"] for r in done]
    lines = []
    if len(done) >= 2:
        for r in done:
            base = baseline(r, done)
            if base is r or r["vec_gb"] < 1.0:  # judged where the vectors dominate (verdicts)
                continue
            for key in ("median_pss_gb", "pss_gb"):
                extra = (r["train"][key] - base["train"][key]) / (r["vec_gb"] - base["vec_gb"])
                lines.append(f"- {r['label']}, {key.split('_')[0]}: all processes grew "
                             f"{extra:.2f}x the added vector bytes over {base['label']} (goal "
                             f"<= 1.5x): {'met' if extra <= 1.5 else 'NOT met'}")
    body = f"""One Ray Train epoch ({TRAIN_WINDOWS} windows, 2 workers) per size, each size in a
fresh Ray (the object store keeps a freed object's pages resident, so a size run after a bigger
one would carry the other's bank), the driver holding no copy of its own once the bank is shared
(the way `lvm train` runs). PSS of all processes (GB), median and peak over the stage; the peak
includes the seconds while the bank is in the driver and the object store at once. Growth is
measured from the smallest size of the same vector width: 768-d batches and activations cost every
worker ~0.3 GB more whatever N is (10k vs 10kx768), a per-process cost, not a copy of the bank.

{markdown_table(["size", "vectors GB", "ms/step", "median GB", "peak GB", "peak by role",
                 "load"], table)}

{chr(10).join(lines)}
"""
    write_section("scale_train", "Scale: training memory", body, command)


def start_ray() -> None:
    """The local Ray of one size (and of its serving stage): 2 CPUs, the dashboard on (Ray
    Train polls its state API; `lvm serve` runs with it too)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False, object_store_memory=int(min(8 * GB, mem_available() * 0.4)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10k,100k,1m,10kx768,640kx768")
    ap.add_argument("--ann", default="HNSW32", help="FAISS index_factory string of the ANN index")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--section", default="scale",
                    help="BENCHMARKS.md section to write; not 'scale': a re-run of some sizes "
                         "beside the curve (no plot)")
    ap.add_argument("--only-train", action="store_true",
                    help="ingest, windows and training only; writes the scale_train section")
    ap.add_argument("--fp16-check", action="store_true",
                    help="only compare float16 and float32 training vectors (test bank-Hit@5)")
    ap.add_argument("--bank", help="--fp16-check: an existing sotu demo bank to use")
    ap.add_argument("--rerender", metavar="WHEN",
                    help="rewrite the section from bench/scale_results.json (say when measured)")
    ap.add_argument("--replot", action="store_true",
                    help="redraw docs/img/scale.png from bench/scale_results.json")
    args = ap.parse_args()
    if args.fp16_check:
        fp16_check(args.bank)
        return
    if args.rerender:
        data = json.loads((ROOT / "bench" / "scale_results.json").read_text())
        report(data["rows"], data["ann"], data["command"] + f"  (measured {args.rerender}; "
               "section re-rendered from bench/scale_results.json)")
        return
    if args.replot:
        data = json.loads((ROOT / "bench" / "scale_results.json").read_text())
        if isinstance(data, list):  # written by an earlier version: the rows alone
            data = {"rows": data, "ann": args.ann}
        plot(data["rows"], data["ann"])
        return

    import ray

    from lvm_ray.serve.deploy import use_fast_serve_settings

    # Serve as `lvm serve --direct-ingress` runs it (read by the processes Ray starts); no load
    # balancer here to deregister a stopping replica, so its drain needs no 30 s hold.
    use_fast_serve_settings(direct_ingress=True)
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    rows = []
    for s in args.sizes.split(","):
        n, d = parse_size(s)
        # A fresh Ray per size: the object store keeps the pages of a freed object resident
        # (its allocator reuses them, it does not return them), so a size run after a bigger
        # one would carry the other's bank in its memory figures.
        start_ray()
        try:
            rows.append(run_size(s, n, d, args.ann, args.skip_serve, args.only_train))
        finally:
            ray.shutdown()
    command = "python bench/bench_scale.py " + " ".join(sys.argv[1:])
    if args.only_train:
        report_train(rows, command)
        return
    if args.section != "scale":
        report(rows, args.ann, command, args.section)
        return
    plot(rows, args.ann)
    report(rows, args.ann, "make bench-scale  # " + command)


if __name__ == "__main__":
    main()
