"""Quantized CPU inference: speed of int8 / bf16 against fp32, and what it costs on test metrics.

    python bench/bench_quant.py --checkpoint runs/ablations/base/checkpoints/epoch_003
    python bench/bench_quant.py --smoke-test        # synthetic, seconds, writes nothing

Timings (batch 1, median over interleaved rounds so that load from other processes hits every
precision alike):
- incremental step: one new vector after a 100-vector history (what a Serve session pays);
- full forward: one 1000-vector context from scratch (the Phase-3 request).
Quality: the checkpoint's test windows (its own training config), every protocol metric at each
precision, and the change from fp32 in points. Goal: <= 1 point of bank-Hit@5 lost, >= 1.5x faster.
Writes the "quant" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import markdown_table, write_section  # noqa: E402

# The headline model of docs/results.md (the plain loop keeps only the best epoch), then the demo's.
DEFAULT_CHECKPOINTS = ("runs/ablations/base/checkpoints/epoch_*", "runs/demo/phase3/best")


def time_block(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def timings(models: dict, history: np.ndarray, long_ctx: np.ndarray, rounds: int,
            steps: int, batch: int = 32) -> dict[str, dict[str, float]]:
    """Median seconds per incremental step (batch 1, and `batch` sessions at once, as Serve
    batches appends) and per full forward, for each precision."""
    import torch

    x_hist = torch.from_numpy(history)[None]  # (1, 100, D)
    x_new = torch.from_numpy(long_ctx[:1])  # (1, D)
    x_long = torch.from_numpy(long_ctx)[None]  # (1, 1000, D)
    xb_hist = x_hist.expand(batch, -1, -1).contiguous()  # (batch, 100, D)
    xb_new = torch.from_numpy(long_ctx[:batch])  # (batch, D)
    kinds = ("step", f"step_b{batch}", "full")
    out: dict[str, dict[str, list[float]]] = {p: {k: [] for k in kinds} for p in models}
    with torch.no_grad():
        states = {p: m(x_hist)[1] for p, m in models.items()}
        bstates = {p: m(xb_hist)[1] for p, m in models.items()}
        for p, m in models.items():  # warm-up
            m(x_long)
            m.step(x_new, states[p])
        for _ in range(rounds):
            for p, m in models.items():
                st, bst = states[p], bstates[p]
                out[p]["step"].append(time_block(lambda: m.step(x_new, st), steps))
                out[p][f"step_b{batch}"].append(time_block(lambda: m.step(xb_new, bst), steps))
                out[p]["full"].append(time_block(lambda: m(x_long), 1))
    return {p: {k: float(np.median(v)) for k, v in d.items()} for p, d in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", help="checkpoint dir (default: the first of "
                                         f"{', '.join(DEFAULT_CHECKPOINTS)} that exists)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = a Serve replica)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=100, help="incremental steps per timing block")
    ap.add_argument("--smoke-test", action="store_true")
    args = ap.parse_args()

    import torch

    from lvm_ray.config import Config, from_dict, load_config, merge
    from lvm_ray.eval.metrics import evaluate, l2n
    from lvm_ray.quantize import PRECISIONS, quantize_model
    from lvm_ray.train.checkpoint import load_checkpoint
    from lvm_ray.train.step import predict_windows
    from lvm_ray.workflows import ensure_bank, prepare_windows

    torch.set_num_threads(args.threads)
    if args.smoke_test:
        import tempfile

        from lvm_ray.model import build_model

        cfg = load_config(presets=["smoke"], overrides={
            "bank_path": str(Path(tempfile.mkdtemp(prefix="lvm_quant_")) / "bank.parquet")})
        model, ckpt_name = build_model(cfg.model).eval(), "untrained smoke model"
        args.rounds, args.steps = 2, 5
    else:
        found = (sorted(Path().glob(p)) for p in DEFAULT_CHECKPOINTS)
        path = args.checkpoint or next((str(f[-1]) for f in found if f), None)
        if path is None:
            print("no checkpoint: pass --checkpoint (train one with `lvm train --local`)")
            return 2
        ck = load_checkpoint(path)
        cfg = merge(from_dict(Config, ck.meta["config"]), {"eval": {"lanes": 0}})
        model, ckpt_name = ck.model, path
    bank = ensure_bank(cfg)
    ws = prepare_windows(cfg, bank)
    models = {p: quantize_model(model, p) for p in PRECISIONS}

    rows_test = ws.test.rows
    long_ctx = bank.vectors[np.resize(rows_test, 1000)]  # (1000, D) real test vectors
    t = timings(models, bank.vectors[rows_test[:100]], long_ctx, args.rounds, args.steps)

    results, preds = {}, {}
    for p, m in models.items():
        preds[p] = predict_windows(m, bank.vectors, ws.test)
        results[p] = evaluate(preds[p], ws.test, bank, cfg.eval)
    ref = results["fp32"]
    rows = []
    for p in PRECISIONS:
        s = results[p]
        agree = float(np.mean(np.sum(l2n(preds[p]) * l2n(preds["fp32"]), axis=1)))
        rows.append([
            p, f"{1e3 * t[p]['step']:.3f}", f"{t['fp32']['step'] / t[p]['step']:.2f}x",
            f"{1e3 * t[p]['step_b32']:.3f}", f"{t['fp32']['step_b32'] / t[p]['step_b32']:.2f}x",
            f"{1e3 * t[p]['full']:.1f}", f"{t['fp32']['full'] / t[p]['full']:.2f}x",
            f"{100 * s['bank_hit@5']:.2f} [{100 * s['bank_hit@5_lo']:.1f}, "
            f"{100 * s['bank_hit@5_hi']:.1f}]",
            f"{100 * (s['bank_hit@5'] - ref['bank_hit@5']):+.2f}",
            f"{100 * s['ca']:.2f}", f"{100 * (s['ca'] - ref['ca']):+.2f}",
            f"{agree:.5f}"])
    table = markdown_table(
        ["precision", "step ms", "step speed-up", "32-session step ms", "speed-up",
         "full-1000 ms", "full speed-up",
         "test bank-Hit@5 % [95% CI]", "Δ pts", "CA %", "Δ CA pts", "cos(pred, fp32 pred)"],
        rows)
    int8 = results["int8"]
    verdict = []
    for p in ("int8", "bf16"):
        lost = 100 * (ref["bank_hit@5"] - results[p]["bank_hit@5"])
        speed = min(t["fp32"]["step"] / t[p]["step"], t["fp32"]["full"] / t[p]["full"])
        ok = lost <= 1.0 and speed >= 1.5
        verdict.append(f"- {p}: {lost:+.2f} points of bank-Hit@5 lost; speed-up at batch 1: "
                       f"step {t['fp32']['step'] / t[p]['step']:.2f}x, full-1000 forward "
                       f"{t['fp32']['full'] / t[p]['full']:.2f}x; goal (<= 1 point lost, >= 1.5x "
                       f"on both) {'met' if ok else 'NOT met'}")
    body = (f"Checkpoint `{ckpt_name}` ({cfg.model.kind}, hidden {cfg.model.hidden}, "
            f"{cfg.model.layers} layer(s), {cfg.model.slots} slots); test split of "
            f"`{cfg.bank_path}`: {int8['n_windows']:,} windows, bank {int8['bank_size']:,} "
            f"concepts. Batch 1 (and 32 sessions per step), {args.threads} torch thread(s), "
            f"median of {args.rounds} "
            "interleaved rounds (the machine is shared: read ratios, not absolute times). "
            "int8 = torch dynamic quantization of Linear and GRU weights; bf16 = all weights "
            "and activations in bfloat16.\n\n" + table + "\n\n" + "\n".join(verdict))
    if args.smoke_test:
        print(body)
        return 0
    cmd = "python bench/bench_quant.py" + (f" --checkpoint {args.checkpoint}"
                                           if args.checkpoint else "")
    write_section("quant", "Quantized CPU inference (int8 / bf16)", body, cmd)
    out = Path("runs/bench")
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant.json").write_text(json.dumps({"checkpoint": ckpt_name, "timings_s": t,
                                                "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
