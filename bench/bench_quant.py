"""Quantized CPU inference: speed of int8 / bf16 against fp32 per model size, and what it costs
on test metrics. Goal (issue 8): <= 1 point of bank-Hit@5 lost, >= 1.5x faster on both the
incremental step and the full 1000-vector forward.

    python bench/bench_quant.py                    # every size below whose checkpoint exists
    python bench/bench_quant.py --checkpoint runs/x/best [--checkpoint ...]
    python bench/bench_quant.py --smoke-test       # synthetic, seconds, writes nothing

Sizes: trained checkpoints (SIZES; two are trained for this bench, see TRAIN), each measured
on its own test windows, and the paper-size core (hidden 512, 4 layers, 2048 slots, d_in 384)
untrained, for speed only.
Timings: batch 1 unless said, CPU time of this process (`time.process_time`), median over
interleaved rounds: on a shared machine wall time mostly measures the other processes (wall
medians are in runs/bench/quant.json).
- incremental step: one new vector after a 100-vector history (what a Serve session pays), alone
  and for 32 sessions at once (as Serve batches appends);
- full forward: one 1000-vector context from scratch (the Phase-3 request).
Where the time goes: the GRU module's share of the full forward, and the step traced and frozen
with TorchScript (the same ops without Python and nn.Module overhead; measurement only, as the
trace bakes in the input checks), fp32 and int8, which says what int8 can gain once that
overhead is gone.
The served append step (issue 15): the same step through lvm_ray.model.fused_step (a hand-fused
GRU step traced and frozen, fp32 and int8), which Serve uses by default, timed beside the eager
step, and its test metrics when every step of every window runs through it.
Writes the "quant" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import markdown_table, write_section  # noqa: E402
from lvm_ray.model.fused_step import FusedStep  # noqa: E402

# (label, checkpoint glob): the demo's model size, the headline model of docs/results.md, a
# larger one; all on the full sotu bank, so their test sets are the same.
SIZES = (("h128", "runs/bench/quant_h128/checkpoints/epoch_*"),
         ("base h256", "runs/ablations/base/checkpoints/epoch_*"),
         ("h512x2", "runs/bench/quant_h512x2/checkpoints/epoch_*"))
# How the two bench-only checkpoints are trained (the base config at another size; minutes each).
TRAIN = ("lvm train --local --config configs/ablations/base.yaml --set train.max_epochs=4 "
         "--set train.patience=2 --set run.storage_path=runs/bench")
TRAIN_SIZES = {"h128": "--set model.hidden=128 --set run.name=quant_h128",
               "h512x2": "--set model.hidden=512 --set model.layers=2 --set model.slots=64 "
                         "--set run.name=quant_h512x2"}
GOAL_LOST, GOAL_SPEED = 1.0, 1.5


def clock(fn, n: int) -> tuple[float, float]:
    """Seconds per call of fn: (CPU time of this process, wall)."""
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        fn()
    return (time.process_time() - c0) / n, (time.perf_counter() - w0) / n


def traced_step(model, x, state):
    """model.step traced and frozen with TorchScript, as a step(x, state) -> pred callable."""
    import torch

    from lvm_ray.model import RecurrentState

    class Step(torch.nn.Module):  # plain tensors in and out, which is what trace takes
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x, h, last):
            pred, st = self.model.step(x, RecurrentState(h, last))
            return pred, st.h, st.last

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings: the input checks run once, at trace
        fn = torch.jit.freeze(torch.jit.trace(Step().eval(), (x, state.h, state.last),
                                              check_trace=False))
    x2 = torch.roll(x, 1, dims=-1)  # not the traced input, so a constant-folded trace would fail
    torch.testing.assert_close(fn(x2, state.h, state.last)[0], model.step(x2, state)[0],
                               atol=1e-5, rtol=0)
    return lambda x, st: fn(x, st.h, st.last)[0]


def timings(models: dict, history: np.ndarray, long_ctx: np.ndarray, rounds: int,
            steps: int, batch: int = 32) -> dict[str, dict[str, dict[str, float]]]:
    """Median seconds ({"cpu", "wall"}) per call for each precision and kind: "step" (batch 1),
    "step_b32", "full" (1000 vectors), and for fp32 / int8 "step_traced" and "gru_full" (the
    GRU module alone on the normalised 1000-vector context)."""
    import torch

    x_hist = torch.from_numpy(history)[None]  # (1, 100, D)
    x_new = torch.from_numpy(long_ctx[:1])  # (1, D)
    x_long = torch.from_numpy(long_ctx)[None]  # (1, 1000, D)
    xb_hist = x_hist.expand(batch, -1, -1).contiguous()  # (batch, 100, D)
    xb_new = torch.from_numpy(long_ctx[:batch])  # (batch, D)
    calls: dict[str, dict[str, tuple]] = {}
    with torch.no_grad():
        for p, m in models.items():
            st, bst = m(x_hist)[1], m(xb_hist)[1]
            calls[p] = {"step": (lambda m=m, st=st: m.step(x_new, st), steps),
                        f"step_b{batch}": (lambda m=m, bst=bst: m.step(xb_new, bst), steps),
                        "full": (lambda m=m: m(x_long), 1)}
            if p in ("fp32", "int8"):
                fast = traced_step(m, x_new, st)
                x_normed = m.in_norm(x_long)
                calls[p]["step_traced"] = (lambda fast=fast, st=st: fast(x_new, st), steps)
                calls[p]["gru_full"] = (lambda m=m: m.gru(x_normed), 1)
        st, bst = models["fp32"](x_hist)[1], models["fp32"](xb_hist)[1]
        for p in ("fp32", "int8"):  # the served append step, from the fp32 model
            fused = FusedStep.build(models["fp32"], p)
            calls[f"fused-{p}"] = {
                "step": (lambda f=fused: f.run(x_new[:, None], [1], st.h, st.last), steps),
                f"step_b{batch}": (lambda f=fused: f.run(xb_new[:, None], [1] * batch, bst.h,
                                                         bst.last), steps)}
        for d in calls.values():  # warm-up
            for fn, _ in d.values():
                fn()
        out = {p: {k: [] for k in d} for p, d in calls.items()}
        for _ in range(rounds):  # interleaved, so load from other processes hits all alike
            for p, d in calls.items():
                for k, (fn, n) in d.items():
                    out[p][k].append(clock(fn, n))
    return {p: {k: {"cpu": float(np.median([c for c, _ in v])),
                    "wall": float(np.median([w for _, w in v]))} for k, v in d.items()}
            for p, d in out.items()}


def fused_predictions(step, vectors: np.ndarray, ws, batch_size: int = 512) -> np.ndarray:
    """Predictions (M, D) for every window with every context vector fed through the fused step
    one at a time from an empty state: the served append path at its most exposed."""
    import torch

    from lvm_ray.eval.predict import gather_batch

    order = np.argsort(ws.lengths, kind="stable")
    out = np.empty((len(ws), vectors.shape[1]), dtype=np.float32)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        ctx, lengths, _, _ = gather_batch(vectors, ws, idx)
        B = len(idx)
        h0 = torch.zeros(step.layers, B, step.hidden)
        pred, _, _ = step.run(torch.from_numpy(ctx), lengths.tolist(), h0, torch.zeros(B, step.dim))
        out[idx] = pred.numpy()
    return out


def measure(label: str, model, cfg, args, quality: bool) -> dict:
    """Timings (and, for a trained checkpoint, test metrics) of one model at every precision."""
    from lvm_ray.eval.metrics import evaluate, l2n
    from lvm_ray.eval.predict import predict_windows
    from lvm_ray.model.quantize import PRECISIONS, quantize_model
    from lvm_ray.workflows.prepare import ensure_bank, prepare_windows

    models = {p: quantize_model(model, p) for p in PRECISIONS}
    if quality:
        bank = ensure_bank(cfg)
        ws = prepare_windows(cfg, bank)
        long_ctx = bank.vectors[np.resize(ws.test.rows, 1000)]  # (1000, D) real test vectors
    else:
        rng = np.random.default_rng(0)
        long_ctx = rng.standard_normal((1000, model.cfg.d_in)).astype(np.float32)
        long_ctx /= np.linalg.norm(long_ctx, axis=1, keepdims=True)
    t = timings(models, long_ctx[-100:], long_ctx, args.rounds, args.steps)
    res = {"label": label, "model": dataclasses.asdict(model.cfg), "timings_s": t}
    if quality:
        preds = {p: predict_windows(m, bank.vectors, ws.test) for p, m in models.items()}
        preds["fused-int8"] = fused_predictions(FusedStep.build(models["fp32"], "int8"),
                                                bank.vectors, ws.test)
        res["results"] = {p: evaluate(preds[p], ws.test, bank, cfg.eval) for p in preds}
        res["agreement"] = {p: float(np.mean(np.sum(l2n(preds[p]) * l2n(preds["fp32"]), axis=1)))
                            for p in preds}
        res["test"] = f"`{cfg.bank_path}` test split, {len(ws.test):,} windows"
    return res


def describe(cfg) -> str:
    return f"hidden {cfg['hidden']}, {cfg['layers']} layer(s), {cfg['slots']} slots"


def report(sizes: list[dict], args) -> str:
    from lvm_ray.model.quantize import PRECISIONS

    def ms(r, p, k):
        return 1e3 * r["timings_s"][p][k]["cpu"]

    def x(r, p, k, ref="fp32"):
        return r["timings_s"][ref][k]["cpu"] / r["timings_s"][p][k]["cpu"]

    rows, verdict, where, served, served_verdict = [], [], [], [], []
    why: dict[str, list[str]] = {}  # test set -> labels of the sizes measured on it
    for r in sizes:
        name = f"{r['label']} ({describe(r['model'])})"
        q = r.get("results")
        for p in PRECISIONS:
            if q:
                s, ref = q[p], q["fp32"]
                quality = [f"{100 * s['bank_hit@5']:.2f} [{100 * s['bank_hit@5_lo']:.1f}, "
                           f"{100 * s['bank_hit@5_hi']:.1f}]",
                           f"{100 * (s['bank_hit@5'] - ref['bank_hit@5']):+.2f}",
                           f"{100 * (s['ca'] - ref['ca']):+.2f}", f"{r['agreement'][p]:.5f}"]
            else:
                quality = ["untrained", "", "", ""]
            rows.append([name if p == "fp32" else "", p,
                         f"{ms(r, p, 'step'):.3f}", f"{x(r, p, 'step'):.2f}x",
                         f"{ms(r, p, 'step_b32'):.3f}", f"{x(r, p, 'step_b32'):.2f}x",
                         f"{ms(r, p, 'full'):.1f}", f"{x(r, p, 'full'):.2f}x", *quality])
        t = r["timings_s"]
        gru_share = [t[p]["gru_full"]["cpu"] / t[p]["full"]["cpu"] for p in ("fp32", "int8")]
        where.append([name, f"{gru_share[0]:.0%} / {gru_share[1]:.0%}",
                      f"{ms(r, 'fp32', 'step'):.3f}", f"{ms(r, 'fp32', 'step_traced'):.3f}",
                      f"{1 - t['fp32']['step_traced']['cpu'] / t['fp32']['step']['cpu']:.0%}",
                      f"{ms(r, 'int8', 'step_traced'):.3f}",
                      f"{x(r, 'int8', 'step_traced'):.2f}x",
                      f"{t['fp32']['step']['cpu'] / t['int8']['step_traced']['cpu']:.2f}x"])
        for p in ("int8", "bf16"):
            speed = min(x(r, p, "step"), x(r, p, "full"))
            delta = 100 * (q[p]["bank_hit@5"] - q["fp32"]["bank_hit@5"]) if q else None
            fast = speed >= GOAL_SPEED
            ok = "met" if fast and delta is not None and -delta <= GOAL_LOST else (
                "speed met, quality not measured (untrained)" if fast and delta is None
                else "NOT met")
            lost_txt = f"bank-Hit@5 {delta:+.2f} points" if q else "quality not measured"
            verdict.append(f"- {r['label']}, {p}: {lost_txt}; speed-up step "
                           f"{x(r, p, 'step'):.2f}x, 32-session step "
                           f"{x(r, p, 'step_b32'):.2f}x, full-1000 {x(r, p, 'full'):.2f}x: "
                           f"goal {ok}")
        if q:
            why.setdefault(r["test"], []).append(r["label"])
        fx = {p: x(r, f"fused-{p}", "step") for p in ("fp32", "int8")}
        fx32 = x(r, "fused-int8", "step_b32")
        dq = (100 * (q["fused-int8"]["bank_hit@5"] - q["fp32"]["bank_hit@5"]) if q else None)
        served.append([name, f"{ms(r, 'fp32', 'step'):.3f}",
                       f"{ms(r, 'fused-fp32', 'step'):.3f} ({fx['fp32']:.2f}x)",
                       f"{ms(r, 'fused-int8', 'step'):.3f} ({fx['int8']:.2f}x)",
                       f"{ms(r, 'fused-int8', 'step_b32'):.3f} ({fx32:.2f}x)",
                       (f"{100 * q['fused-int8']['bank_hit@5']:.2f} "
                        f"[{100 * q['fused-int8']['bank_hit@5_lo']:.1f}, "
                        f"{100 * q['fused-int8']['bank_hit@5_hi']:.1f}]") if q else "untrained",
                       f"{dq:+.2f}" if q else "", f"{r['agreement']['fused-int8']:.5f}" if q else ""])
        ok_speed = fx["int8"] >= GOAL_SPEED
        served_verdict.append(
            f"- {r['label']}: fused int8 step {fx['int8']:.2f}x the eager fp32 step"
            + (f", bank-Hit@5 {dq:+.2f} points" if q else ", quality not measured (untrained)")
            + ": " + ("met" if ok_speed and q and abs(dq) <= 0.2 else
                      "speed met" if ok_speed and not q else "NOT met"))
    body = (
        f"{args.threads} torch thread(s); times are CPU ms per call (process time, median of "
        f"{args.rounds} interleaved rounds; load average at the start "
        f"{', '.join(f'{v:.1f}' for v in args.load_start)}), speed-ups are fp32 / precision on "
        "the same code path. int8 = torch dynamic quantization of every Linear and the GRU "
        "(int8 weights, activations quantized per call); bf16 = all weights and activations "
        "in bfloat16. Test sets: " + "; ".join(f"{t} ({', '.join(ls)})" for t, ls in why.items())
        + ".\n\n"
        + markdown_table(["model", "precision", "step ms", "×", "32-session step ms", "×",
                          "full-1000 ms", "×", "test bank-Hit@5 % [95% CI]", "Δ pts",
                          "Δ CA pts", "cos(pred, fp32 pred)"], rows)
        + "\n\nWhere the time goes (batch 1). GRU share: the GRU module alone over the "
          "normalised 1000-vector context, as a share of the full forward (fp32 / int8). "
          "Traced: the same step traced and frozen with TorchScript, so the difference to "
          "eager is Python and nn.Module overhead; int8 traced against fp32 traced is what "
          "quantization gains once that overhead is gone; the last column is int8 traced "
          "against the eager fp32 step (quantization and overhead removal together).\n\n"
        + markdown_table(["model", "GRU share of full-1000", "fp32 step ms", "fp32 traced ms",
                          "overhead share of the eager step", "int8 traced ms",
                          "int8 × (traced)", "int8 traced × eager fp32"], where)
        + "\n\nGoal (<= 1 point of bank-Hit@5 lost, >= 1.5x on the batch-1 step and the "
          "full-1000 forward), int8 and bf16 against fp32 on the same code path:\n\n"
        + "\n".join(verdict)
        + "\n\n### The served append step (issue 15)\n\nWhat a Serve session append runs "
          "(ModelUserConfig.append_step, default int8): lvm_ray.model.fused_step, the GRU step "
          "hand-fused into a few tensor ops and traced and frozen with TorchScript, from the "
          "fp32 checkpoint, in fp32 or int8 (dynamic quantization of every Linear, the GRU's "
          "input and hidden projections included). Speed-ups against today's eager fp32 step "
          "(batch 1 and 32 sessions). Quality: every context vector of every test window fed "
          "through the fused int8 step one at a time from an empty state (the served path at "
          "its most exposed), against the eager fp32 model on the same windows. The kNN over "
          "the bank that follows each step is the same on both paths and not in these times.\n\n"
        + markdown_table(["model", "eager fp32 step ms", "fused fp32 ms (×)", "fused int8 ms (×)",
                          "32-session fused int8 ms (× eager fp32)",
                          "test bank-Hit@5 % fused int8 [95% CI]", "Δ pts vs eager fp32",
                          "cos(pred, fp32 pred)"], served)
        + "\n\nGoal (>= 1.5x the eager fp32 step at every size, bank-Hit@5 within 0.2 point):"
          "\n\n" + "\n".join(served_verdict))
    return body


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", action="append",
                    help="checkpoint dir, repeatable (default: each of SIZES that exists)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = a Serve replica)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=100, help="incremental steps per timing block")
    ap.add_argument("--no-paper-size", action="store_true",
                    help="skip the untrained paper-size timing")
    ap.add_argument("--smoke-test", action="store_true")
    args = ap.parse_args()
    args.load_start = os.getloadavg()

    import torch

    from lvm_ray.config import PAPER_MODEL, Config, from_dict, load_config, merge
    from lvm_ray.model import build_model
    from lvm_ray.train.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    sizes = []
    if args.smoke_test:
        import tempfile

        cfg = load_config(presets=["smoke"], overrides={
            "bank_path": str(Path(tempfile.mkdtemp(prefix="lvm_quant_")) / "bank.parquet")})
        args.rounds, args.steps = 2, 5
        torch.manual_seed(0)
        sizes.append(measure("smoke", build_model(cfg.model).eval(), cfg, args, quality=True))
        print(report(sizes, args))
        return 0
    if args.checkpoint:
        # runs/<name>/best or runs/<name>/checkpoints/epoch_N -> <name>
        found = [(Path(p).parent.name if Path(p).name == "best"
                  else Path(p).parents[1].name if Path(p).parent.name == "checkpoints"
                  else Path(p).name, p) for p in args.checkpoint]
    else:
        found = [(label, str(sorted(Path().glob(pat))[-1])) for label, pat in SIZES
                 if sorted(Path().glob(pat))]
    if not found:
        print("no checkpoint: pass --checkpoint (train one with `lvm train --local`)")
        return 2
    for label, path in found:
        ck = load_checkpoint(path)
        cfg = merge(from_dict(Config, ck.meta["config"]), {"eval": {"lanes": 0}})
        sizes.append(measure(label, ck.model, cfg, args, quality=True) | {"checkpoint": path})
    if not args.no_paper_size:
        torch.manual_seed(0)
        paper = build_model(dataclasses.replace(PAPER_MODEL, d_in=384)).eval()
        sizes.append(measure("paper-size", paper, None, args, quality=False))
    body = report(sizes, args)
    body += ("\n\nCheckpoints: " + "; ".join(f"{s['label']} `{s['checkpoint']}`"
                                            for s in sizes if "checkpoint" in s) + ". "
             + ("Given with --checkpoint (each checkpoint's recorded config says how it was "
                "trained)." if args.checkpoint else
                "Trained for this bench by `" + TRAIN + " ...` with: "
                + "; ".join(f"{k} `{v}`" for k, v in TRAIN_SIZES.items()) + "."))
    cmd = "python bench/bench_quant.py" + "".join(f" --checkpoint {c}"
                                                  for c in args.checkpoint or [])
    write_section("quant", "Quantized CPU inference (int8 / bf16)", body, cmd)
    out = Path("runs/bench")
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant.json").write_text(json.dumps(sizes, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
