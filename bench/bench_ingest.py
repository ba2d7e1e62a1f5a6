"""Ingest: the plain encoding loop vs the Ray Data pipeline on one machine, MiniLM, same docs.

    python bench/bench_ingest.py [--docs 40]

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=40)
    args = ap.parse_args()

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
    body = (f"{args.docs} sotu speeches, {n} chunks, all-MiniLM-L6-v2 on CPU, empty cache, "
            f"Ray Data writes a sharded bank ({max(1, args.docs // (2 * actors))} documents per "
            f"shard, each shard one encode call, sorted by length inside it); {actors} encoder "
            "actors with "
            f"{max(1, cpus // actors)} torch thread(s) each vs the plain loop's {cpus} threads."
            "\n\n"
            + markdown_table(["path", "seconds", "chunks/s"], rows)
            + f"\n\nRay Data minus plain: {overhead:+.1f} s; Ray start-up (ray.init + one "
              f"pipeline's actor start) {startup:.1f} s. Goal (Ray Data not slower than the plain "
              f"loop by more than Ray's start-up): {goal}.")
    write_section("ingest", "Ingest: plain loop vs Ray Data", body, "python bench/bench_ingest.py")


if __name__ == "__main__":
    main()
