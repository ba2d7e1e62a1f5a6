"""Training throughput: the plain PyTorch loop vs Ray Train with 1 and 2 workers, same model
and data, in one run; plus bytes on disk of bank + windows vs the bank alone.

    python bench/bench_train.py [--bank data/sotu_demo_bank.parquet] [--epochs 3]

Throughput is measured over the training part of each epoch (evaluation excluded), epoch 0
dropped as warm-up. Writes the "train" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import markdown_table, write_section  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def steady(history: list[dict]) -> tuple[float, float]:
    rows = history[1:] or history
    wps = float(np.mean([r["windows_per_s"] for r in rows]))
    return wps, float(np.std([r["windows_per_s"] for r in rows]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", default="data/sotu_demo_bank.parquet")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--windows", type=int, default=1024, help="training windows per epoch")
    ap.add_argument("--context", type=int, default=100)
    args = ap.parse_args()

    import ray
    import torch

    from lvm_ray.config import load_config
    from lvm_ray.data.bank import load_bank
    from lvm_ray.data.synthetic import make_synthetic_bank
    from lvm_ray.distributed.trainer import train_with_ray
    from lvm_ray.train.loop import fit_local
    from lvm_ray.workflows.prepare import prepare_windows

    tmp = Path(tempfile.mkdtemp(prefix="lvm_bench_"))
    if Path(args.bank).exists():
        bank, bank_name, bank_bytes = load_bank(args.bank), args.bank, Path(args.bank).stat().st_size
    else:  # no demo bank yet: a synthetic 384-d one of similar size
        bank = make_synthetic_bank(n_docs=120, doc_len=(80, 160), dim=384, seed=0)
        from lvm_ray.data.bank import save_bank

        save_bank(bank, tmp / "bank.parquet")
        bank_name, bank_bytes = "synthetic (384-d)", (tmp / "bank.parquet").stat().st_size
    overrides = {
        "model": {"d_in": bank.dim},
        "window": {"context": args.context},
        "train": {"max_epochs": args.epochs, "patience": 100, "max_train_windows": args.windows,
                  "max_eval_windows": 100},
        "eval": {"bootstrap": 0},
        "run": {"storage_path": str(tmp)},
    }
    base = load_config(presets=["demo"], overrides=overrides)
    ws = prepare_windows(base, bank)
    mean_ctx = float(np.mean(ws.train.lengths))

    rows = []
    torch.set_num_threads(2)
    plain = fit_local(base, bank, ws.train, ws.val, tmp / "plain")
    p_wps, p_sd = steady(plain["history"])
    rows.append(["plain PyTorch loop (2 threads)", p_wps, p_sd, p_wps * mean_ctx, 1.0])

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    for workers, cpus in ((1, 2.0), (2, 1.0)):
        from lvm_ray.config import merge

        cfg = merge(base, {"scaling": {"num_workers": workers, "cpus_per_worker": cpus},
                           "run": {"name": f"ray{workers}"}})
        run = train_with_ray(cfg, bank, ws.train, ws.val)
        wps, sd = steady(run.history)
        rows.append([f"Ray Train, {workers} worker(s) x {cpus:g} CPU", wps, sd, wps * mean_ctx,
                     wps / p_wps])
    ray.shutdown()

    table = markdown_table(["runner", "windows/s", "sd", "vectors/s", "ratio to plain"], rows)
    ratio1 = rows[1][4]
    goal = (f"Goal: Ray Train with 1 worker within 10% of the plain loop: "
            f"{'met' if ratio1 >= 0.9 else 'NOT met'} (ratio {ratio1:.2f}).")

    # Windows are index ranges: what goes to Ray Data is one int64 id per window (plus its
    # target id for readability), never the vectors.
    win_table = pa.table({"window": np.arange(len(ws.train), dtype=np.int64),
                          "target_concept": ws.train.target_rows})
    win_bytes = win_table.nbytes
    copies = int(ws.train.lengths.sum() + len(ws.train)) * bank.dim * 4
    disk = markdown_table(
        ["what", "bytes", "relative to bank"],
        [["concept bank (Parquet)", bank_bytes, 1.0],
         ["training windows as ids (Ray Data, in memory; nothing on disk)", win_bytes,
          win_bytes / bank_bytes],
         ["the same windows materialised as float32 copies (what the design stored)", copies,
          copies / bank_bytes]])
    body = (f"Data: {bank_name}, {len(bank)} concepts, {bank.dim}-d; `document` windows, "
            f"L={args.context}, mean context {mean_ctx:.1f}; {args.windows} windows per epoch, "
            f"{args.epochs} epochs (first dropped). Model: demo preset "
            f"(hidden {base.model.hidden}, {base.model.layers} layer, {base.model.slots} slots), "
            f"micro-batch {base.train.micro_batch}, batch {base.train.batch_size}.\n\n"
            f"{table}\n\n{goal}\n\n### Bytes: bank + windows vs bank alone\n\n{disk}\n\n"
            f"Windows add {100 * win_bytes / bank_bytes:.2f}% to the bank (goal < 5%).")
    write_section("train", "Training throughput (plain vs Ray Train)", body,
                  "python bench/bench_train.py")


if __name__ == "__main__":
    main()
